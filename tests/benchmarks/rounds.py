"""Interleaved rounds of wrk runs: the order servers take in each round, and medians, spreads and ratios over them."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

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


def summarize(runs: Sequence[Mapping[str, Any]], **extra: object) -> dict[str, Any]:
    """One entry for a server's rounds, in the shape of a single run so older readers still work.

    ``wrk`` holds the median of the speed and latency numbers and the sum of the counts, ``cpu_us_per_request``
    and ``core_busy`` the median per role, ``server_core_other`` the worst round; ``upstream_requests`` and
    ``redis_keys_added`` are summed when the runs have them. The runs themselves are kept under ``rounds``,
    the min-max of req/s, p50 and p99 under ``spread``. *extra* is added as is.
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
    for key in ("upstream_requests", "redis_keys_added"):
        if all(key in run for run in runs):
            entry[key] = sum(run[key] for run in runs)
    entry["spread"] = {
        key: {"min": min(run["wrk"][key] for run in runs), "max": max(run["wrk"][key] for run in runs)}
        for key in SPREAD_KEYS
    }
    return {**entry, **extra, "rounds": list(runs)}
