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
from .store import Command, RedisStore

log = logging.getLogger(__name__)

# A lease and a stream are named after their entry with the namespace's ":" turned into "!": the same hash
# tag, so the same node in a cluster, but outside the prefix whose changes every replica is told about.
LEASE_SUFFIX = ":lease"
STREAM_SUFFIX = ":flight"


def lease_key(entry_key: str) -> str:
    namespace, _, rest = entry_key.partition(":")
    return f"{namespace}!{rest}{LEASE_SUFFIX}"


def stream_key(entry_key: str) -> str:
    namespace, _, rest = entry_key.partition(":")
    return f"{namespace}!{rest}{STREAM_SUFFIX}"


# How long a finished flight's stream stays readable for followers that are still catching up.
STREAM_KEEP_MS = 30_000
# Entries a stream holds at most; a follower that finds the first one gone calls the upstream itself.
STREAM_MAX_ENTRIES = 100_000

# A stream entry has one field, "e": a tag byte and its data. S: the answer begins (JSON of status, headers,
# stream); C: a chunk; E: the end, "ok" (2xx, stored), "error" (complete, not 2xx) or "broken"; W: a whole
# plain answer, its end status (o or e), the start's length (4 bytes), the start, then the body.
_EVENT = b"e"

# KEYS: entry, lease, stream; ARGV: token, lease ms, how long entries are kept past their expiry (ms). 1:
# claimed, this replica calls the upstream (on a fresh stream); 0: another replica holds the lease; 2: a fresh
# entry is stored now (one kept only for stale-if-error does not count). A holder whose stream ended in an
# error or broke off is done with the call even if its lease has not lapsed yet: the claim takes it over.
_CLAIM = """
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left > tonumber(ARGV[3]) then return 2 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  local event = last[1][2][2]
  local tag = string.sub(event, 1, 1)
  if not ((tag == 'E' and event ~= 'Eok') or (tag == 'W' and string.sub(event, 2, 2) ~= 'o')) then return 0 end
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
        keys = (key, lease_key(key), stream_key(key))
        try:
            keep_ms = int(self._store.keep_s * 1000)
            (result,) = await self._store.send([("EVAL", _CLAIM, 3, *keys, token, self._lease_ms, keep_ms)])
        except (RedisError, TimeoutError, OSError):
            return Claim.ALONE, ""
        if isinstance(result, Exception):
            self._store.failed("claim", key, result)
            return Claim.ALONE, ""
        return {1: Claim.LEAD, 0: Claim.FOLLOW, 2: Claim.STORED}.get(int(result), Claim.ALONE), token

    def publish(self, key: str, token: str, flight: Flight) -> None:
        """In the background: renew the lease while *flight* runs and write its answer to the stream."""
        self.led += 1
        # Queued at once, ahead of any claim a request arriving next could make: nobody follows a call that
        # was given up.
        flight.on_abandon = partial(self._abandon, key, token)
        task = asyncio.get_running_loop().create_task(self._lead(key, token, flight))
        flight.publication = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lead(self, key: str, token: str, flight: Flight) -> None:
        renewing = _Renewal(self._store, key, token, self._lease_ms)
        stream, lease = stream_key(key), lease_key(key)
        try:
            events: list[bytes] = []
            first = True
            async for items in flight.batches():
                events = [_event(item) for item in items]
                if flight.finished:
                    # The last batch, the end and the release travel together.
                    break
                await self._append(stream, events, expire=first)
                first = False
            else:
                events = []
            ok = flight.complete and 200 <= flight.status < 300
            end = b"ok" if ok else b"error" if flight.complete else b"broken"
            if not flight.is_stream and flight.complete and len(events) == 2:
                events = [_whole(events[0], events[1], ok)]  # a plain answer in one entry
            else:
                events.append(b"E" + end)
            # The call is over: let go at once. Its answer is in the store by now, which a later request reads
            # (or, if it was deleted meanwhile, calls afresh); the stream only serves followers still reading.
            await self._append(stream, events, ("EVAL", _RELEASE, 1, lease, token, 1), expire=True)
        except (RedisError, TimeoutError, OSError):
            _unawaited(self._store.send([("EVAL", _RELEASE, 1, lease, token, 1)]))
        finally:
            renewing.stop()

    def _abandon(self, key: str, token: str) -> None:
        end = ("XADD", stream_key(key), "MAXLEN", "~", STREAM_MAX_ENTRIES, "*", _EVENT, b"Ebroken")
        _unawaited(self._store.send([end, ("EVAL", _RELEASE, 1, lease_key(key), token, 1)]))

    async def _append(self, stream: str, events: list[bytes], *also: Command, expire: bool = False) -> None:
        """Add *events* to *stream*, setting its expiry when *expire*, with *also* after them, in the next
        pipeline; raises what failed."""
        commands: list[Command] = [
            ("XADD", stream, "MAXLEN", "~", STREAM_MAX_ENTRIES, "*", _EVENT, event) for event in events
        ]
        if expire:
            commands.append(("PEXPIRE", stream, STREAM_KEEP_MS))
        for reply in await self._store.send([*commands, *also]):
            if isinstance(reply, Exception):
                raise reply

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
        stream, last, waited, relayed = stream_key(key), b"0-0", 0.0, False
        block_s = self._lease_ms / 1000
        while True:
            try:
                read = partial(self._store.client.xread, {stream: last}, count=512, block=self._lease_ms)
                reply = await self._store.call(read, operation="follow", deadline_s=block_s + self._store.deadline_s)
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
            # A reply is relayed only once read whole: a holder whose call broke off before a follower read
            # anything is left to its fate, and the follower calls the upstream itself.
            items: list[Start | bytes] = []
            for entry_id, fields in _entries(reply):
                event = fields.get(_EVENT, b"")
                tag, data = event[:1], event[1:]
                if last == b"0-0" and tag not in (b"S", b"W"):
                    raise _HolderGone("the stream lost its start")
                last = entry_id
                if tag == b"C":
                    items.append(data)
                elif tag == b"S":
                    items.append(_start(data))
                elif tag == b"W":
                    size = int.from_bytes(data[1:5], "big")
                    items += (_start(data[5 : 5 + size]), data[5 + size :])
                    break
                elif data in (b"ok", b"error"):
                    break
                elif relayed:
                    for item in items:
                        yield item
                    raise _HolderGone("the replica's upstream call broke off")
                else:
                    raise _HolderGone("the replica's upstream call broke off before this replica read it")
            else:
                for item in items:
                    yield item
                relayed = relayed or bool(items)
                continue
            for item in items:
                yield item
            return

    async def _lease_held(self, key: str) -> bool:
        try:
            return bool(await self._store.call(lambda: self._store.client.exists(lease_key(key)), operation="exists"))
        except (RedisError, TimeoutError, OSError) as exc:
            self._store.failed("follow", key, exc)
            return False

    async def drain(self) -> None:
        """Wait for publications in progress to finish (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()


class _Renewal:
    """Renews a lease every third of its length until stopped, on timers rather than a task of its own: most
    calls end before the first renewal is due."""

    def __init__(self, store: RedisStore, key: str, token: str, lease_ms: int) -> None:
        self._store, self._key, self._token, self._lease_ms = store, key, token, lease_ms
        self._handle = asyncio.get_running_loop().call_later(lease_ms / 3000, self._renew)
        self._active = True

    def _renew(self) -> None:
        if self._active:
            renewed = self._store.send([("EVAL", _RENEW, 1, lease_key(self._key), self._token, self._lease_ms)])
            renewed.add_done_callback(self._renewed)

    def _renewed(self, renewed: asyncio.Future[list[Any]]) -> None:
        if renewed.cancelled() or renewed.exception() is not None or not self._active:
            return
        if renewed.result() == [1]:
            self._handle = asyncio.get_running_loop().call_later(self._lease_ms / 3000, self._renew)
        else:
            log.info("lease on an upstream call lost; followers may call it again key=%s", self._key)

    def stop(self) -> None:
        self._active = False
        self._handle.cancel()


def _unawaited(sent: asyncio.Future[list[Any]]) -> None:
    """Let *sent* fail quietly: the store has counted and logged a failed pipeline, and a lease nobody releases
    lapses by itself. Unretrieved, its exception would be reported whenever the future is collected."""
    sent.add_done_callback(lambda done: None if done.cancelled() else done.exception())


class _HolderGone(Exception):
    """The replica holding a call stopped answering for it."""


def _event(item: Start | bytes) -> bytes:
    if isinstance(item, Start):
        return b"S" + orjson.dumps({"status": item.status, "headers": item.headers, "stream": item.is_stream})
    return b"C" + item


def _whole(start: bytes, chunk: bytes, ok: bool) -> bytes:
    meta = start[1:]
    return b"W" + (b"o" if ok else b"e") + len(meta).to_bytes(4, "big") + meta + chunk[1:]


def _start(meta: bytes) -> Start:
    fields = orjson.loads(meta)
    return Start(fields["status"], tuple(tuple(pair) for pair in fields["headers"]), fields["stream"])


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    # XREAD answers [[stream, [(id, {field: value}), ...]]] in RESP2, {stream: [[(id, {...}), ...]]} in RESP3.
    groups = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply]
    found = []
    for entries in groups:
        if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], (list, tuple)):
            entries = entries[0]
        found += [(entry_id, dict(fields)) for entry_id, fields in entries]
    return found
