"""Stores: LRU bounds and expiry, Redis read/write on fakeredis, and failing Redis reading as a miss."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as redis
from fakeredis import FakeAsyncRedis

from proxy.entry import CacheEntry
from proxy.store import MemoryStore, NullStore, RedisStore, TieredStore
from tests.redis_server import free_port


def entry(body: bytes = b'{"ok":true}', ttl_s: float = 60) -> CacheEntry:
    now = time.time()
    return CacheEntry(
        status=200,
        headers=(("Content-Type", "application/json"),),
        body=body,
        is_stream=False,
        stored_at=now,
        expires_at=now + ttl_s,
    )


def dead_redis() -> redis.Redis:
    """A real client aimed at a port where nothing listens: every call fails like a dead server."""
    return redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)


async def test_memory_evicts_least_recently_used_when_over_entry_bound() -> None:
    store = MemoryStore(max_entries=2, max_bytes=1 << 20)
    store.put("a", entry())
    store.put("b", entry())
    assert await store.get("a") is not None  # "a" is now the most recent
    store.put("c", entry())
    assert [await store.get(k) is not None for k in "abc"] == [True, False, True]


async def test_memory_evicts_when_over_byte_bound() -> None:
    store = MemoryStore(max_entries=100, max_bytes=6000)
    for key in "abcd":
        store.put(key, entry(b"x" * 900))  # about 2.4 kB each with the per-entry overhead
    assert len(store) == 2 and store.bytes <= 6000
    assert [await store.get(k) is not None for k in "abcd"] == [False, False, True, True]
    store.put("huge", entry(b"x" * 7000))
    assert await store.get("huge") is None


async def test_memory_forgets_entries_when_expired() -> None:
    store = MemoryStore(max_entries=10, max_bytes=1 << 20)
    store.put("old", entry(ttl_s=-1))
    assert await store.get("old") is None and len(store) == 0


async def test_redis_store_round_trips_with_ttl_when_healthy() -> None:
    client = FakeAsyncRedis()
    store = RedisStore(client, op_timeout_s=0.2, retry_after_s=1)
    store.put("k", entry(ttl_s=30))
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
    store.put("k", entry())
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
        store.put(key, entry(key.encode()))
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


async def test_tiered_store_serves_from_memory_when_redis_is_down() -> None:
    client = dead_redis()
    store = TieredStore(MemoryStore(10, 1 << 20), RedisStore(client, op_timeout_s=0.2, retry_after_s=60))
    assert await store.get("k") is None
    store.put("k", entry())
    await store.remote.drain()
    assert await store.get("k") is not None
    assert store.state == "degraded"
    await client.aclose()


async def test_tiered_store_promotes_redis_hits_when_memory_is_cold() -> None:
    client = FakeAsyncRedis()
    remote = RedisStore(client, op_timeout_s=0.2, retry_after_s=1)
    remote.put("k", entry())
    await remote.drain()
    store = TieredStore(MemoryStore(10, 1 << 20), remote)
    assert await store.get("k") is not None
    assert len(store.memory) == 1


async def test_null_store_keeps_nothing_when_cache_is_off() -> None:
    store = NullStore()
    store.put("k", entry())
    assert await store.get("k") is None and store.state == "off"
