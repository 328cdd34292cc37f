"""Real processes for end-to-end tests: start the proxy and the fake upstream, read metrics and Redis."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support import clean_env, free_port, stop_process, wait_until_serving

UPSTREAM_KEY = "sk-upstream-e2e-0123456789"
CLIENT_KEY = "sk-test"
NAMESPACE = "e2e"
MODEL = "gpt-4o-mini"


@dataclass
class ProxyProcess:
    """A running ``python -m proxy``; :meth:`upstream_responses` reads its own ``/metrics``."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called *name* whose labels include *labels*."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def upstream_responses(self, status: str = "200") -> int:
        """Upstream answers of HTTP status *status* (or ``error``: no response) so far."""
        return int(self.metric("llm_cache_upstream_responses_total", status=status))

    def stop(self) -> None:
        stop_process(self.process)


def start_proxy(workdir: Path, upstream_url: str, redis_url: str, *, config: str = "", **env: str) -> ProxyProcess:
    """Start a proxy in front of *upstream_url*; *config* is the YAML it reads instead of the repo's."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "proxy.yaml"
    config_file.write_text(config)
    log = workdir / "proxy.log"
    port = free_port()
    settings = {
        "PROXY_HOST": "127.0.0.1",
        "PROXY_PORT": str(port),
        "UPSTREAM_BASE_URL": upstream_url,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "REDIS_URL": redis_url,
        "CACHE_NAMESPACE": NAMESPACE,
        "PROXY_CONFIG": str(config_file),
        **env,
    }
    with log.open("wb") as out:
        # The working directory is empty, so no stray .env is loaded.
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy"],
            cwd=workdir,
            env=clean_env(**settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(f"{url}/healthz", process, log)
    return ProxyProcess(url, process, log)


def redis_key_count(url: str) -> int:
    """Number of cache entries (not leases or flight streams) the proxy wrote to the Redis at *url*."""
    with redis.Redis.from_url(url, socket_timeout=2) as client:
        return len(client.keys(f"{NAMESPACE}:*}}"))


def chat_kwargs(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
