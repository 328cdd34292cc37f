"""Redis going away under a running proxy, or missing at start: the SDK never notices, and the cache comes back."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest

from tests.e2e.support import CLIENT_KEY, ProxyProcess, chat_kwargs, redis_key_count, start_proxy
from tests.support import RedisServer, eventually, free_port

pytestmark = pytest.mark.e2e

# Short enough that the test waits little for Redis to be tried again.
CONFIG = "redis:\n  retry_after_s: 0.5\n  timeout_ms: 200\n"


@pytest.fixture
def started() -> Iterator[list[ProxyProcess]]:
    """Proxies a test started, stopped at teardown even when the test fails halfway."""
    processes: list[ProxyProcess] = []
    yield processes
    for process in processes:
        process.stop()


def _ask(sdk: openai.OpenAI, content: str) -> tuple[str, str]:
    raw = sdk.chat.completions.with_raw_response.create(**chat_kwargs(content))
    return raw.headers["X-Cache"], raw.parse().id


def _readyz(proxy: ProxyProcess) -> tuple[int, dict[str, str]]:
    with urllib.request.urlopen(f"{proxy.url}/readyz", timeout=5) as response:
        return response.status, orjson.loads(response.read())


def test_requests_succeed_and_cache_returns_when_redis_dies_and_restarts(
    upstream_url: str, own_redis: RedisServer, tmp_path: Path, started: list[ProxyProcess]
) -> None:
    proxy = start_proxy(tmp_path, upstream_url, own_redis.url, config=CONFIG)
    started.append(proxy)
    with openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        warm = _ask(sdk, "warmed before the outage")
        assert warm[0] == "MISS"
        assert eventually(lambda: redis_key_count(own_redis.url) == 1)

        own_redis.stop()
        assert _ask(sdk, "warmed before the outage") == ("HIT", warm[1])
        during = _ask(sdk, "first seen during the outage")
        assert during[0] == "MISS"
        # Served by the in-process tier: Redis is still down.
        assert _ask(sdk, "first seen during the outage") == ("HIT", during[1])
        assert _readyz(proxy)[0] == 200

        own_redis.start()
        assert redis_key_count(own_redis.url) == 0
        # New questions until one lands in Redis: the proxy tries Redis again once its retry window passed.
        for n in range(100):
            assert _ask(sdk, f"asked after the restart {n}")[0] == "MISS"
            if eventually(lambda: redis_key_count(own_redis.url) > 0, timeout_s=0.1):
                break
        else:
            pytest.fail("no entry reached Redis after it came back")
        settled = redis_key_count(own_redis.url)
        after = _ask(sdk, "asked once redis is back")
        assert after[0] == "MISS"
        assert eventually(lambda: redis_key_count(own_redis.url) == settled + 1)
        assert _ask(sdk, "asked once redis is back") == ("HIT", after[1])
        assert _readyz(proxy) == (200, {"status": "ready", "cache": "ok", "redis": "up"})


def test_entries_written_by_one_proxy_are_hits_in_another_when_they_share_redis(
    upstream_url: str, own_redis: RedisServer, tmp_path: Path, started: list[ProxyProcess]
) -> None:
    first = start_proxy(tmp_path / "first", upstream_url, own_redis.url, config=CONFIG)
    started.append(first)
    second = start_proxy(tmp_path / "second", upstream_url, own_redis.url, config=CONFIG)
    started.append(second)
    with openai.OpenAI(base_url=first.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        stored = _ask(sdk, "shared across replicas")
    assert stored[0] == "MISS"
    assert eventually(lambda: redis_key_count(own_redis.url) == 1)
    with openai.OpenAI(base_url=second.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        assert _ask(sdk, "shared across replicas") == ("HIT", stored[1])
    assert second.upstream_responses() == 0


def test_requests_succeed_when_redis_is_down_at_proxy_start(
    upstream_url: str, tmp_path: Path, started: list[ProxyProcess]
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    proxy = start_proxy(tmp_path, upstream_url, nowhere, config=CONFIG)
    started.append(proxy)
    with openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        first = _ask(sdk, "no redis from the start")
        second = _ask(sdk, "no redis from the start")
        stream = sdk.chat.completions.create(**chat_kwargs("no redis stream", stream=True))
        with stream:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert first[0] == "MISS"
    assert second == ("HIT", first[1])
    assert text == "echo: no redis stream"
    assert _readyz(proxy)[0] == 200
    assert proxy.upstream_responses() == 2
