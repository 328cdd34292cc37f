"""``stats``: entries, bytes, TTL and age per namespace and route, walked with ``SCAN`` on every master and read in
pipelined batches (the size, the TTL, and only the first bytes of a plain entry), plus Redis's memory and, from a
replica's ``/metrics``, the hit rate."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import redis.asyncio as redis

from .cache_key import parse_key
from .entry import EntryFormatError, peek_meta
from .keyspace import Keyspace, Progress, glob_escape, node_name
from .seal import MAGIC as SEALED_MAGIC
from .seal import PlainCodec

# A plain entry's header and metadata nearly always fit; a longer one takes a second read of just its metadata.
PEEK_BYTES = 1024
# Medians come from a uniform sample of at most this many values per route: memory stays bounded on any cache.
SAMPLES = 10_000


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
        times = await _times(keyspace, node, key, head if isinstance(head, bytes) else b"")
        if times is None:
            tally.unknown_age += 1
            continue
        tally.age_s.add(max(0.0, now - times[0]))
        tally.stale += times[1] <= now


async def _times(keyspace: Keyspace, node: redis.Redis, key: str, head: bytes) -> tuple[float, float] | None:
    """``(stored_at, expires_at)`` of an entry whose first bytes are *head*, reading more only when needed."""
    peeked = peek_meta(head)
    if peeked is not None and peeked[1] is None:
        more = await keyspace.call(node.getrange(key, 0, peeked[0] - 1))
        peeked = peek_meta(more if isinstance(more, bytes) else b"")
    if peeked is not None and peeked[1] is not None:
        meta = peeked[1]
        try:
            return float(meta["stored_at"]), float(meta["expires_at"])
        except (KeyError, TypeError, ValueError):
            return None
    if not head.startswith(SEALED_MAGIC) or isinstance(keyspace.codec, PlainCodec):
        return None
    # Sealed metadata is readable only with the whole value, authenticated.
    raw = await keyspace.read(node, key)
    try:
        entry = keyspace.codec.decode(key, raw) if raw is not None else None
    except EntryFormatError:
        return None
    return (entry.stored_at, entry.expires_at) if entry else None


async def memory(keyspace: Keyspace) -> list[dict[str, Any]]:
    """``INFO memory`` of every master: what Redis uses, its limit and its eviction policy."""
    nodes = []
    for node in keyspace.nodes:
        info = await keyspace.call(node.info("memory"))
        nodes.append(
            {
                "node": await keyspace.call(node_name(node)),
                "used_memory": info.get("used_memory"),
                "used_memory_human": info.get("used_memory_human"),
                "maxmemory": info.get("maxmemory"),
                "maxmemory_policy": info.get("maxmemory_policy"),
            }
        )
    return nodes


def report(found: Survey) -> dict[str, Any]:
    """*found* as JSON-ready values, per namespace and route."""
    namespaces: dict[str, Any] = {}
    for namespace, generation in found.generations.items():
        routes = {
            route: {
                "entries": tally.entries,
                "bytes": tally.bytes,
                "stale": tally.stale,
                "unknown_age": tally.unknown_age,
                "ttl_s": tally.ttl_s.summary(),
                "age_s": tally.age_s.summary(),
            }
            for route, tally in sorted(found.routes[namespace].items())
        }
        old_keys, old_bytes = found.old_keys.get(namespace, [0, 0])
        namespaces[namespace] = {
            "generation": generation,
            "entries": sum(route["entries"] for route in routes.values()),
            "bytes": sum(route["bytes"] for route in routes.values()),
            "routes": routes,
            "old_generation_keys": old_keys,
            "old_generation_bytes": old_bytes,
        }
    return {"namespaces": namespaces, "scanned_keys": found.scanned}


async def stats(keyspace: Keyspace, *, as_json: bool, metrics_url: str | None) -> int:
    """Print the survey, Redis's memory and the hit rate; 1 when the metrics cannot be read."""
    found = report(await survey(keyspace))
    found["redis"] = await memory(keyspace)
    found["hit_rate"] = await hit_rate(metrics_url) if metrics_url else None
    print(orjson.dumps(found).decode() if as_json else render(found), end="" if not as_json else "\n")
    return 0


async def hit_rate(metrics_url: str) -> dict[str, Any]:
    """The cache outcomes a replica counted since it started (``llm_cache_requests_total`` on its
    ``/metrics``), and the share of lookups answered from the cache. The counters live in each replica's
    memory, not in Redis: this is one replica's view."""
    from prometheus_client.parser import text_string_to_metric_families

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(metrics_url) as response:
        response.raise_for_status()
        text = await response.text()
    outcomes: defaultdict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name == "llm_cache_requests":
            for sample in family.samples:
                if sample.name == "llm_cache_requests_total":
                    outcomes[sample.labels.get("outcome", "")] += sample.value
    looked_up = sum(outcomes.get(name, 0.0) for name in ("HIT", "STALE", "MISS", "COALESCED"))
    served = outcomes.get("HIT", 0.0) + outcomes.get("STALE", 0.0)
    return {
        "source": metrics_url,
        "outcomes": {name: int(value) for name, value in sorted(outcomes.items())},
        "ratio": round(served / looked_up, 4) if looked_up else None,
    }


def render(found: dict[str, Any]) -> str:
    """The ``stats`` report as text: a table per namespace, then Redis and the hit rate."""
    lines = []
    for namespace, summary in found["namespaces"].items():
        lines.append(
            f"namespace {namespace} (generation {summary['generation']}): {summary['entries']} entries, "
            f"{_size(summary['bytes'])}"
        )
        lines.append(
            f"  {'route':<18} {'entries':>8} {'bytes':>10} {'stale':>6}  {'TTL min/median/max':<22} age min/median/max"
        )
        for route, tally in summary["routes"].items():
            lines.append(
                f"  {route:<18} {tally['entries']:>8} {_size(tally['bytes']):>10} {tally['stale']:>6}  "
                f"{_spread(tally['ttl_s']):<22} {_spread(tally['age_s'])}"
                + (f" ({tally['unknown_age']} unreadable)" if tally["unknown_age"] else "")
            )
        if summary["old_generation_keys"]:
            lines.append(
                f"  earlier generations: {summary['old_generation_keys']} keys, "
                f"{_size(summary['old_generation_bytes'])}, never served; reclaimed by purge or their TTL"
            )
    for node in found["redis"]:
        limit = _size(node["maxmemory"]) if node["maxmemory"] else "no limit"
        lines.append(
            f"redis {node['node']}: {node['used_memory_human']} used, maxmemory {limit} ({node['maxmemory_policy']})"
        )
    rate = found["hit_rate"]
    if rate is None:
        lines.append("hit rate: counted by each replica in memory, not in Redis; see llm_cache_requests_total on its")
        lines.append("  /metrics, or pass --metrics-url http://<replica>/metrics")
    else:
        shown = f"{100 * rate['ratio']:.1f}%" if rate["ratio"] is not None else "no lookups yet"
        counts = " ".join(f"{name}={count}" for name, count in rate["outcomes"].items())
        lines.append(f"hit rate: {shown} ({counts}) at {rate['source']}, since that replica started")
    return "\n".join(lines) + "\n"


def _spread(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    return " / ".join(_duration(summary[name]) for name in ("min", "median", "max"))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
