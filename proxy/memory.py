"""Stores in this process: a bounded LRU, the tiered store (that LRU in front of Redis), and the null store."""

from __future__ import annotations

import time
from collections import OrderedDict

from .entry import CacheEntry
from .store import RedisStore

# Cost of an entry's Python objects beside its body (headers, strings, dataclass, dict slot), so that the byte
# bound is close to the memory really used.
_ENTRY_OVERHEAD_BYTES = 1536
# Keys remembered as recently invalidated; past this many, a flush is cheaper than remembering.
_MAX_INVALIDATED = 10_000
# How long after writing a key this replica takes Redis's report of that write for an echo of its own.
_ECHO_WITHIN_S = 1.0


class MemoryStore:
    """A bounded LRU of entries in this process, by entry count and by bytes, honouring each expiry; an entry is
    kept *keep_s* past it (for stale-if-error), and the caller judges its freshness."""

    def __init__(self, max_entries: int, max_bytes: int, keep_s: float = 0) -> None:
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._keep_s = keep_s
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_now(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at + self._keep_s <= time.time():
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

    def drop(self, key: str) -> None:
        """Forget *key*, if held."""
        if key in self._entries:
            self._drop(key)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.body) + _ENTRY_OVERHEAD_BYTES

    async def get(self, key: str) -> CacheEntry | None:
        return self.get_now(key)

    def hot(self, key: str) -> CacheEntry | None:
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

    A hot entry costs no Redis round trip; a Redis hit is promoted into memory until its own expiry.

    Across replicas the tier is kept coherent by :meth:`invalidate`, which drops what Redis reports as
    written, deleted or expired elsewhere. Until the first report arrives, and whenever the reports stop while
    Redis itself answers, the tier is not :attr:`coherent` and is bypassed. While Redis is unavailable there is
    nothing to be incoherent with, and the tier keeps serving this replica's repeats.
    """

    def __init__(self, memory: MemoryStore, remote: RedisStore, *, coherent: bool = True) -> None:
        self.memory = memory
        self.remote = remote
        self.coherent = coherent
        # Invalidations counted, and the count at each key's last one and at the last flush: a lookup that began
        # before an invalidation of its key must not promote the value it read.
        self._epoch = 0
        self._flushed_at = 0
        self._invalidated: dict[str, int] = {}
        # Redis reports this replica's own writes too; the copy just written here is not stale. An echo expected
        # but never come (the write failed) stops masking after a second.
        self._echoes: dict[str, float] = {}

    def _trusted(self) -> bool:
        return self.coherent or not self.remote.available

    def hot(self, key: str) -> CacheEntry | None:
        return self.memory.get_now(key) if self._trusted() else None

    async def get(self, key: str) -> CacheEntry | None:
        trusted = self._trusted()
        if trusted:
            entry = self.memory.get_now(key)
            if entry is not None:
                return entry
        began = self._epoch
        entry = await self.remote.get(key)
        if entry is None and not trusted and not self.remote.available:
            # Redis failed just now: with nothing to be incoherent with, the copy here is the best there is.
            return self.memory.get_now(key)
        if entry is None:
            return None
        now = time.time()
        if entry.expires_at + self.remote.keep_s <= now:
            return None
        fresh = entry.expires_at > now
        if fresh and trusted and self._flushed_at <= began and self._invalidated.get(key, 0) <= began:
            self.memory.put_now(key, entry)
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        if self._trusted():
            self.memory.put_now(key, entry)
            if self.coherent:
                if len(self._echoes) > _MAX_INVALIDATED:
                    self._echoes.clear()
                self._echoes[key] = time.monotonic() + _ECHO_WITHIN_S
        self.remote.put(key, entry)

    def invalidate(self, keys: list[bytes] | None) -> None:
        """Drop *keys* (as Redis names them), or everything when ``None``: they changed in Redis."""
        self._epoch += 1
        if keys is None or len(self._invalidated) > _MAX_INVALIDATED:
            self.memory.clear()
            self._invalidated.clear()
            self._echoes.clear()
            self._flushed_at = self._epoch
            return
        now = time.monotonic()
        for raw in keys:
            key = raw.decode("utf-8", "replace")
            if self._echoes.pop(key, 0.0) >= now:
                continue
            self.memory.drop(key)
            self._invalidated[key] = self._epoch

    def trust(self, coherent: bool) -> None:
        self.coherent = coherent

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

    def hot(self, key: str) -> CacheEntry | None:
        return None

    def put(self, key: str, entry: CacheEntry) -> None:
        return None

    @property
    def state(self) -> str:
        return "off"

    async def aclose(self) -> None:
        return None
