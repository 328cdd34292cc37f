"""Single-flight across replicas: the replica that calls the upstream holds a short lease in Redis and publishes
the answer as it arrives to a Redis Stream, which the other replicas read live.

Why a Stream: ``XREAD BLOCK`` tells a follower the moment something arrives (no polling loop), a follower that
comes late reads from the first entry and still gets every byte, a stream is capped (``MAXLEN``) and expires on
its own, and in a cluster the lease, the stream and the entry share their key's hash tag, so they live on the
node that holds the entry. Pub/Sub would lose whatever was published before a follower subscribed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import Any

import orjson
from redis.exceptions import RedisError

from .errors import UpstreamUnreachable
from .flight import Flight, Start
from .store import RedisStore

log = logging.getLogger(__name__)

LEASE_SUFFIX = ":lease"
STREAM_SUFFIX = ":flight"
# How long a finished flight's stream stays readable for followers that are still catching up.
STREAM_KEEP_MS = 30_000
# Entries a stream holds at most; a follower that finds the first one gone calls the upstream itself.
STREAM_MAX_ENTRIES = 100_000

# KEYS: entry, lease, stream. 1: claimed, this replica calls the upstream (on a fresh stream); 0: another
# replica holds the lease; 2: the entry is stored now. A holder whose stream ended in an error or broke off is
# done with the call even if its lease has not lapsed yet: the claim takes it over.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if #last == 0 or last[1][2][2] ~= 'end' or last[1][2][4] == 'ok' then return 0 end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
redis.call('DEL', KEYS[3])
return 1
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class Claim(enum.Enum):
    """What a replica that found no entry should do."""

    LEAD = "lead"  # call the upstream and publish the answer
    FOLLOW = "follow"  # another replica is calling: read its stream
    STORED = "stored"  # the entry appeared meanwhile: look it up again
    ALONE = "alone"  # Redis is away: call the upstream without coordination


class Fleet:
    """Claims, leads and follows upstream calls for one proxy process.

    The leader renews its lease every third of *lease_s* while its call runs; a replica that dies frees the
    call once its lease runs out. A follower waits at most *wait_s* for the first event, and gives up on a
    holder whose lease is gone; then it calls the upstream itself: single-flight may save money, never
    availability. Every Redis call goes through the store, so failures count and pause Redis use alike.
    """

    def __init__(self, store: RedisStore, *, lease_s: float, wait_s: float) -> None:
        self._store = store
        client = store.client
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._lease_ms = max(1, int(lease_s * 1000))
        self._wait_s = wait_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.led = 0
        self.followed = 0

    async def claim(self, key: str) -> tuple[Claim, str]:
        """Claim the upstream call for entry *key*; returns the :class:`Claim` and the lease token."""
        if not self._store.available:
            return Claim.ALONE, ""
        token = secrets.token_hex(8)
        try:
            result = await self._store.call(
                lambda: self._claim(keys=[key, key + LEASE_SUFFIX, key + STREAM_SUFFIX], args=[token, self._lease_ms])
            )
        except (RedisError, TimeoutError, OSError) as exc:
            self._store.failed("claim", key, exc)
            return Claim.ALONE, ""
        return {1: Claim.LEAD, 0: Claim.FOLLOW, 2: Claim.STORED}.get(int(result), Claim.ALONE), token

    def publish(self, key: str, token: str, flight: Flight) -> None:
        """In the background: renew the lease while *flight* runs and write its answer to the stream."""
        self.led += 1
        task = asyncio.get_running_loop().create_task(self._lead(key, token, flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lead(self, key: str, token: str, flight: Flight) -> None:
        renewing = asyncio.get_running_loop().create_task(self._keep_lease(key, token))
        stream = key + STREAM_SUFFIX
        try:
            async for items in flight.batches():
                await self._append(stream, [_entry(item) for item in items])
            ok = flight.complete and 200 <= flight.status < 300
            end = b"ok" if ok else b"error" if flight.complete else b"broken"
            # The call is over: let go at once. Its answer is in the store by now, which a later request reads
            # (or, if it was deleted meanwhile, calls afresh); the stream only serves followers still reading.
            await self._append(stream, [(b"end", end)], release=(token, 1))
        except (RedisError, TimeoutError, OSError) as exc:
            self._store.failed("publish", key, exc)
            await self._let_go(key, token, keep_ms=1)
        finally:
            renewing.cancel()

    async def _keep_lease(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                renewed = await self._store.call(
                    lambda: self._renew(keys=[key + LEASE_SUFFIX], args=[token, self._lease_ms])
                )
            except (RedisError, TimeoutError, OSError) as exc:
                self._store.failed("renew", key, exc)
                return
            if not renewed:
                log.info("lease on an upstream call lost; followers may call it again key=%s", key)
                return

    async def _append(
        self, stream: str, batch: list[tuple[bytes, bytes]], *, release: tuple[str, int] | None = None
    ) -> None:
        """Add *batch* to *stream* in one round trip; with *release* (token, milliseconds to keep the lease),
        let go of the lease in the same one."""
        lease = stream.removesuffix(STREAM_SUFFIX) + LEASE_SUFFIX

        async def write() -> None:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for kind, data in batch:
                    pipe.xadd(stream, {b"k": kind, b"d": data}, maxlen=STREAM_MAX_ENTRIES, approximate=True)
                pipe.pexpire(stream, STREAM_KEEP_MS)
                if release is not None:
                    pipe.eval(_RELEASE, 1, lease, *release)
                for result in await pipe.execute(raise_on_error=False):
                    if isinstance(result, Exception):
                        raise result

        await self._store.call(write)

    async def _let_go(self, key: str, token: str, *, keep_ms: int) -> None:
        try:
            await self._store.call(lambda: self._release(keys=[key + LEASE_SUFFIX], args=[token, keep_ms]))
        except (RedisError, TimeoutError, OSError) as exc:
            self._store.failed("release", key, exc)

    async def follow(
        self, key: str, own_call: Callable[[], AsyncGenerator[Start | bytes, None]]
    ) -> AsyncGenerator[Start | bytes, None]:
        """The answer of the replica holding *key*'s call, event by event as it publishes them; or, when that
        replica is gone or silent before its first event, *own_call*'s answer. Raises
        :class:`UpstreamUnreachable` when the holder breaks off after events were relayed."""
        self.followed += 1
        relayed = False
        try:
            async for item in self._read(key):
                relayed = True
                yield item
            return
        except _HolderGone as gone:
            if relayed:
                raise UpstreamUnreachable("the replica calling the upstream broke off") from None
            log.info("calling the upstream ourselves; %s key=%s", gone, key)
        async for item in own_call():
            yield item

    async def _read(self, key: str) -> AsyncGenerator[Start | bytes, None]:
        stream, last, waited = key + STREAM_SUFFIX, b"0-0", 0.0
        block_s = self._lease_ms / 1000
        while True:
            try:
                read = partial(self._store.client.xread, {stream: last}, count=512, block=self._lease_ms)
                reply = await self._store.call(read, deadline_s=block_s + self._store.deadline_s)
            except (RedisError, TimeoutError, OSError) as exc:
                self._store.failed("follow", key, exc)
                raise _HolderGone("redis failed") from None
            if not reply:
                waited += block_s
                if last == b"0-0" and waited >= self._wait_s:
                    raise _HolderGone("no answer within the wait")
                if not await self._lease_held(key):
                    raise _HolderGone("the replica holding the call is gone")
                continue
            for entry_id, fields in _entries(reply):
                if last == b"0-0" and fields.get(b"k") != b"start":
                    raise _HolderGone("the stream lost its start")
                last = entry_id
                kind, data = fields.get(b"k"), fields.get(b"d", b"")
                if kind == b"start":
                    meta = orjson.loads(data)
                    yield Start(meta["status"], tuple(tuple(pair) for pair in meta["headers"]), meta["stream"])
                elif kind == b"chunk":
                    yield data
                elif data in (b"ok", b"error"):
                    return
                else:
                    raise _HolderGone("the replica's upstream call broke off")

    async def _lease_held(self, key: str) -> bool:
        try:
            return bool(await self._store.call(lambda: self._store.client.exists(key + LEASE_SUFFIX)))
        except (RedisError, TimeoutError, OSError) as exc:
            self._store.failed("follow", key, exc)
            return False

    async def drain(self) -> None:
        """Wait for publications in progress to finish (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()


class _HolderGone(Exception):
    """The replica holding a call stopped answering for it."""


def _entry(item: Start | bytes) -> tuple[bytes, bytes]:
    if isinstance(item, Start):
        return b"start", orjson.dumps({"status": item.status, "headers": item.headers, "stream": item.is_stream})
    return b"chunk", item


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    # XREAD answers [[stream, [(id, {field: value}), ...]]] in RESP2, {stream: [[(id, {...}), ...]]} in RESP3.
    groups = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply]
    found = []
    for entries in groups:
        if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], (list, tuple)):
            entries = entries[0]
        found += [(entry_id, dict(fields)) for entry_id, fields in entries]
    return found
