"""Numbers over interleaved rounds: each round's order, one summary per server, per-round ratios, the targets."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

HIT_WORKLOADS = ("hit", "stream", "embeddings")
CONNECTIONS = (64, 1)
MIB_KIB = 1024
# The peer the targets are measured against: a results file without its runs cannot be reported on.
REFERENCE = "nginx"
# This checkout's proxy with its in-process tier off: each of its hits is looked up in Redis.
REDIS_HITS = "proxy_redis"
AT_LEAST, AT_MOST = ">=", "<="
# The goals: (comparison, bound). Ratios are to nginx in the same round: req/s at 64 connections, p50 at 1, p99
# at 64; "hit" is a hit from the in-process tier, "redis_hit" one that needs Redis.
GOALS: dict[str, tuple[str, float]] = {
    "hit_rps": (AT_LEAST, 1.0),
    "hit_p50": (AT_MOST, 1.2),
    "hit_p99": (AT_MOST, 1.5),
    "redis_hit_rps": (AT_LEAST, 0.5),
    "miss_rps": (AT_LEAST, 0.8),
    "first_event_added_ms": (AT_MOST, 0.3),
    "peak_rss_mib": (AT_MOST, 60.0),
    "startup_s": (AT_MOST, 0.5),
}
# The servers each workload ran against, subject first, in results files written before they were recorded.
DEFAULT_SERVERS = {"hits": ["proxy", "nginx", "floor"], "misses": ["proxy", "nginx"]}
# wrk numbers a summary carries as the median over rounds; counts are summed and the maximum latency is the max.
MEDIAN_KEYS = ("requests_per_s", "latency_avg_ms", "p50_ms", "p75_ms", "p90_ms", "p99_ms")
SUM_KEYS = (
    "requests",
    "duration_s",
    "bytes_read",
    "non_2xx",
    "connect_errors",
    "read_errors",
    "write_errors",
    "timeouts",
)
SPREAD_KEYS = ("requests_per_s", "p50_ms", "p99_ms")


def order(names: Sequence[str], round_index: int) -> list[str]:
    """*names* in the order of round *round_index*: each round starts one server later, so none always runs first.

    ``order(["proxy", "nginx", "floor"], 1) == ["floor", "proxy", "nginx"]``.
    """
    shift = round_index % len(names)
    return [*names[len(names) - shift :], *names[: len(names) - shift]]


def in_rounds(names: Sequence[str], count: int, measure: Callable[[str, int], T]) -> dict[str, list[T]]:
    """Call ``measure(name, round_index)`` for every name in *count* rounds ordered by ``order``; results by name."""
    out: dict[str, list[T]] = {name: [] for name in names}
    for round_index in range(count):
        for name in order(names, round_index):
            out[name].append(measure(name, round_index))
    return out


def servers(results: Mapping[str, Any], phase: str) -> list[str]:
    """The servers *phase* (``hits`` or ``misses``) ran against, the subject first."""
    return list(results.get("servers", DEFAULT_SERVERS)[phase])


def runs_of(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The single runs behind *entry*: its rounds, or the entry itself when it is one run (older result files)."""
    return list(entry.get("rounds") or [entry])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum and maximum of *values*."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def wrk_spread(entry: Mapping[str, Any], key: str) -> dict[str, float]:
    """Median, minimum and maximum of one wrk number over the rounds of *entry*."""
    return spread([float(run["wrk"][key]) for run in runs_of(entry)])


def ratio(numerator: Mapping[str, Any], denominator: Mapping[str, Any], key: str = "requests_per_s") -> dict[str, Any]:
    """A wrk number of *numerator* over *denominator*, computed round by round, then its median and spread.

    Round *i* of one is paired with round *i* of the other, which ran next to it in time, so drift of the
    machine between rounds cancels out. Raises ValueError when the two have different numbers of rounds.
    """
    tops, bottoms = runs_of(numerator), runs_of(denominator)
    if len(tops) != len(bottoms):
        raise ValueError(f"{len(tops)} rounds against {len(bottoms)}")
    per_round = [
        float(t["wrk"][key]) / float(b["wrk"][key]) if b["wrk"][key] else 0.0
        for t, b in zip(tops, bottoms, strict=True)
    ]
    return {**spread(per_round), "rounds": per_round}


def difference(minuend: Mapping[str, Any], subtrahend: Mapping[str, Any], key: str) -> float:
    """The median over rounds of one wrk number of *minuend* minus the same number of *subtrahend* that round."""
    pairs = zip(runs_of(minuend), runs_of(subtrahend), strict=True)
    return statistics.median(float(a["wrk"][key]) - float(b["wrk"][key]) for a, b in pairs)


def summarize(runs: Sequence[Mapping[str, Any]], **extra: object) -> dict[str, Any]:
    """One entry for a server's rounds, in the shape of a single run so older readers still work.

    ``wrk`` holds the median of the speed and latency numbers and the sum of the counts, ``cpu_us_per_request``
    and ``core_busy`` the median per role, ``server_core_other`` the worst round; ``upstream_requests``,
    ``redis_keys_added`` and ``redis_keys_found`` are summed when the runs have them. The runs themselves are kept
    under ``rounds``, the min-max of req/s, p50 and p99 under ``spread``. *extra* is added as is.
    """
    wrk: dict[str, float] = {key: statistics.median(float(run["wrk"][key]) for run in runs) for key in MEDIAN_KEYS}
    wrk |= {key: sum(run["wrk"][key] for run in runs) for key in SUM_KEYS}
    wrk["latency_max_ms"] = max(float(run["wrk"]["latency_max_ms"]) for run in runs)
    roles = list(runs[0]["cpu_us_per_request"])
    entry: dict[str, Any] = {
        "wrk": wrk,
        "cpu_us_per_request": {
            role: statistics.median(run["cpu_us_per_request"][role] for run in runs) for role in roles
        },
        "core_busy": {role: statistics.median(run["core_busy"][role] for run in runs) for role in roles},
        "server_core_other": max(run.get("server_core_other", 0.0) for run in runs),
    }
    for key in ("upstream_requests", "redis_keys_added", "redis_keys_found"):
        if all(key in run for run in runs):
            entry[key] = sum(run[key] for run in runs)
    entry["spread"] = {
        key: {"min": min(run["wrk"][key] for run in runs), "max": max(run["wrk"][key] for run in runs)}
        for key in SPREAD_KEYS
    }
    return {**entry, **extra, "rounds": list(runs)}


def ratios(results: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Throughput ratios computed round by round (``ratio``): per hit workload and connection count the subject
    over each peer and the proxy without its in-process tier over nginx, for the misses likewise, for the scaling
    run proxy/nginx and the speed-up.

    Older result files, with one run per server, give the plain ratio of the two runs.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    phases = (("hits", HIT_WORKLOADS), ("misses", ("miss",)))
    for phase, workloads in phases:
        entries = results.get(phase, {})
        subject, *peers = servers(results, phase)
        for workload in workloads:
            for conns in CONNECTIONS:
                top = entries.get(f"{workload}/{conns}/{subject}")
                if top is None:
                    continue
                out[f"{workload}/{conns}"] = {
                    f"{subject}/{peer}": ratio(top, entries[f"{workload}/{conns}/{peer}"])
                    for peer in peers
                    if peer == REFERENCE or f"{workload}/{conns}/{peer}" in entries
                }
                if (redis := entries.get(f"{workload}/{conns}/{REDIS_HITS}")) is not None:
                    reference = entries[f"{workload}/{conns}/{REFERENCE}"]
                    out[f"{workload}/{conns}"][f"{REDIS_HITS}/{REFERENCE}"] = ratio(redis, reference)
    scaling, hits = results.get("scaling", {}), results.get("hits", {})
    if "proxy" in scaling and "hit/64/proxy" in hits:
        # Older files have no one-worker runs of their own in the scaling phase; the hit runs stand in.
        one = scaling.get("proxy_one_worker", hits["hit/64/proxy"])
        out["scaling"] = {
            "proxy/nginx": ratio(scaling["proxy"], scaling["nginx"]),
            "speed-up": ratio(scaling["proxy"], one),
        }
    return out


def ttfb(results: Mapping[str, Any]) -> dict[str, Any]:
    """The stream TTFB results in the current shape; older files measured only new connections, flat."""
    t = results["stream_ttfb"]
    if "new_connection" in t:
        return dict(t)
    direct = {"first_event_ms": t["first_event_direct_ms"], "first_byte_ms": t["first_byte_direct_ms"]}
    proxy = {
        "first_event_ms": t["first_event_proxy_ms"],
        "first_byte_ms": t["first_byte_proxy_ms"],
        "first_event_added_ms": t["first_event_added_ms"],
        "first_byte_added_ms": t["first_byte_added_ms"],
    }
    return {"samples": t["samples"], "new_connection": {"direct": direct, "proxy": proxy}}


def _check(name: str, goal: str, value: float, unit: str, per_round: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """*value* against ``GOALS[goal]``; a ratio computed per round (``ratio``) also keeps its min, max and rounds."""
    comparison, bound = GOALS[goal]
    # Judged as shown: a ratio of 1.2 computed as 1.2000000000000002 meets "<= 1.2".
    measured = round(value, 4)
    met = measured >= bound if comparison == AT_LEAST else measured <= bound
    check = {"target": name, "measured": measured, "unit": unit, "goal": f"{comparison} {bound:g}", "met": met}
    if per_round is not None:
        check |= {"min": round(per_round["min"], 4), "max": round(per_round["max"], 4), "rounds": per_round["rounds"]}
    return check


def _ratio_check(name: str, goal: str, top: Mapping[str, Any], bottom: Mapping[str, Any], key: str) -> dict[str, Any]:
    per_round = ratio(top, bottom, key)
    return _check(name, goal, per_round["median"], "x", per_round)


def _hit_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per hit workload measured: the proxy's req/s, p50 and p99 over nginx's, and its req/s over nginx's without
    the in-process tier when that server ran; then the misses' req/s over nginx's."""
    hits, checks = results.get("hits", {}), []
    for workload in HIT_WORKLOADS:
        busy, idle = hits.get(f"{workload}/64/proxy"), hits.get(f"{workload}/1/proxy")
        if busy is None or idle is None:
            continue
        nginx_busy, nginx_idle = hits[f"{workload}/64/{REFERENCE}"], hits[f"{workload}/1/{REFERENCE}"]
        checks += [
            _ratio_check(f"{workload}: req/s vs nginx, 64 conns", "hit_rps", busy, nginx_busy, "requests_per_s"),
            _ratio_check(f"{workload}: p50 vs nginx, 1 conn", "hit_p50", idle, nginx_idle, "p50_ms"),
            _ratio_check(f"{workload}: p99 vs nginx, 64 conns", "hit_p99", busy, nginx_busy, "p99_ms"),
        ]
        if (redis := hits.get(f"{workload}/64/{REDIS_HITS}")) is not None:
            name = f"{workload} via Redis: req/s vs nginx, 64 conns"
            checks.append(_ratio_check(name, "redis_hit_rps", redis, nginx_busy, "requests_per_s"))
    misses = results.get("misses", {})
    if "miss/64/proxy" in misses:
        name = "miss: req/s vs nginx, 64 conns"
        checks.append(
            _ratio_check(name, "miss_rps", misses["miss/64/proxy"], misses["miss/64/nginx"], "requests_per_s")
        )
    return checks


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each goal of ``GOALS`` with its measured value and whether it was met; absent measurements are skipped.

    Ratios to nginx are the median of the per-round ratios (``ratio``), the first-event time added the median of
    per-round differences, start-up the median over every start.
    """
    checks = _hit_targets(results)
    if "stream_ttfb" in results:
        stream = ttfb(results)
        for label, key in (("new connection", "new_connection"), ("kept-alive", "kept_alive")):
            if key in stream:
                added = stream[key]["proxy"]["first_event_added_ms"]
                checks.append(_check(f"stream miss: first event added, {label}", "first_event_added_ms", added, "ms"))
    if "working_set" in results:
        peak = results["working_set"]["memory_kib"]["VmHWM"] / MIB_KIB
        checks.append(_check("peak RSS (VmHWM)", "peak_rss_mib", peak, "MiB"))
    if results.get("startup_s"):
        median = statistics.median(results["startup_s"])
        checks.append(_check("start to first /healthz 200 (median)", "startup_s", median, "s"))
    return checks


def gap_split(results: Mapping[str, Any], conns: int = 64) -> dict[str, dict[str, float]]:
    """Per hit workload, the proxy's CPU per request above nginx's, split at the aiohttp floor's.

    ``aiohttp_us`` is the floor's CPU per request above nginx's (what aiohttp costs on its own), ``proxy_us`` the
    proxy's above the floor's (what its logic adds); ``aiohttp_share`` is the first over the whole gap.
    Workloads without a floor run are left out.
    """
    hits = results.get("hits", {})
    split: dict[str, dict[str, float]] = {}
    for workload in HIT_WORKLOADS:
        names = ("proxy", "nginx", "floor")
        runs = [hits.get(f"{workload}/{conns}/{name}") for name in names]
        if any(run is None for run in runs):
            continue
        proxy, nginx, floor = (float(run["cpu_us_per_request"][name]) for run, name in zip(runs, names, strict=True))
        gap = proxy - nginx
        split[workload] = {
            "gap_us": gap,
            "aiohttp_us": floor - nginx,
            "proxy_us": proxy - floor,
            "aiohttp_share": (floor - nginx) / gap if gap > 0 else 0.0,
        }
    return split
