"""Stores in the process: LRU bounds and expiry, the tiered store in front of Redis, and the null store."""

from __future__ import annotations

from fakeredis import FakeAsyncRedis

from proxy.memory import MemoryStore, NullStore, TieredStore
from proxy.store import RedisStore
from tests.support import dead_redis, make_entry


async def test_memory_evicts_least_recently_used_when_over_entry_bound() -> None:
    store = MemoryStore(max_entries=2, max_bytes=1 << 20)
    store.put("a", make_entry())
    store.put("b", make_entry())
    assert await store.get("a") is not None  # "a" is now the most recent
    store.put("c", make_entry())
    assert [await store.get(k) is not None for k in "abc"] == [True, False, True]


async def test_memory_evicts_when_over_byte_bound() -> None:
    store = MemoryStore(max_entries=100, max_bytes=6000)
    for key in "abcd":
        store.put(key, make_entry(b"x" * 900))  # about 2.4 kB each with the per-entry overhead
    assert len(store) == 2 and store.bytes <= 6000
    assert [await store.get(k) is not None for k in "abcd"] == [False, False, True, True]
    store.put("huge", make_entry(b"x" * 7000))
    assert await store.get("huge") is None


async def test_memory_forgets_entries_when_expired() -> None:
    store = MemoryStore(max_entries=10, max_bytes=1 << 20)
    store.put("old", make_entry(ttl_s=-1))
    assert await store.get("old") is None and len(store) == 0


async def test_tiered_store_serves_from_memory_when_redis_is_down() -> None:
    client = dead_redis()
    store = TieredStore(MemoryStore(10, 1 << 20), RedisStore(client, op_timeout_s=0.2, retry_after_s=60))
    assert await store.get("k") is None
    store.put("k", make_entry())
    await store.remote.drain()
    assert await store.get("k") is not None
    assert store.state == "degraded"
    await client.aclose()


async def test_tiered_store_promotes_redis_hits_when_memory_is_cold() -> None:
    client = FakeAsyncRedis()
    remote = RedisStore(client, op_timeout_s=0.2, retry_after_s=1)
    remote.put("k", make_entry())
    await remote.drain()
    store = TieredStore(MemoryStore(10, 1 << 20), remote)
    assert await store.get("k") is not None
    assert len(store.memory) == 1


async def test_null_store_keeps_nothing_when_cache_is_off() -> None:
    store = NullStore()
    store.put("k", make_entry())
    assert await store.get("k") is None and store.state == "off"
