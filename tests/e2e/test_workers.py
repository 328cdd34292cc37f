"""Several workers on one port (--workers N): a scrape of /metrics reports the whole process group."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import orjson
import pytest

from tests.e2e.support import MODEL, ProxyProcess, start_proxy
from tests.support import RedisServer

pytestmark = pytest.mark.e2e

WORKERS = 2
REQUESTS = 40


@pytest.fixture(scope="module")
def group(
    upstream_url: str, module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = start_proxy(
        tmp_path_factory.mktemp("workers"), upstream_url, module_redis.url, PROXY_WORKERS=str(WORKERS)
    )
    yield process
    process.stop()


def _post(proxy: ProxyProcess, content: str) -> tuple[str, str]:
    """One request on a connection of its own (so that the kernel picks a worker for it); its X-Cache and
    X-Request-ID."""
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]})
    request = urllib.request.Request(
        f"{proxy.base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
        return response.headers["X-Cache"], response.headers["X-Request-ID"]


def test_every_scrape_counts_all_workers_requests_when_workers_share_the_port(group: ProxyProcess) -> None:
    answers = [_post(group, f"worker question {i % 10}") for i in range(REQUESTS)]
    # A generated request id starts with its worker's own random prefix. The last worker may still be starting
    # while the first has answered them all: more requests until both answered some.
    while len({request_id.rsplit("-", 1)[0] for _, request_id in answers}) < WORKERS:
        assert len(answers) < 50 * REQUESTS, "one worker never answered"
        answers.append(_post(group, f"worker question {len(answers) % 10}"))
    for _ in range(10):
        # Each scrape is a new connection too, so these reach either worker.
        assert group.metric("llm_cache_requests_total") == len(answers)
        assert group.metric("llm_cache_requests_total", outcome="MISS") + group.metric(
            "llm_cache_requests_total", outcome="HIT"
        ) == len(answers)
        assert group.metric("llm_cache_upstream_responses_total", status="200") == sum(
            1 for cache, _ in answers if cache == "MISS"
        )
        assert group.metric("llm_cache_request_duration_seconds_count") == len(answers)
        assert group.metric("llm_cache_redis_up") == 1
