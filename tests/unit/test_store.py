"""RedisStore: reads and writes on fakeredis, batching, and a failing Redis reading as a miss."""

from __future__ import annotations

import asyncio
from typing import Any

from fakeredis import FakeAsyncRedis

from proxy.store import RedisStore
from tests.support import dead_redis, make_entry


async def test_redis_store_round_trips_with_ttl_when_healthy() -> None:
    client = FakeAsyncRedis()
    store = RedisStore(client, op_timeout_s=0.2, retry_after_s=1)
    store.put("k", make_entry(ttl_s=30))
    await store.drain()
    assert (await store.get("k")) is not None
    assert 0 < await client.pttl("k") <= 30_000
    await client.set("junk", b"not an entry")
    assert await store.get("junk") is None
    assert store.available


async def test_redis_failure_reads_as_miss_and_pauses_redis_when_it_breaks() -> None:
    client = dead_redis()
    store = RedisStore(client, op_timeout_s=0.2, retry_after_s=60)
    assert await store.get("k") is None
    assert await store.get("k") is None
    store.put("k", make_entry())
    await store.drain()
    assert store.errors == 1 and store.state == "degraded"
    await client.aclose()


async def test_redis_is_tried_again_when_pause_ends() -> None:
    client = dead_redis()
    store = RedisStore(client, op_timeout_s=0.2, retry_after_s=0.01)
    await store.get("k")
    await asyncio.sleep(0.02)
    await store.get("k")
    assert store.errors == 2
    await client.aclose()


async def test_concurrent_lookups_share_one_round_trip_when_issued_together() -> None:
    client = FakeAsyncRedis()
    store = RedisStore(client, op_timeout_s=0.2, retry_after_s=1)
    for key in ("a", "b"):
        store.put(key, make_entry(key.encode()))
    await store.drain()
    sent: list[tuple[object, ...]] = []
    original = client.connection_pool.connection_class.send_packed_command

    async def spy(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(tuple(command))
        await original(self, command, check_health)

    client.connection_pool.connection_class.send_packed_command = spy  # type: ignore[method-assign]
    try:
        found = await asyncio.gather(*(store.get(k) for k in ("a", "b", "missing", "a")))
    finally:
        client.connection_pool.connection_class.send_packed_command = original  # type: ignore[method-assign]
    assert [e.body if e else None for e in found] == [b"a", b"b", None, b"a"]
    assert len(sent) == 1
