"""The walk behind ``stats``: every namespace on every master with ``SCAN``, each batch read in one pipeline (the
size, the TTL, and only the first bytes of a plain entry, which hold its metadata), tallied per route."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import redis.asyncio as redis

from .cache_key import parse_key
from .entry import EntryFormatError, peek_meta
from .keyspace import Keyspace, Progress, glob_escape
from .seal import MAGIC as SEALED_MAGIC
from .seal import PlainCodec

# A plain entry's header and metadata nearly always fit; a longer one takes a second read of just its metadata.
PEEK_BYTES = 1024
# Medians come from a uniform sample of at most this many values per route: memory stays bounded on any cache.
SAMPLES = 10_000
WHOLE = -1


class Spread:
    """Exact count, minimum and maximum of values, and their median estimated from a reservoir sample."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.count = 0
        self.low = math.inf
        self.high = -math.inf
        self._sample: list[float] = []

    def add(self, value: float) -> None:
        self.count += 1
        self.low, self.high = min(self.low, value), max(self.high, value)
        if len(self._sample) < SAMPLES:
            self._sample.append(value)
        elif (slot := self._rng.randrange(self.count)) < SAMPLES:
            self._sample[slot] = value

    def summary(self) -> dict[str, float] | None:
        if not self.count:
            return None
        median = statistics.median(self._sample)
        return {"min": round(self.low, 1), "median": round(median, 1), "max": round(self.high, 1)}


@dataclass(slots=True)
class Tally:
    """What one route of one namespace holds. *stale*: past their freshness, kept only for stale-if-error;
    *unknown_age*: entries whose metadata could not be read (sealed without the key, or damaged)."""

    ttl_s: Spread
    age_s: Spread
    entries: int = 0
    bytes: int = 0
    stale: int = 0
    unknown_age: int = 0


@dataclass(slots=True)
class Survey:
    """Everything ``stats`` counts, filled batch by batch."""

    generations: dict[str, int]
    routes: dict[str, dict[str, Tally]] = field(default_factory=lambda: defaultdict(dict))
    old_keys: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    scanned: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def tally(self, namespace: str, route: str) -> Tally:
        routes = self.routes[namespace]
        if route not in routes:
            routes[route] = Tally(Spread(self.rng), Spread(self.rng))
        return routes[route]


async def survey(keyspace: Keyspace) -> Survey:
    """Walk every namespace on every master; progress on stderr when it is a terminal."""
    found = Survey({namespace: await keyspace.generation(namespace) for namespace in keyspace.namespaces})
    progress = Progress()
    try:
        for namespace in keyspace.namespaces:
            for node in keyspace.nodes:
                async for keys in keyspace.scan(node, f"{glob_escape(namespace)}:v2*"):
                    found.scanned += len(keys)
                    await _count(keyspace, node, namespace, keys, found)
                    progress.update(f"stats: {found.scanned} keys read")
    finally:
        progress.done()
    return found


async def _count(keyspace: Keyspace, node: redis.Redis, namespace: str, keys: list[str], found: Survey) -> None:
    named = [(key, parsed) for key in keys if (parsed := parse_key(key, namespace)) is not None]
    async with node.pipeline(transaction=False) as pipe:
        for key, _ in named:
            pipe.memory_usage(key)
            pipe.pttl(key)
            pipe.getrange(key, 0, PEEK_BYTES - 1)
        replies = await keyspace.call(pipe.execute(raise_on_error=False))
    now = time.time()
    current = found.generations[namespace]
    dated: list[tuple[Tally, str, bytes]] = []
    for index, (key, (generation, route, _)) in enumerate(named):
        size, ttl_ms, head = replies[3 * index : 3 * index + 3]
        if isinstance(ttl_ms, int) and ttl_ms == -2:
            continue  # expired between SCAN and the read
        size = size if isinstance(size, int) else 0
        if generation != current:
            old = found.old_keys[namespace]
            old[0], old[1] = old[0] + 1, old[1] + size
            continue
        tally = found.tally(namespace, route)
        tally.entries += 1
        tally.bytes += size
        if isinstance(ttl_ms, int) and ttl_ms >= 0:
            tally.ttl_s.add(ttl_ms / 1000)
        dated.append((tally, key, head if isinstance(head, bytes) else b""))
    times = await _times(keyspace, node, [(key, head) for _, key, head in dated])
    for (tally, _, _), stored_expires in zip(dated, times, strict=True):
        if stored_expires is None:
            tally.unknown_age += 1
            continue
        tally.age_s.add(max(0.0, now - stored_expires[0]))
        tally.stale += stored_expires[1] <= now


async def _times(
    keyspace: Keyspace, node: redis.Redis, heads: list[tuple[str, bytes]]
) -> list[tuple[float, float] | None]:
    """``(stored_at, expires_at)`` of each entry whose key and first bytes are in *heads*; the entries whose
    first bytes do not hold their metadata are read further in one more pipeline."""
    wanted = [(index, key, more) for index, (key, head) in enumerate(heads) if (more := _more(keyspace, head))]
    read: dict[int, bytes] = {}
    if wanted:
        async with node.pipeline(transaction=False) as pipe:
            for _, key, more in wanted:
                pipe.get(key) if more == WHOLE else pipe.getrange(key, 0, more - 1)
            replies = await keyspace.call(pipe.execute(raise_on_error=False))
        read = {index: reply for (index, _, _), reply in zip(wanted, replies, strict=True) if isinstance(reply, bytes)}
    return [_read_times(keyspace, key, read.get(index, head)) for index, (key, head) in enumerate(heads)]


def _more(keyspace: Keyspace, head: bytes) -> int:
    """How many bytes of an entry starting with *head* hold its metadata (:data:`WHOLE`: all of them, since a
    sealed entry opens only whole and authenticated), when *head* is not enough and they can be read; else 0."""
    peeked = peek_meta(head)
    if peeked is not None:
        return peeked[0] if peeked[1] is None else 0
    return WHOLE if head.startswith(SEALED_MAGIC) and not isinstance(keyspace.codec, PlainCodec) else 0


def _read_times(keyspace: Keyspace, key: str, data: bytes) -> tuple[float, float] | None:
    peeked = peek_meta(data)
    if peeked is not None:
        try:
            return (float(peeked[1]["stored_at"]), float(peeked[1]["expires_at"])) if peeked[1] else None
        except (KeyError, TypeError, ValueError):
            return None
    if not data.startswith(SEALED_MAGIC) or isinstance(keyspace.codec, PlainCodec):
        return None
    try:
        entry = keyspace.codec.decode(key, data)
    except EntryFormatError:
        return None
    return entry.stored_at, entry.expires_at
