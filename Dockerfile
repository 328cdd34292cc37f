# Builder: resolve and install the package into a venv. Runtime: copy only that venv, so no build
# tooling or source tree ships. Both stages use the same base, so the venv's interpreter path is valid.
FROM python:3.11.17-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir .


FROM python:3.11.17-slim-bookworm

LABEL org.opencontainers.image.title="llm-cache-proxy" \
      org.opencontainers.image.description="Caching reverse proxy for OpenAI-compatible APIs, backed by Redis" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 proxy \
 && useradd --system --uid 10001 --gid proxy --no-log-init --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin proxy

COPY --from=builder /opt/venv /opt/venv

# PROXY_HOST: inside a container the proxy must accept connections from outside its own loopback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXY_HOST=0.0.0.0 \
    PROXY_PORT=8080

# The proxy reads ./proxy.yaml when present: mount one at /app/proxy.yaml or set PROXY_CONFIG.
WORKDIR /app
USER 10001:10001
EXPOSE 8080

# Slim images have no curl. The check follows PROXY_PORT, so it stays right when the port is changed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PROXY_PORT', '8080') + '/healthz', timeout=3)"]

# Exec form: python is PID 1 and receives SIGTERM directly.
CMD ["python", "-m", "proxy"]
