"""The CacheStore protocol, and RedisStore: entries in Redis, batched per event-loop turn, failing open."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .entry import CacheEntry, EntryFormatError
from .seal import EntryCodec, ForeignEntryError, PlainCodec

log = logging.getLogger(__name__)


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
    """Entries in Redis: lookups as ``MGET``, stores as ``SET ... PX``, batched per event-loop turn.

    Lookups (and stores) issued in the same turn of the event loop, as under concurrent load, travel
    together: one write and one round trip on one pooled connection. A lone lookup is still one round trip.
    The batches go straight through redis-py's connections and hiredis parser, skipping its per-command
    client machinery, which costs far more than the batch itself.

    Every batch, waiting for a connection included, has the deadline *op_timeout_s*. A batch that fails
    or times out drops its connection, so no reply is ever left unread on a pooled one, and its lookups
    read as misses. After a failure Redis is left alone for *retry_after_s*, so that a dead or slow Redis
    costs one timeout, not one per request; the next operation after that probes it again.

    *codec* turns entries into stored bytes and back (:class:`~proxy.seal.SealingCodec` seals them); bytes it
    cannot read are a miss.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        op_timeout_s: float,
        retry_after_s: float,
        max_in_flight: int = 64,
        codec: EntryCodec | None = None,
    ) -> None:
        self._client = client
        self._codec = codec or PlainCodec()
        # At most as many batches in flight as the pool has connections, so the pool never runs dry.
        self._slots = asyncio.Semaphore(max_in_flight)
        self._deadline_s = op_timeout_s
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
        try:
            (values,) = await self._execute([("MGET", *(key for key, _ in batch))])
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed("read", batch[0][0], exc)
            values = [None] * len(batch)
        except BaseException:
            for _, found in batch:
                if not found.done():
                    found.set_result(None)
            raise
        for (key, found), raw in zip(batch, values, strict=True):
            if not found.done():
                found.set_result(self._parse(key, raw))

    async def _store(self, batch: list[tuple[str, bytes, int]]) -> None:
        try:
            await self._execute([("SET", key, value, "PX", ttl_ms) for key, value, ttl_ms in batch])
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed("write", batch[0][0], exc)

    async def _execute(self, commands: list[tuple[str | bytes | int, ...]]) -> list[Any]:
        """Send *commands* in one write on one pooled connection and return their replies in order.

        A connection error on a reused connection is retried once on a fresh one: after a Redis restart
        every pooled connection is stale. A reply that is a Redis error raises it.
        """
        pool = self._client.connection_pool
        async with asyncio.timeout(self._deadline_s), self._slots:
            for attempt in (1, 2):
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                try:
                    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                    replies = [await conn.read_response() for _ in commands]
                except RedisConnectionError:
                    await conn.disconnect(nowait=True)
                    if attempt == 2:
                        raise
                    continue
                except BaseException:
                    await conn.disconnect(nowait=True)
                    raise
                finally:
                    await pool.release(conn)
                if self._failing:
                    self._recovered()
                return replies
        raise AssertionError("unreachable")

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

    def _failed(self, op: str, key: str, exc: BaseException, *, quiet: bool = False) -> None:
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
            await self._execute([("PING",)])
        except (RedisError, TimeoutError, OSError) as exc:
            self._failed("ping", "-", exc, quiet=quiet)
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
