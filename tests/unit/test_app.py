"""The application as assembled by create_app: cache backends, health endpoints and metrics."""

from __future__ import annotations

from typing import Any

from proxy.app import create_app
from proxy.memory import MemoryStore
from proxy.state import STORE
from tests.support import UPSTREAM_KEY, chat_body, metric, received


async def test_memory_backend_caches_without_redis_when_configured(
    fake_upstream: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    client = await aiohttp_client(create_app(settings_for(fake_upstream, backend="memory")))
    outcomes = [(await client.post("/v1/chat/completions", json=chat_body("mem"))).headers["X-Cache"] for _ in range(2)]
    assert outcomes == ["MISS", "HIT"]
    assert isinstance(client.app[STORE], MemoryStore)
    assert (await (await client.get("/readyz")).json())["cache"] == "ok"


async def test_off_backend_always_calls_upstream_when_configured(
    fake_upstream: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    client = await aiohttp_client(create_app(settings_for(fake_upstream, backend="off")))
    outcomes = [(await client.post("/v1/chat/completions", json=chat_body("off"))).headers["X-Cache"] for _ in range(2)]
    # With the cache off nothing is looked up or stored: a bypass, not a miss.
    assert outcomes == ["BYPASS", "BYPASS"]
    assert len(received(fake_upstream)) == 2


async def test_health_endpoints_answer_when_running(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    health = await client.get("/healthz")
    ready = await client.get("/readyz")
    assert (health.status, await health.json()) == (200, {"status": "ok"})
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_metrics_count_outcomes_without_secrets_when_scraped(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for _ in range(3):
        await client.post("/v1/chat/completions", json=chat_body("metrics"))
    await client.get("/v1/models")
    text = await (await client.get("/metrics")).text()
    chat = {"upstream": "default", "route": "chat/completions", "model": "gpt-4o-mini"}
    assert metric(text, "llm_cache_requests_total", outcome="HIT", **chat) == 2
    assert metric(text, "llm_cache_requests_total", outcome="MISS", **chat) == 1
    assert metric(text, "llm_cache_requests_total", outcome="BYPASS", route="models", model="none") == 1
    assert metric(text, "llm_cache_tokens_saved_total", model="gpt-4o-mini", kind="output") == 10
    assert text.count("# TYPE llm_cache_memory_entries gauge") == 1
    assert UPSTREAM_KEY not in text
