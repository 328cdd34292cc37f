"""The numbers a run's report is built on: per-round ratios, the floor split, the stream TTFB, the target check."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import rounds

HIT_WORKLOADS = ("hit", "stream", "embeddings")
MIB_KIB = 1024


def _rps(run: Mapping[str, Any]) -> float:
    return float(run["wrk"]["requests_per_s"])


def ratios(results: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Throughput ratios computed round by round (``rounds.ratio``): per hit workload and connection count
    proxy/nginx and proxy/floor, for the misses proxy/nginx, for the scaling run proxy/nginx and the speed-up.

    Older result files, with one run per server, give the plain ratio of the two runs.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    hits, misses = results.get("hits", {}), results.get("misses", {})
    for workload in HIT_WORKLOADS:
        for conns in (64, 1):
            proxy = hits.get(f"{workload}/{conns}/proxy")
            if proxy is None:
                continue
            pair = out[f"{workload}/{conns}"] = {"proxy/nginx": rounds.ratio(proxy, hits[f"{workload}/{conns}/nginx"])}
            if f"{workload}/{conns}/floor" in hits:
                pair["proxy/floor"] = rounds.ratio(proxy, hits[f"{workload}/{conns}/floor"])
    for conns in (64, 1):
        if f"miss/{conns}/proxy" in misses:
            out[f"miss/{conns}"] = {
                "proxy/nginx": rounds.ratio(misses[f"miss/{conns}/proxy"], misses[f"miss/{conns}/nginx"])
            }
    scaling = results.get("scaling", {})
    if "proxy" in scaling and "hit/64/proxy" in hits:
        # Older files have no one-worker runs of their own in the scaling phase; the hit runs stand in.
        one = scaling.get("proxy_one_worker", hits["hit/64/proxy"])
        out["scaling"] = {
            "proxy/nginx": rounds.ratio(scaling["proxy"], scaling["nginx"]),
            "speed-up": rounds.ratio(scaling["proxy"], one),
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


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met; absent measurements are skipped.

    Throughput ratios are the median of the per-round ratios, latencies the median over rounds.
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, goal: str, met: bool, unit: str = "") -> None:
        checks.append({"target": name, "measured": round(value, 4), "unit": unit, "goal": goal, "met": met})

    hits, by_round = results.get("hits", {}), ratios(results)
    for workload in HIT_WORKLOADS:
        if f"{workload}/64/proxy" not in hits:
            continue
        busy, idle = hits[f"{workload}/64/proxy"], hits[f"{workload}/1/proxy"]
        ratio = by_round[f"{workload}/64"]["proxy/nginx"]["median"]
        p99, p50 = rounds.wrk_spread(busy, "p99_ms")["median"], rounds.wrk_spread(idle, "p50_ms")["median"]
        check(f"{workload}: req/s vs nginx, 64 conns", ratio, ">= 0.35", ratio >= 0.35, "x")
        check(f"{workload}: p99, 64 conns", p99, "< 5", p99 < 5, "ms")
        check(f"{workload}: p50, 1 conn", p50, "< 0.3", p50 < 0.3, "ms")
    if "miss/64" in by_round:
        ratio = by_round["miss/64"]["proxy/nginx"]["median"]
        check("miss: req/s vs nginx, 64 conns", ratio, ">= 0.8", ratio >= 0.8, "x")
    if "stream_ttfb" in results:
        stream = ttfb(results)
        for label, key in (("new connection", "new_connection"), ("kept-alive", "kept_alive")):
            if key in stream:
                added = stream[key]["proxy"]["first_event_added_ms"]
                check(f"stream miss: first event added, {label}", added, "<= 1", added <= 1, "ms")
    if "working_set" in results:
        peak = results["working_set"]["memory_kib"]["VmHWM"] / MIB_KIB
        check("peak RSS (VmHWM)", peak, "< 60", peak < 60, "MiB")
    if results.get("startup_s"):
        median = statistics.median(results["startup_s"])
        check("start to first /healthz 200 (median)", median, "< 0.5", median < 0.5, "s")
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
        runs = [hits.get(f"{workload}/{conns}/{name}") for name in ("proxy", "nginx", "floor")]
        if any(run is None for run in runs):
            continue
        proxy, nginx, floor = (
            float(run["cpu_us_per_request"][name]) for run, name in zip(runs, ("proxy", "nginx", "floor"), strict=True)
        )
        gap = proxy - nginx
        split[workload] = {
            "gap_us": gap,
            "aiohttp_us": floor - nginx,
            "proxy_us": proxy - floor,
            "aiohttp_share": (floor - nginx) / gap if gap > 0 else 0.0,
        }
    return split
