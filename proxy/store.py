"""The CacheStore protocol, and RedisStore: entries in Redis, batched per event-loop turn, failing open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from .entry import CacheEntry, EntryFormatError
from .redis_client import RedisClient
from .seal import EntryCodec, ForeignEntryError, PlainCodec

log = logging.getLogger(__name__)
T = TypeVar("T")


class CacheStore(Protocol):
    """Where entries live. ``get`` never raises for backend trouble: trouble reads as a miss."""

    async def get(self, key: str) -> CacheEntry | None: ...

    def put(self, key: str, entry: CacheEntry) -> None:
        """Store *entry* until ``entry.expires_at``; returns at once, writing in the background."""

    @property
    def state(self) -> str:
        """``ok``, ``degraded`` (serving from memory while Redis is away) or ``off``."""

    async def aclose(self) -> None: ...


class RedisStore:
    """Entries in Redis through redis-py's public client of any deployment: lookups as ``MGET`` (per slot in a
    cluster), stores as a pipeline of ``SET ... PX``, batched per event-loop turn.

    Lookups (and stores) issued in the same turn of the event loop, as under concurrent load, travel
    together: one round trip (per node in a cluster). A lone lookup is still one round trip.

    Every batch, waiting for a connection included, has the deadline *op_timeout_s*; its lookups then read as
    misses. After a failure Redis is left alone for *retry_after_s*, so that a dead or slow Redis costs one
    timeout, not one per request; the next operation after that probes it again.

    *codec* turns entries into stored bytes and back (:class:`~proxy.seal.SealingCodec` seals them); bytes it
    cannot read are a miss.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        op_timeout_s: float,
        retry_after_s: float,
        max_in_flight: int = 64,
        codec: EntryCodec | None = None,
    ) -> None:
        self.client = client
        self._mget = client.mget_nonatomic if isinstance(client, RedisCluster) else client.mget
        self._codec = codec or PlainCodec()
        # At most as many batches in flight as the pool has connections, so the pool never runs dry.
        self._slots = asyncio.Semaphore(max_in_flight)
        self.deadline_s = op_timeout_s
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._failing = False
        self._lookups: list[tuple[str, asyncio.Future[CacheEntry | None]]] = []
        self._stores: list[tuple[str, bytes, int]] = []
        self._tasks: set[asyncio.Task[None]] = set()
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
        loop = asyncio.get_running_loop()
        found: asyncio.Future[CacheEntry | None] = loop.create_future()
        self._lookups.append((key, found))
        if len(self._lookups) == 1:
            loop.call_soon(self._flush_lookups)
        # The batch owns the deadline; shield keeps one cancelled request from failing the others' batch.
        return await asyncio.shield(found)

    def put(self, key: str, entry: CacheEntry) -> None:
        if not self.available:
            return
        ttl_ms = int((entry.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        self._stores.append((key, self._codec.encode(key, entry), ttl_ms))
        if len(self._stores) == 1:
            asyncio.get_running_loop().call_soon(self._flush_stores)

    def _flush_lookups(self) -> None:
        batch, self._lookups = self._lookups, []
        self._spawn(self._lookup(batch))

    def _flush_stores(self) -> None:
        batch, self._stores = self._stores, []
        self._spawn(self._store(batch))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, batch: list[tuple[str, asyncio.Future[CacheEntry | None]]]) -> None:
        keys = [key for key, _ in batch]
        values: list[Any] = [None] * len(batch)
        try:
            values = await self.call(lambda: self._mget(keys))
        except (RedisError, TimeoutError, OSError) as exc:
            self.failed("read", keys[0], exc)
        finally:
            for (key, found), raw in zip(batch, values, strict=True):
                if not found.done():
                    found.set_result(self._parse(key, raw))

    async def _store(self, batch: list[tuple[str, bytes, int]]) -> None:
        async def write() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value, ttl_ms in batch:
                    pipe.set(key, value, px=ttl_ms)
                for result in await pipe.execute(raise_on_error=False):
                    if isinstance(result, Exception):
                        raise result

        try:
            await self.call(write)
        except (RedisError, TimeoutError, OSError) as exc:
            self.failed("write", batch[0][0], exc)

    async def call(self, operation: Callable[[], Awaitable[T]], *, deadline_s: float | None = None) -> T:
        """Run *operation* (one round trip on :attr:`client`) within a deadline (*op_timeout_s* unless
        given) and a connection slot; raises what it raises, ``TimeoutError`` past the deadline. The caller
        reports a failure with :meth:`failed`."""
        async with asyncio.timeout(deadline_s or self.deadline_s), self._slots:
            result = await operation()
        if self._failing:
            self._recovered()
        return result

    def _parse(self, key: str, raw: Any) -> CacheEntry | None:
        if raw is None:
            return None
        try:
            # decode_responses stays False, so replies are bytes; a str here would be a misconfigured client.
            return self._codec.decode(key, raw if isinstance(raw, bytes) else str(raw).encode())
        except ForeignEntryError as exc:
            # Expected for one TTL after encryption is turned on or off or its key changes: not worth a warning.
            log.debug("cache entry not readable with this configuration; treated as a miss key=%s error=%s", key, exc)
            return None
        except EntryFormatError as exc:
            log.warning("cache entry unreadable; treated as a miss key=%s error=%s", key, exc)
            return None

    def failed(self, op: str, key: str, exc: BaseException, *, quiet: bool = False) -> None:
        """Count a failed Redis operation and leave Redis alone for *retry_after_s*."""
        self.errors += 1
        # One warning per outage, not one per probe: a laptop without Redis must not drown in them.
        level = logging.DEBUG if self._failing or quiet else logging.WARNING
        log.log(
            level,
            "redis %s failed; serving without it, next try in %.1fs key=%s error=%s: %s",
            op,
            self._retry_after_s,
            key,
            type(exc).__name__,
            exc,
        )
        self._failing = True
        self._down_until = time.monotonic() + self._retry_after_s

    def _recovered(self) -> None:
        self._failing = False
        log.info("redis answers again; shared cache in use")

    async def ping(self, *, quiet: bool = False) -> bool:
        """One deadline-bound PING; a failure pauses Redis use like any other, logged at DEBUG when *quiet*.
        Never on the request path."""
        try:
            await self.call(self.client.ping)
        except (RedisError, TimeoutError, OSError) as exc:
            self.failed("ping", "-", exc, quiet=quiet)
            return False
        return True

    async def drain(self) -> None:
        """Wait for batches queued or in flight (shutdown, tests)."""
        while self._tasks or self._stores or self._lookups:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)

    async def aclose(self) -> None:
        await self.drain()
