"""In-process tiers kept coherent across replicas by invalidations that a real Redis pushes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.memory import TieredStore
from proxy.state import STORE
from tests.support import RedisServer, chat_body

pytestmark = pytest.mark.integration


def tiered(client: TestClient[Any, Any]) -> TieredStore:
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    return store


async def coherent_replica(aiohttp_client: Any, settings: Any) -> TestClient[Any, Any]:
    client = await aiohttp_client(create_app(settings))
    for _ in range(200):
        if tiered(client).coherent:
            return client
        await asyncio.sleep(0.01)
    raise AssertionError("invalidations never became active")


async def ask(client: TestClient[Any, Any], content: str, **headers: str) -> tuple[str, str]:
    response = await client.post("/v1/chat/completions", json=chat_body(content), headers=headers)
    return response.headers["X-Cache"], (await response.json())["id"]


async def test_refresh_on_one_replica_is_served_by_the_other_within_100ms_when_invalidations_flow(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    settings = settings_for(fake_upstream, url=redis_url)
    one, two = await coherent_replica(aiohttp_client, settings), await coherent_replica(aiohttp_client, settings)
    first = await ask(one, "refresh me")
    await tiered(one).remote.drain()
    assert await ask(two, "refresh me") == ("HIT", first[1])
    assert await ask(two, "refresh me") == ("HIT", first[1])  # now from two's in-process tier
    refreshed = await ask(one, "refresh me", **{"Cache-Control": "no-cache"})
    assert refreshed[0] == "MISS" and refreshed[1] != first[1]
    await tiered(one).remote.drain()
    written = time.monotonic()
    while (seen := await ask(two, "refresh me"))[1] == first[1]:
        assert time.monotonic() - written < 0.1, "the old answer was still served 100 ms after the refresh"
        await asyncio.sleep(0.005)
    assert seen == ("HIT", refreshed[1])


async def test_entry_deleted_in_redis_stops_being_served_when_invalidated(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await coherent_replica(aiohttp_client, settings_for(fake_upstream, url=redis_url))
    await ask(client, "delete me")
    await tiered(client).remote.drain()
    assert (await ask(client, "delete me"))[0] == "HIT"
    async with redis.Redis.from_url(redis_url) as admin:
        (key,) = await admin.keys("*}")
        await admin.delete(key)
    for _ in range(20):
        if len(tiered(client).memory) == 0:
            break
        await asyncio.sleep(0.005)
    assert (await ask(client, "delete me"))[0] == "MISS"


async def test_tier_is_bypassed_then_emptied_when_invalidations_stop_and_resume(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, own_redis: RedisServer
) -> None:
    client = await coherent_replica(aiohttp_client, settings_for(fake_upstream, url=own_redis.url))
    await ask(client, "kept until in doubt")
    await tiered(client).remote.drain()
    await ask(client, "kept until in doubt")
    assert len(tiered(client).memory) == 1
    own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    for _ in range(100):
        if not tiered(client).coherent:
            break
        await asyncio.sleep(0.01)
    assert not tiered(client).coherent
    client = await coherent_replica(aiohttp_client, settings_for(fake_upstream, url=own_redis.url))
    text = await (await client.get("/metrics")).text()
    assert "llm_cache_invalidations_up 1.0" in text
