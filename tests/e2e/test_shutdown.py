"""SIGTERM: new connections are refused at once, requests in flight finish and are stored, the process exits 0."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.support import CLIENT_KEY, chat_kwargs, redis_key_count, start_proxy
from tests.support import RedisServer, eventually, fake_upstream_process

pytestmark = pytest.mark.e2e

SLOW_S = 1.5


@pytest.fixture
def slow_upstream(tmp_path: Path) -> Iterator[str]:
    """A fake upstream whose "slow" requests take :data:`SLOW_S` seconds."""
    with fake_upstream_process(tmp_path / "upstream.log", delay_s=SLOW_S) as url:
        yield url


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def test_request_in_flight_finishes_and_is_stored_when_sigterm_arrives(
    slow_upstream: str, module_redis: RedisServer, tmp_path: Path
) -> None:
    module_redis.command("FLUSHALL")
    proxy = start_proxy(tmp_path, slow_upstream, module_redis.url, LOG_LEVEL="DEBUG", SHUTDOWN_GRACE_S="10")
    port = int(proxy.url.rpartition(":")[2])
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
    answers: list[str] = []
    in_flight = threading.Thread(
        target=lambda: answers.append(
            sdk.chat.completions.create(**chat_kwargs("slow goodbye")).choices[0].message.content or ""
        )
    )
    try:
        in_flight.start()
        assert eventually(lambda: "cache MISS" in proxy.log.read_text(), timeout_s=10)
        proxy.process.send_signal(signal.SIGTERM)
        assert eventually(lambda: refuses_connections(port), timeout_s=5)
        refused_while_running = in_flight.is_alive()
        in_flight.join(timeout=15)
        assert proxy.process.wait(timeout=15) == 0
    finally:
        proxy.stop()
    assert answers == ["echo: slow goodbye"]
    assert refused_while_running
    assert redis_key_count(module_redis.url) == 1  # its store finished before the exit
