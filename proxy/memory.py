"""Stores in this process: a bounded LRU, the tiered store (that LRU in front of Redis), and the null store."""

from __future__ import annotations

import time
from collections import OrderedDict

from .entry import CacheEntry
from .store import RedisStore

# Cost of an entry's Python objects beside its body (headers, strings, dataclass, dict slot), so that the byte
# bound is close to the memory really used.
_ENTRY_OVERHEAD_BYTES = 1536


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
