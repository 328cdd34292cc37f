"""``stats``: entries, bytes, TTL and age per namespace and route (see :mod:`proxy.survey`), Redis's memory and, from
a replica's ``/metrics``, the hit rate; as text or JSON."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import aiohttp
import orjson

from .commands import fail
from .keyspace import Keyspace, node_name
from .survey import Survey, survey


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
    """Print the survey, Redis's memory and the hit rate; 1 when the metrics cannot be read (the rest is printed
    all the same)."""
    rate, status = None, 0
    if metrics_url:
        try:
            rate = await hit_rate(metrics_url)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            fail(f"metrics unreadable at {metrics_url}: {type(exc).__name__}: {exc}")
            status = 1
    found = report(await survey(keyspace))
    found["redis"] = await memory(keyspace)
    found["hit_rate"] = rate
    print(orjson.dumps(found).decode() if as_json else render(found), end="\n" if as_json else "")
    return status


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
