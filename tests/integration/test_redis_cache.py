"""The proxy against a real redis-server on a free port: sharing, TTLs, and Redis failing in every way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.config import AuthSettings, Upstream
from proxy.entry import CacheEntry
from proxy.memory import TieredStore
from proxy.probes import REDIS_DOWN
from proxy.redis_client import redis_client_for
from proxy.state import STORE
from tests.support import UPSTREAM_KEY, RedisServer, chat_body, free_port, received

pytestmark = pytest.mark.integration


async def start_proxy(aiohttp_client: Any, settings: Any) -> TestClient[Any, Any]:
    """A proxy whose Redis client is built from settings, as in production."""
    return await aiohttp_client(create_app(settings))


def tiered(client: TestClient[Any, Any]) -> TieredStore:
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    return store


async def keys_in(url: str) -> list[bytes]:
    async with redis.Redis.from_url(url) as conn:
        return sorted(await conn.keys("*}"))


async def test_replicas_share_answers_when_they_share_redis(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    settings = settings_for(fake_upstream, url=redis_url)
    one, two = await start_proxy(aiohttp_client, settings), await start_proxy(aiohttp_client, settings)
    first = await one.post("/v1/chat/completions", json=chat_body("shared"))
    await tiered(one).remote.drain()
    second = await two.post("/v1/chat/completions", json=chat_body("shared"))
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert await second.read() == await first.read()
    assert len(received(fake_upstream)) == 1


async def test_entries_are_namespaced_with_ttl_and_no_secrets_when_stored(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await start_proxy(aiohttp_client, settings_for(fake_upstream, url=redis_url, ttl_s=120))
    response = await client.post(
        "/v1/chat/completions", json=chat_body("ttl"), headers={"Authorization": "Bearer sk-client"}
    )
    await tiered(client).remote.drain()
    keys = await keys_in(redis_url)
    assert len(keys) == 1 and keys[0].startswith(b"test:v2:chat/completions:")
    tag = response.headers["X-Cache-Key"]
    assert len(tag) == 16 and keys[0].decode().rpartition(":")[2].startswith("{" + tag)
    async with redis.Redis.from_url(redis_url) as conn:
        ttl = await conn.ttl(keys[0])
        raw = await conn.get(keys[0])
    assert 100 < ttl <= 120
    assert UPSTREAM_KEY.encode() not in keys[0] + raw and b"sk-client" not in keys[0] + raw
    entry = CacheEntry.from_bytes(raw)
    assert entry.status == 200 and not entry.is_stream and entry.usage is not None
    assert dict(entry.headers)["Content-Type"].startswith("application/json")
    assert "x-ratelimit-remaining-requests" not in {k.lower() for k, _ in entry.headers}


async def test_per_request_ttl_header_sets_expiry_when_given(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await start_proxy(aiohttp_client, settings_for(fake_upstream, url=redis_url, ttl_s=3600))
    await client.post("/v1/chat/completions", json=chat_body("short ttl"), headers={"X-Cache-TTL": "30"})
    await tiered(client).remote.drain()
    async with redis.Redis.from_url(redis_url) as conn:
        (key,) = await conn.keys("*}")
        assert 20 < await conn.ttl(key) <= 30
    assert "X-Cache-TTL" not in received(fake_upstream)[0].headers


async def test_hit_is_served_from_redis_when_memory_tier_is_cold(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await start_proxy(aiohttp_client, settings_for(fake_upstream, url=redis_url))
    body = chat_body("cold tier", stream=True)
    first = await (await client.post("/v1/chat/completions", json=body)).read()
    store = tiered(client)
    await store.remote.drain()
    await store.memory.aclose()
    hit = await client.post("/v1/chat/completions", json=body)
    assert hit.headers["X-Cache"] == "HIT" and await hit.read() == first
    assert len(store.memory) == 1  # promoted back into memory


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: b"LCP\x09 an entry from a future version", id="future format"),
        pytest.param(lambda raw: raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:], id="bit flip"),
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: b"\x00garbage" * 8, id="garbage"),
    ],
)
async def test_damaged_entry_is_a_miss_and_replaced_when_read(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str, damage: Callable[[bytes], bytes]
) -> None:
    client = await start_proxy(aiohttp_client, settings_for(fake_upstream, url=redis_url))
    first = await (await client.post("/v1/chat/completions", json=chat_body("damaged"))).read()
    store = tiered(client)
    await store.remote.drain()
    await store.memory.aclose()
    async with redis.Redis.from_url(redis_url) as conn:
        (key,) = await conn.keys("*}")
        await conn.set(key, damage(await conn.get(key)))
    response = await client.post("/v1/chat/completions", json=chat_body("damaged"))
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"
    assert (await response.json())["choices"][0]["message"]["content"] == "echo: damaged"
    assert await response.read() != first  # a fresh call, not the damaged bytes
    await store.remote.drain()
    async with redis.Redis.from_url(redis_url) as conn:
        assert CacheEntry.from_bytes(await conn.get(key)).status == 200


async def test_requests_succeed_and_cache_locally_when_redis_is_down_at_start(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any
) -> None:
    settings = settings_for(fake_upstream, url=f"redis://127.0.0.1:{free_port()}/0")
    client = await start_proxy(aiohttp_client, settings)
    first = await client.post("/v1/chat/completions", json=chat_body("no redis"))
    second = await client.post("/v1/chat/completions", json=chat_body("no redis"))
    assert [first.status, second.status] == [200, 200]
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    ready = await (await client.get("/readyz")).json()
    assert ready == {"status": "ready", "cache": "degraded", "redis": "down", "detail": REDIS_DOWN}


async def test_caching_resumes_when_redis_comes_back(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, own_redis: RedisServer
) -> None:
    client = await start_proxy(aiohttp_client, settings_for(fake_upstream, url=own_redis.url, retry_after_s=0.3))
    await client.post("/v1/chat/completions", json=chat_body("before"))
    await tiered(client).remote.drain()
    own_redis.stop()
    during = [await client.post("/v1/chat/completions", json=chat_body(f"during {i}")) for i in range(3)]
    assert [r.status for r in during] == [200, 200, 200]
    repeat = await client.post("/v1/chat/completions", json=chat_body("during 0"))
    assert repeat.headers["X-Cache"] == "HIT"  # the in-process fallback
    own_redis.start()
    await asyncio.sleep(0.4)
    for i in range(5):  # the first call after the pause may still meet a dead pooled connection
        await client.post("/v1/chat/completions", json=chat_body(f"after {i}"))
        await tiered(client).remote.drain()
    assert any(b"test:v2:" in k for k in await keys_in(own_redis.url))
    assert tiered(client).remote.available


async def test_requests_succeed_when_redis_refuses_auth(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any
) -> None:
    server = RedisServer(password="right-password")
    server.start()
    try:
        wrong = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        client = await start_proxy(aiohttp_client, settings_for(fake_upstream, url=wrong))
        responses = [await client.post("/v1/chat/completions", json=chat_body("auth")) for _ in range(2)]
        assert [r.status for r in responses] == [200, 200]
        assert not tiered(client).remote.available
    finally:
        server.close()


async def test_redis_password_setting_wins_over_url_when_both_given(fake_upstream: Any, settings_for: Any) -> None:
    server = RedisServer(password="right-password")
    server.start()
    try:
        settings = settings_for(fake_upstream, url=f"redis://:wrong@127.0.0.1:{server.port}/0")
        client = redis_client_for(replace(settings.redis, password="right-password"))
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    finally:
        server.close()


async def test_slow_redis_costs_one_timeout_when_it_stalls(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, own_redis: RedisServer
) -> None:
    client = await start_proxy(
        aiohttp_client, settings_for(fake_upstream, url=own_redis.url, timeout_ms=100, retry_after_s=30)
    )
    await client.post("/v1/chat/completions", json=chat_body("warm"))
    await tiered(client).remote.drain()
    async with redis.Redis.from_url(own_redis.url) as admin:
        await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        responses = [await client.post("/v1/chat/completions", json=chat_body(f"stalled {i}")) for i in range(3)]
        await admin.execute_command("CLIENT", "UNPAUSE")
    assert [r.status for r in responses] == [200, 200, 200]
    store = tiered(client).remote
    # One deadline expired; the next requests did not wait for Redis at all.
    assert store.errors == 1 and not store.available


async def test_secrets_stay_out_of_logs_and_errors_when_things_fail(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = RedisServer(password="redis-pass-1234")
    server.start()
    try:
        settings = settings_for(fake_upstream, url=f"redis://:wrong-redis-pass-5678@127.0.0.1:{server.port}/0")
        dead = Upstream(
            name="dead",
            base_url=f"http://127.0.0.1:{free_port()}/v1",
            api_key="sk-dead-upstream-9999",
            models=("dead-*",),
        )
        settings = replace(settings, upstreams=(*settings.upstreams, dead), auth=AuthSettings(("client-key-4321",)))
        client = await start_proxy(aiohttp_client, settings)
        auth = {"Authorization": "Bearer client-key-4321"}
        texts = [
            await (await client.post("/v1/chat/completions", json=chat_body("logs"), headers=auth)).text(),
            await (
                await client.post("/v1/chat/completions", json={**chat_body(), "model": "dead-1"}, headers=auth)
            ).text(),
            await (
                await client.post(
                    "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong-client-key"}
                )
            ).text(),
            await (await client.get("/metrics")).text(),
        ]
    finally:
        server.close()
    everything = caplog.text + "".join(texts)
    assert "redis failed" in caplog.text or "redis ping failed" in caplog.text
    for secret in (
        "wrong-redis-pass-5678",
        "redis-pass-1234",
        UPSTREAM_KEY,
        "sk-dead-upstream-9999",
        "client-key-4321",
        "wrong-client-key",
    ):
        assert secret not in everything
