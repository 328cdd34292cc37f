"""The CacheStore protocol, and RedisStore: entries in Redis, batched per event-loop turn, failing open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from .entry import CacheEntry, EntryFormatError
from .metrics import Metrics
from .redis_client import RedisClient
from .seal import EntryCodec, ForeignEntryError, PlainCodec

log = logging.getLogger(__name__)
T = TypeVar("T")
# One Redis command: its name, then its arguments.
Command = tuple[Any, ...]


def kept_ms(entry: CacheEntry, keep_s: float, now: float) -> int:
    """How long Redis keeps *entry* from *now*: until it expires, then *keep_s* more for stale-if-error."""
    return int((entry.expires_at + keep_s - now) * 1000)


class CacheStore(Protocol):
    """Where entries live. ``get`` never raises for backend trouble: trouble reads as a miss."""

    async def get(self, key: str) -> CacheEntry | None: ...

    def hot(self, key: str) -> CacheEntry | None:
        """The entry for *key* if this process holds it and may serve it without asking anyone: what
        :meth:`get` would return, without awaiting; ``None`` says nothing about Redis."""

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

    Redis keeps an entry *keep_s* past its expiry (for stale-if-error); the caller judges its freshness.

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
        keep_s: float = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self._metrics = metrics or Metrics()
        self.keep_s = keep_s
        self._mget = client.mget_nonatomic if isinstance(client, RedisCluster) else client.mget
        self._codec = codec or PlainCodec()
        # At most as many batches in flight as the pool has connections, so the pool never runs dry.
        self._slots = asyncio.Semaphore(max_in_flight)
        self.deadline_s = op_timeout_s
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._failing = False
        self._lookups: list[tuple[str, asyncio.Future[CacheEntry | None]]] = []
        self._sends: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def errors(self) -> int:
        """Failed Redis operations so far, as counted in the metrics."""
        return sum(self._metrics.redis_errors.values())

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    @property
    def state(self) -> str:
        return "ok" if self.available else "degraded"

    def hot(self, key: str) -> CacheEntry | None:
        return None

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
        ttl_ms = kept_ms(entry, self.keep_s, time.time())
        if ttl_ms > 0:
            written = self.send([("SET", key, self._codec.encode(key, entry), "PX", ttl_ms)])
            written.add_done_callback(partial(self._check_written, key))

    def _check_written(self, key: str, written: asyncio.Future[list[Any]]) -> None:
        # A failed pipeline was reported already; a refused write (out of memory, a read-only replica) is not.
        if written.cancelled() or written.exception() is not None:
            return
        for reply in written.result():
            if isinstance(reply, RedisError):
                self.failed("write", key, reply)

    def send(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """Queue *commands* for one pipeline with everything else queued in this turn of the event loop (one
        round trip per node for all of it); the future gets their replies in order, a reply that is an error
        as the exception. The pipeline has the deadline *op_timeout_s*; if it fails, every future gets the
        exception, and Redis is left alone for *retry_after_s*."""
        loop = asyncio.get_running_loop()
        replies: asyncio.Future[list[Any]] = loop.create_future()
        self._sends.append((commands, replies))
        if len(self._sends) == 1:
            loop.call_soon(self._flush_sends)
        return replies

    def _flush_lookups(self) -> None:
        batch, self._lookups = self._lookups, []
        self._spawn(self._lookup(batch))

    def _flush_sends(self) -> None:
        batch, self._sends = self._sends, []
        self._spawn(self._pipeline(batch))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, batch: list[tuple[str, asyncio.Future[CacheEntry | None]]]) -> None:
        keys = [key for key, _ in batch]
        values: list[Any] = [None] * len(batch)
        try:
            values = await self.call(lambda: self._mget(keys), operation="read")
        except (RedisError, TimeoutError, OSError) as exc:
            self.failed("read", keys[0], exc)
        finally:
            for (key, found), raw in zip(batch, values, strict=True):
                if not found.done():
                    found.set_result(self._parse(key, raw))

    async def _pipeline(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        async def execute() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for commands, _ in batch:
                    for command in commands:
                        pipe.execute_command(*command)
                return await pipe.execute(raise_on_error=False)

        try:
            replies = await self.call(execute, operation="write")
        except (RedisError, TimeoutError, OSError) as exc:
            self.failed("write", "-", exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                if not future.done():
                    future.cancel()
            raise
        start = 0
        for commands, future in batch:
            if not future.done():
                future.set_result(replies[start : start + len(commands)])
            start += len(commands)

    async def call(
        self, round_trip: Callable[[], Awaitable[T]], *, operation: str, deadline_s: float | None = None
    ) -> T:
        """Run *round_trip* (one round trip on :attr:`client`) within a deadline (*op_timeout_s* unless
        given) and a connection slot, timed as *operation*; raises what it raises, ``TimeoutError`` past the
        deadline. The caller reports a failure with :meth:`failed`."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(deadline_s or self.deadline_s), self._slots:
                result = await round_trip()
        finally:
            self._metrics.redis_durations.observe((operation,), time.perf_counter() - started)
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
        self._metrics.redis_errors[(op,)] += 1
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
            await self.call(self.client.ping, operation="ping")
        except (RedisError, TimeoutError, OSError) as exc:
            self.failed("ping", "-", exc, quiet=quiet)
            return False
        return True

    async def drain(self) -> None:
        """Wait for batches queued or in flight (shutdown, tests)."""
        while self._tasks or self._sends or self._lookups:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)

    async def aclose(self) -> None:
        await self.drain()
