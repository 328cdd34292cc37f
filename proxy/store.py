"""CacheStore and its backends: a bounded in-process LRU, Redis, and the two tiered. All fail open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from .entry import CacheEntry, EntryFormatError

log = logging.getLogger(__name__)

# Rough per-entry bookkeeping cost in the LRU, so that many tiny entries still count against the byte bound.
_ENTRY_OVERHEAD_BYTES = 512


class CacheStore(Protocol):
    """Where entries live. ``get`` never raises for backend trouble: trouble reads as a miss."""

    async def get(self, key: str) -> CacheEntry | None: ...

    def put(self, key: str, entry: CacheEntry) -> None:
        """Store *entry* until ``entry.expires_at``; returns at once, writing in the background."""

    @property
    def state(self) -> str:
        """``ok``, ``degraded`` (serving from memory while Redis is away) or ``off``."""

    async def aclose(self) -> None: ...


class MemoryStore:
    """A bounded LRU of entries in this process, by entry count and by bytes, honouring each expiry."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_now(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= time.time():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put_now(self, key: str, entry: CacheEntry) -> None:
        size = len(entry.body) + _ENTRY_OVERHEAD_BYTES
        if size > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.bytes += size
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.body) + _ENTRY_OVERHEAD_BYTES

    async def get(self, key: str) -> CacheEntry | None:
        return self.get_now(key)

    def put(self, key: str, entry: CacheEntry) -> None:
        self.put_now(key, entry)

    @property
    def state(self) -> str:
        return "ok"

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisStore:
    """Entries in Redis, one ``GET`` per lookup and one ``SET ... PX`` per store.

    Every operation, waiting for a free connection included, has the deadline *op_timeout_s*. A cancelled
    command makes redis-py drop its connection, so no reply is ever left unread on a pooled one. After a
    failure Redis is left alone for *retry_after_s*, so that a dead or slow Redis costs one timeout, not one
    per request; the next operation after that probes it again.
    """

    def __init__(self, client: redis.Redis, *, op_timeout_s: float, retry_after_s: float,
                 max_in_flight: int = 64) -> None:
        self._client = client
        # At most as many operations in flight as the pool has connections: a burst waits here, cheaply, and a
        # pool that runs dry can never be mistaken for a Redis outage.
        self._slots = asyncio.Semaphore(max_in_flight)
        self._deadline_s = op_timeout_s
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._failing = False
        self._writes: set[asyncio.Task[None]] = set()
        self.errors = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    @property
    def state(self) -> str:
        return "ok" if self.available else "degraded"

    async def get(self, key: str) -> CacheEntry | None:
        if not self.available:
            return None
        try:
            async with asyncio.timeout(self._deadline_s), self._slots:
                raw = await self._client.get(key)
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed("read", key, exc)
            return None
        if self._failing:
            self._recovered()
        if raw is None:
            return None
        try:
            # decode_responses stays False, so replies are bytes; a str here would be a misconfigured client.
            return CacheEntry.from_bytes(raw if isinstance(raw, bytes) else raw.encode())
        except EntryFormatError as exc:
            log.warning("cache entry unreadable; treated as a miss key=%s error=%s", key, exc)
            return None

    def put(self, key: str, entry: CacheEntry) -> None:
        if not self.available:
            return
        task = asyncio.get_running_loop().create_task(self._write(key, entry))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, entry: CacheEntry) -> None:
        ttl_ms = int((entry.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        try:
            async with asyncio.timeout(self._deadline_s), self._slots:
                await self._client.set(key, entry.to_bytes(), px=ttl_ms)
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed("write", key, exc)
            return
        if self._failing:
            self._recovered()

    def _failed(self, op: str, key: str, exc: BaseException, *, quiet: bool = False) -> None:
        self.errors += 1
        # One warning per outage, not one per probe: a laptop without Redis must not drown in them.
        level = logging.DEBUG if self._failing or quiet else logging.WARNING
        log.log(level, "redis %s failed; serving without it, next try in %.1fs key=%s error=%s: %s",
                op, self._retry_after_s, key, type(exc).__name__, exc)
        self._failing = True
        self._down_until = time.monotonic() + self._retry_after_s

    def _recovered(self) -> None:
        self._failing = False
        log.info("redis answers again; shared cache in use")

    async def ping(self, *, quiet: bool = False) -> bool:
        """One deadline-bound PING; a failure pauses Redis use like any other, logged at DEBUG when *quiet*.
        Never on the request path."""
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._client.ping()
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed("ping", "-", exc, quiet=quiet)
            return False
        if self._failing:
            self._recovered()
        return True

    async def drain(self) -> None:
        """Wait for writes in flight (shutdown, tests)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()


class TieredStore:
    """Redis behind a small in-process LRU of hot entries.

    A hot entry costs no Redis round trip; a Redis hit is promoted into memory until its own expiry. Entries
    are immutable, so the in-process copy can never be stale in content, only kept for its remaining TTL.
    While Redis is unavailable, the LRU keeps serving this replica's repeats.
    """

    def __init__(self, memory: MemoryStore, remote: RedisStore) -> None:
        self.memory = memory
        self.remote = remote

    async def get(self, key: str) -> CacheEntry | None:
        entry = self.memory.get_now(key)
        if entry is not None:
            return entry
        entry = await self.remote.get(key)
        if entry is not None and entry.expires_at > time.time():
            self.memory.put_now(key, entry)
            return entry
        return None

    def put(self, key: str, entry: CacheEntry) -> None:
        self.memory.put_now(key, entry)
        self.remote.put(key, entry)

    @property
    def state(self) -> str:
        return self.remote.state

    async def aclose(self) -> None:
        await self.remote.aclose()
        await self.memory.aclose()


class NullStore:
    """``CACHE_BACKEND=off``: nothing is ever found or kept."""

    async def get(self, key: str) -> CacheEntry | None:
        return None

    def put(self, key: str, entry: CacheEntry) -> None:
        return None

    @property
    def state(self) -> str:
        return "off"

    async def aclose(self) -> None:
        return None
