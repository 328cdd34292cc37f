"""Random requests against a running proxy: it never answers 500 on its own account, never dies, and never
forwards what it refused."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.support import clean_env, fake_upstream_process, free_port, stop_process, wait_until_serving

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=500, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def proxy_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A proxy process (memory cache, client keys, a listed origin) in front of the fake upstream process."""
    work = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    (work / "none.yaml").write_text("")
    log = work / "proxy.log"
    with fake_upstream_process(work / "upstream.log") as upstream_url:
        env = clean_env(
            PROXY_PORT=str(port),
            CACHE_BACKEND="memory",
            UPSTREAM_BASE_URL=upstream_url,
            OPENAI_API_KEY="sk-upstream-fuzz",
            PROXY_API_KEYS="fuzz-key",
            PROXY_ALLOWED_ORIGINS="https://app.example.com",
            MAX_BODY_BYTES="65536",
            PROXY_CLIENT_TIMEOUT="2",
            PROXY_CONFIG=str(work / "none.yaml"),
        )
        with log.open("wb") as out:
            proxy = subprocess.Popen([sys.executable, "-m", "proxy"], cwd=work, env=env, stdout=out, stderr=out)
        try:
            wait_until_serving(f"http://127.0.0.1:{port}/healthz", proxy, log)
            yield port
        finally:
            stop_process(proxy)
    assert "Traceback" not in log.read_text(errors="replace")


def forwarded(port: int) -> float:
    """Upstream exchanges the proxy has had so far, of any outcome."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_cache_upstream_responses_total"
    )


def send(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE", "BREW"])
segments = st.sampled_from(
    ["chat", "completions", "models", "files", "..", ".", "%2e%2e", "%5c", "\\", "", ";x", "%00", "%zz", "%c0%ae", "é"]
)
targets = st.one_of(
    st.lists(segments, max_size=4).map(lambda s: "/v1/" + "/".join(s)),
    st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/healthz", "/metrics", "/", "*", "/admin"]),
    st.sampled_from(["http://evil.example/v1/models", "evil.example:443", "//evil.example/v1/models"]),
)
header_lines = st.lists(
    st.sampled_from(
        [
            "Authorization: Bearer fuzz-key",
            "Authorization: Bearer wrong",
            "Origin: http://evil.example",
            "Origin: https://app.example.com",
            "Sec-Fetch-Site: cross-site",
            "Content-Type: application/json",
            "Content-Type: text/plain",
            "Transfer-Encoding: chunked",
            "Content-Length: 5",
            "Expect: 100-continue",
            "Connection: close, X-Secret",
            "X-Cache-TTL: -5",
            "Cache-Control: no-store, max-age=abc",
        ]
    ),
    max_size=6,
    unique=True,
)
hosts = st.sampled_from(["127.0.0.1", "localhost:8080", "[::1]", "rebind.evil.example", "a@127.0.0.1", ""])
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from([b'{"model":"m","messages":[]}', b'{"model":"m","model":"n"}', b"[" * 3000, b"0\r\n\r\n"]),
)


@FUZZ
@given(methods, targets, hosts, header_lines, bodies)
def test_proxy_refuses_cleanly_and_survives_when_requests_are_random(
    proxy_port: int, method: str, target: str, host: str, headers: list[str], body: bytes
) -> None:
    before = forwarded(proxy_port)
    lines = [f"Host: {host}"] if host else []
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{line}\r\n" for line in [*lines, *headers])
    if not any(line.startswith(("Content-Length", "Transfer-Encoding")) for line in headers) and body:
        head += f"Content-Length: {len(body)}\r\n"
    reply = send(proxy_port, head.encode() + b"Connection: close\r\n\r\n" + body)
    status_line, _, rest = reply.partition(b"\r\n")
    head_block = rest.partition(b"\r\n\r\n")[0].lower()
    if status_line:
        assert b" 500 " not in status_line, reply[:300]
        if b"\r\nx-cache:" not in b"\r\n" + head_block:
            # The proxy's own answer (a refusal, a health endpoint, a preflight): nothing went upstream.
            assert forwarded(proxy_port) == before, reply[:300]
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/healthz", timeout=5) as alive:
        assert alive.status == 200
