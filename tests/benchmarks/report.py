"""Turn a run's results into Markdown tables and a target check."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

HIT_WORKLOADS = ("hit", "stream", "embeddings")
MIB_KIB = 1024


def _rps(run: dict[str, Any]) -> float:
    return float(run["wrk"]["requests_per_s"])


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _ms(run: dict[str, Any], key: str) -> str:
    return f"{run['wrk'][key]:.3f}"


def _cpu(run: dict[str, Any], role: str) -> str:
    return f"{run['cpu_us_per_request'][role]:.1f}"


def _noise(label: str, run: dict[str, Any]) -> list[str]:
    other = run.get("server_core_other", 0.0)
    return [f"- {label}: {other:.0%} of the server core went to other processes; noisy"] if other > 0.05 else []


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met; absent measurements are skipped."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, goal: str, met: bool, unit: str = "") -> None:
        checks.append({"target": name, "measured": round(value, 4), "unit": unit, "goal": goal, "met": met})

    hits = results.get("hits", {})
    for workload in HIT_WORKLOADS:
        if f"{workload}/64/proxy" not in hits:
            continue
        busy, idle = hits[f"{workload}/64/proxy"], hits[f"{workload}/1/proxy"]
        ratio = _rps(busy) / _rps(hits[f"{workload}/64/nginx"])
        check(f"{workload}: req/s vs nginx, 64 conns", ratio, ">= 0.35", ratio >= 0.35, "x")
        check(f"{workload}: p99, 64 conns", busy["wrk"]["p99_ms"], "< 5", busy["wrk"]["p99_ms"] < 5, "ms")
        check(f"{workload}: p50, 1 conn", idle["wrk"]["p50_ms"], "< 0.3", idle["wrk"]["p50_ms"] < 0.3, "ms")
    misses = results.get("misses", {})
    if "miss/64/proxy" in misses:
        ratio = _rps(misses["miss/64/proxy"]) / _rps(misses["miss/64/nginx"])
        check("miss: req/s vs nginx, 64 conns", ratio, ">= 0.8", ratio >= 0.8, "x")
    if "stream_ttfb" in results:
        added = results["stream_ttfb"]["first_event_added_ms"]
        check("stream miss: first event added", added, "<= 1", added <= 1, "ms")
    if "working_set" in results:
        peak = results["working_set"]["memory_kib"]["VmHWM"] / MIB_KIB
        check("peak RSS (VmHWM)", peak, "< 60", peak < 60, "MiB")
    if results.get("startup_s"):
        median = statistics.median(results["startup_s"])
        check("start to first /healthz 200 (median)", median, "< 0.5", median < 0.5, "s")
    return checks


def gap_split(results: dict[str, Any], conns: int = 64) -> dict[str, dict[str, float]]:
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
        proxy, nginx, floor = (float(run["cpu_us_per_request"][name])
                               for run, name in zip(runs, ("proxy", "nginx", "floor"), strict=True))
        gap = proxy - nginx
        split[workload] = {"gap_us": gap, "aiohttp_us": floor - nginx, "proxy_us": proxy - floor,
                           "aiohttp_share": (floor - nginx) / gap if gap > 0 else 0.0}
    return split


def _hits(results: dict[str, Any]) -> list[str]:
    hits = results["hits"]
    speed, cpu, notes = [], [], []
    for workload in HIT_WORKLOADS:
        for conns in (64, 1):
            p, n = hits[f"{workload}/{conns}/proxy"], hits[f"{workload}/{conns}/nginx"]
            f = hits.get(f"{workload}/{conns}/floor")
            floor = [f"{_rps(f):.0f}", _ratio(_rps(p), _rps(f)), _ms(f, "p50_ms"), _ms(f, "p99_ms")] if f else ["-"] * 4
            speed.append([workload, conns, f"{_rps(p):.0f}", f"{_rps(n):.0f}", floor[0], _ratio(_rps(p), _rps(n)),
                          floor[1], _ms(p, "p50_ms"), _ms(p, "p99_ms"), _ms(n, "p50_ms"), _ms(n, "p99_ms"),
                          floor[2], floor[3]])
            cpu.append([workload, conns, _cpu(p, "proxy"), _cpu(n, "nginx"), _cpu(f, "floor") if f else "-",
                        f"{p['core_busy']['proxy']:.0%}", f"{n['core_busy']['nginx']:.0%}",
                        f"{f['core_busy']['floor']:.0%}" if f else "-"])
            for name, run in (("proxy", p), ("nginx", n), ("floor", f)):
                if run is None:
                    continue
                if run["upstream_requests"]:
                    notes.append(f"- {workload}/{conns}/{name}: {run['upstream_requests']} requests reached upstream")
                if not run["body_identical_to_upstream"]:
                    notes.append(f"- {workload}/{name}: the hit's body differs from upstream's bytes")
                if run.get("headers_differing_from_proxy"):
                    notes.append(f"- {workload}/{name}: headers unlike the proxy's hit: "
                                 + ", ".join(run["headers_differing_from_proxy"]))
                notes += _noise(f"{workload}/{conns}/{name}", run)
    split = [f"- {workload}: {s['gap_us']:.1f} µs, of which aiohttp's floor {s['aiohttp_us']:.1f} µs "
             f"({s['aiohttp_share']:.0%}) and the proxy's own work {s['proxy_us']:.1f} µs"
             for workload, s in gap_split(results).items()]
    if split:
        split = ["CPU per hit the proxy spends above nginx at 64 conns, split at the aiohttp floor:", "", *split, ""]
    return ["## Cache hits", "", *_table(
        ["workload", "conns", "proxy req/s", "nginx req/s", "floor req/s", "proxy/nginx", "proxy/floor",
         "proxy p50 ms", "proxy p99 ms", "nginx p50 ms", "nginx p99 ms", "floor p50 ms", "floor p99 ms"], speed),
        "", *_table(["workload", "conns", "proxy CPU µs/req", "nginx CPU µs/req", "floor CPU µs/req",
                     "proxy core busy", "nginx core busy", "floor core busy"], cpu), "", *split, *notes]


def _misses(results: dict[str, Any]) -> list[str]:
    misses = results["misses"]
    rows = []
    for conns in (64, 1):
        p, n, u = (misses[f"miss/{conns}/{name}"] for name in ("proxy", "nginx", "upstream"))
        stored = p["redis_keys_added"] / max(p["wrk"]["requests"], 1)
        rows.append([conns, f"{_rps(p):.0f}", f"{_rps(n):.0f}", f"{_rps(u):.0f}", _ratio(_rps(p), _rps(n)),
                     _ms(p, "p50_ms"), _ms(n, "p50_ms"), _ms(u, "p50_ms"), _ms(p, "p99_ms"), _ms(n, "p99_ms"),
                     _ms(u, "p99_ms"), _cpu(p, "proxy"), _cpu(n, "nginx"), f"{stored:.2f}"])
    notes = [line for key, run in misses.items() if not key.endswith("upstream") for line in _noise(key, run)]
    for conns in (64, 1):
        run = misses[f"miss/{conns}/proxy"]
        stored = run["redis_keys_added"] / max(run["wrk"]["requests"], 1)
        if stored < 0.9 and not results["environment"]["calibrate"]:
            notes.append(f"- miss/{conns}/proxy: only {stored:.0%} of the misses were written to Redis")
    p, n, u = (misses[f"miss/1/{name}"] for name in ("proxy", "nginx", "upstream"))
    added_p = p["wrk"]["p50_ms"] - u["wrk"]["p50_ms"]
    added_n = n["wrk"]["p50_ms"] - u["wrk"]["p50_ms"]
    return ["## Cache misses (a new body every request)", "", *_table(
        ["conns", "proxy req/s", "nginx req/s", "upstream direct req/s", "proxy/nginx", "proxy p50 ms",
         "nginx p50 ms", "direct p50 ms", "proxy p99 ms", "nginx p99 ms", "direct p99 ms", "proxy CPU µs/req",
         "nginx CPU µs/req", "Redis keys added per request"], rows), "",
        f"Latency added over calling upstream directly (p50, 1 conn): proxy {added_p:.3f} ms, nginx {added_n:.3f} ms.",
        *notes]


def _other(results: dict[str, Any]) -> list[str]:
    lines = ["## Stream, memory, start-up", ""]
    rows: list[list[object]] = []
    if "stream_ttfb" in results:
        t = results["stream_ttfb"]
        rows.append([f"streamed miss, first SSE event (median of {t['samples']})",
                     f"{t['first_event_direct_ms']:.2f} ms direct, {t['first_event_proxy_ms']:.2f} ms via proxy",
                     f"{t['first_event_added_ms']:.3f} ms added"])
        rows.append(["streamed miss, first response byte", f"{t['first_byte_direct_ms']:.2f} ms direct, "
                     f"{t['first_byte_proxy_ms']:.2f} ms via proxy", f"{t['first_byte_added_ms']:.3f} ms added"])
    if "working_set" in results:
        w = results["working_set"]
        rows.append([f"working set of {w['entries']} bodies, sent twice",
                     f"pass 1 {w['passes'][0]}, pass 2 {w['passes'][1]}", f"{w['seconds']:.1f} s"])
        rows.append(["proxy peak RSS (VmHWM) after all runs", f"{w['memory_kib']['VmHWM'] / MIB_KIB:.1f} MiB",
                     f"nginx VmHWM {w['nginx_memory_kib']['VmHWM'] / MIB_KIB:.1f} MiB"])
    if "proxy_rss_kib" in results:
        rows.append(["proxy RSS (VmRSS) after each phase", ", ".join(
            f"{phase} {kib / MIB_KIB:.1f}" for phase, kib in results["proxy_rss_kib"].items()) + " MiB", ""])
    if results.get("startup_s"):
        s = results["startup_s"]
        rows.append([f"process start to first /healthz 200 ({len(s)} starts)", f"median {statistics.median(s):.3f} s",
                     f"min {min(s):.3f} s, max {max(s):.3f} s"])
    return lines + _table(["measure", "value", "detail"], rows)


def _scaling(results: dict[str, Any]) -> list[str]:
    s = results["scaling"]
    head = [f"## Worker scaling (hit, 64 conns; {s['workers']} workers on cores {s['cores']}, wrk on core "
            f"{s['load_core']}: with 2 cores the load generator shares a core with a worker)", ""]
    if "error" in s:
        return [*head, f"not measured: {s['error']}"]
    one_p, one_n = results["hits"]["hit/64/proxy"], results["hits"]["hit/64/nginx"]
    rows = [[1, f"{_rps(one_p):.0f}", f"{_rps(one_n):.0f}", _ratio(_rps(one_p), _rps(one_n)), "1.00"],
            [s["workers"], f"{_rps(s['proxy']):.0f}", f"{_rps(s['nginx']):.0f}",
             _ratio(_rps(s["proxy"]), _rps(s["nginx"])), _ratio(_rps(s["proxy"]), _rps(one_p))]]
    return head + _table(["workers", "proxy req/s", "nginx req/s", "proxy/nginx", "proxy speed-up"], rows)


def _profile(results: dict[str, Any]) -> list[str]:
    profile = results["profile"]
    if "error" in profile:
        return ["## Profile", "", f"not taken: {profile['error']}"]
    lines = ["## Profile (py-spy, 64 conns; share of samples)", ""]
    for workload, summary in profile.items():
        rows = [[f"{share:.1%}", frame] for frame, share in summary["self"][:10]]
        totals = [[f"{share:.1%}", frame] for frame, share in summary["total"][:10]]
        lines += [f"{workload}: where samples landed (collapsed stacks in results/{summary['collapsed_stacks']})",
                  "", *_table(["self", "function"], rows), "", f"{workload}: on the stack", "",
                  *_table(["total", "function"], totals), ""]
    return lines


def _log(results: dict[str, Any]) -> list[str]:
    found = results["proxy_log"]
    lines = [f"## Proxy log: {found['warning']} warnings, {found['error']} errors", ""]
    return lines + [f"- `{line}`" for line in found["first"]]


def markdown(results: dict[str, Any]) -> str:
    """The whole report: environment line, hit, miss, stream/memory/start-up, scaling and target tables."""
    env = results["environment"]
    who = "a second nginx (calibration run)" if env["calibrate"] else "the proxy"
    lines = [f"# Benchmark: {who} vs nginx proxy_cache", "",
             f"commit {env['commit']}, {env['cpu']} x{env['cores']}, Python {env['python']}, {env['nginx']}, "
             f"{env['wrk']}, {env['redis']}; {env['duration_s']} s per wrk run; servers on core "
             f"{env['server_core']}, wrk/Redis/upstream on core {env['load_core']}. Busy before the run: "
             + ", ".join(f"core {c} {b:.0%}" for c, b in env.get("cores_busy_before_start", {}).items()) + ".", ""]
    for sections, render in ((("hits",), _hits), (("misses",), _misses),
                             (("stream_ttfb", "working_set", "startup_s"), _other), (("scaling",), _scaling),
                             (("profile",), _profile), (("proxy_log",), _log)):
        if any(section in results for section in sections):
            lines += [*render(results), ""]
    checks = targets(results)
    lines += ["## Targets", "", *_table(["target", "measured", "goal", "met"], [
        [c["target"], f"{c['measured']:.3f} {c['unit']}", f"{c['goal']} {c['unit']}", "yes" if c["met"] else "NO"]
        for c in checks])]
    return "\n".join(lines)
