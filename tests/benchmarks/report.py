"""Turn a run's results into Markdown tables and a target check; ``python report.py FILE.json`` renders a file."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rounds
from figures import HIT_WORKLOADS, MIB_KIB, gap_split, ratios, targets, ttfb

# kept-alive TTFB side -> (its name, what it adds over the side before it)
TTFB_STEPS = (
    ("relay", "bare aiohttp relay", "aiohttp server and client, stream copy"),
    ("off", "proxy, CACHE_BACKEND=off", "+ the proxy's own miss path: key, plan, headers, recording"),
    ("memory", "proxy, CACHE_BACKEND=memory", "+ in-process lookup"),
    ("redis", "proxy, CACHE_BACKEND=redis", "+ Redis lookup (in-process tier, then a Redis GET)"),
)


class ResultsFormatError(ValueError):
    """A results file lacks what the report needs (not one this benchmark wrote, or from a much older one)."""


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _spread(s: Mapping[str, float], fmt: str) -> str:
    """``median (min-max)``, or only the value when there was one round."""
    if s["min"] == s["max"]:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def _wrk(entry: Mapping[str, Any] | None, key: str, fmt: str = ".3f") -> str:
    return _spread(rounds.wrk_spread(entry, key), fmt) if entry is not None else "-"


def _ratio(top: Mapping[str, Any] | None, bottom: Mapping[str, Any] | None) -> str:
    return _spread(rounds.ratio(top, bottom), ".2f") if top is not None and bottom is not None else "-"


def _cpu(run: Mapping[str, Any], role: str) -> str:
    return f"{run['cpu_us_per_request'][role]:.1f}"


def _noise(label: str, entry: Mapping[str, Any]) -> list[str]:
    notes = []
    for i, run in enumerate(rounds.runs_of(entry)):
        other = run.get("server_core_other", 0.0)
        if other > 0.05:
            notes.append(f"- {label} (round {i + 1}): {other:.0%} of the server core went to other processes; noisy")
    return notes


def _hits(results: Mapping[str, Any]) -> list[str]:
    hits = results["hits"]
    speed, latency, cpu, notes = [], [], [], []
    for workload in HIT_WORKLOADS:
        for conns in (64, 1):
            p, n = hits[f"{workload}/{conns}/proxy"], hits[f"{workload}/{conns}/nginx"]
            f = hits.get(f"{workload}/{conns}/floor")
            speed.append(
                [
                    workload,
                    conns,
                    _wrk(p, "requests_per_s", ".0f"),
                    _wrk(n, "requests_per_s", ".0f"),
                    _wrk(f, "requests_per_s", ".0f"),
                    _ratio(p, n),
                    _ratio(p, f),
                ]
            )
            latency.append([workload, conns, *(_wrk(run, key) for run in (p, n, f) for key in ("p50_ms", "p99_ms"))])
            cpu.append(
                [
                    workload,
                    conns,
                    _cpu(p, "proxy"),
                    _cpu(n, "nginx"),
                    _cpu(f, "floor") if f else "-",
                    f"{p['core_busy']['proxy']:.0%}",
                    f"{n['core_busy']['nginx']:.0%}",
                    f"{f['core_busy']['floor']:.0%}" if f else "-",
                ]
            )
            for name, run in (("proxy", p), ("nginx", n), ("floor", f)):
                if run is None:
                    continue
                if run["upstream_requests"]:
                    notes.append(f"- {workload}/{conns}/{name}: {run['upstream_requests']} requests reached upstream")
                if not run["body_identical_to_upstream"]:
                    notes.append(f"- {workload}/{name}: the hit's body differs from upstream's bytes")
                if run.get("headers_differing_from_proxy"):
                    notes.append(
                        f"- {workload}/{name}: headers unlike the proxy's hit: "
                        + ", ".join(run["headers_differing_from_proxy"])
                    )
                notes += _noise(f"{workload}/{conns}/{name}", run)
    split = [
        f"- {workload}: {s['gap_us']:.1f} µs, of which aiohttp's floor {s['aiohttp_us']:.1f} µs "
        f"({s['aiohttp_share']:.0%}) and the proxy's own work {s['proxy_us']:.1f} µs"
        for workload, s in gap_split(results).items()
    ]
    if split:
        split = [
            "CPU per hit the proxy spends above nginx at 64 conns (medians), split at the aiohttp floor:",
            "",
            *split,
            "",
        ]
    return [
        "## Cache hits",
        "",
        _rounds_line(results, "req/s"),
        "",
        *_table(
            ["workload", "conns", "proxy req/s", "nginx req/s", "floor req/s", "proxy/nginx", "proxy/floor"], speed
        ),
        "",
        "Latency in ms, median over the rounds of each run's percentile (min-max):",
        "",
        *_table(
            ["workload", "conns", "proxy p50", "proxy p99", "nginx p50", "nginx p99", "floor p50", "floor p99"], latency
        ),
        "",
        "CPU per request and core busy, median over the rounds:",
        "",
        *_table(
            [
                "workload",
                "conns",
                "proxy CPU µs/req",
                "nginx CPU µs/req",
                "floor CPU µs/req",
                "proxy core busy",
                "nginx core busy",
                "floor core busy",
            ],
            cpu,
        ),
        "",
        *split,
        *notes,
    ]


def _rounds_line(results: Mapping[str, Any], what: str) -> str:
    count = results["environment"].get("rounds")
    if count is None:
        return (
            f"{what} of one run per server (a result file from before interleaved rounds: no spread, "
            "ratios of single runs):"
        )
    return (
        f"{what}, median of {count} interleaved rounds (min-max); each ratio is computed within a round, "
        "then its median (min-max) is shown:"
    )


def _misses(results: Mapping[str, Any]) -> list[str]:
    misses = results["misses"]
    speed, rest = [], []
    for conns in (64, 1):
        p, n, u = (misses[f"miss/{conns}/{name}"] for name in ("proxy", "nginx", "upstream"))
        stored = p["redis_keys_added"] / max(p["wrk"]["requests"], 1)
        speed.append(
            [
                conns,
                _wrk(p, "requests_per_s", ".0f"),
                _wrk(n, "requests_per_s", ".0f"),
                _wrk(u, "requests_per_s", ".0f"),
                _ratio(p, n),
            ]
        )
        rest.append(
            [
                conns,
                *(_wrk(run, key) for key in ("p50_ms", "p99_ms") for run in (p, n, u)),
                _cpu(p, "proxy"),
                _cpu(n, "nginx"),
                f"{stored:.2f}",
            ]
        )
    notes = [line for key, run in misses.items() if not key.endswith("upstream") for line in _noise(key, run)]
    for conns in (64, 1):
        run = misses[f"miss/{conns}/proxy"]
        stored = run["redis_keys_added"] / max(run["wrk"]["requests"], 1)
        if stored < 0.9 and not results["environment"]["calibrate"]:
            notes.append(f"- miss/{conns}/proxy: only {stored:.0%} of the misses were written to Redis")
    p, n, u = (rounds.runs_of(misses[f"miss/1/{name}"]) for name in ("proxy", "nginx", "upstream"))
    added_p = statistics.median(a["wrk"]["p50_ms"] - b["wrk"]["p50_ms"] for a, b in zip(p, u, strict=True))
    added_n = statistics.median(a["wrk"]["p50_ms"] - b["wrk"]["p50_ms"] for a, b in zip(n, u, strict=True))
    return [
        "## Cache misses (a new body every request)",
        "",
        _rounds_line(results, "req/s"),
        "",
        *_table(["conns", "proxy req/s", "nginx req/s", "upstream direct req/s", "proxy/nginx"], speed),
        "",
        *_table(
            [
                "conns",
                "proxy p50 ms",
                "nginx p50 ms",
                "direct p50 ms",
                "proxy p99 ms",
                "nginx p99 ms",
                "direct p99 ms",
                "proxy CPU µs/req",
                "nginx CPU µs/req",
                "Redis keys added per request",
            ],
            rest,
        ),
        "",
        "Latency added over calling upstream directly (p50, 1 conn; median of the per-round differences): "
        f"proxy {added_p:.3f} ms, nginx {added_n:.3f} ms.",
        *notes,
    ]


def _other(results: Mapping[str, Any]) -> list[str]:
    lines = ["## Stream, memory, start-up", ""]
    rows: list[list[object]] = []
    breakdown: list[str] = []
    if "stream_ttfb" in results:
        t = ttfb(results)
        for label, key in (
            ("new connection per request", "new_connection"),
            ("one kept-alive connection per side", "kept_alive"),
        ):
            if key not in t:
                continue
            direct, proxy = t[key]["direct"], t[key]["proxy"]
            rows.append(
                [
                    f"streamed miss, first SSE event, {label} (median of {t['samples']})",
                    f"{direct['first_event_ms']:.2f} ms direct, {proxy['first_event_ms']:.2f} ms via proxy",
                    f"{proxy['first_event_added_ms']:.3f} ms added",
                ]
            )
            rows.append(
                [
                    f"streamed miss, first response byte, {label}",
                    f"{direct['first_byte_ms']:.2f} ms direct, {proxy['first_byte_ms']:.2f} ms via proxy",
                    f"{proxy['first_byte_added_ms']:.3f} ms added",
                ]
            )
        if "kept_alive_backends" in t:
            breakdown = _ttfb_breakdown(t["kept_alive_backends"], t["samples"])
    if "working_set" in results:
        w = results["working_set"]
        rows.append(
            [
                f"working set of {w['entries']} bodies, sent twice",
                f"pass 1 {w['passes'][0]}, pass 2 {w['passes'][1]}",
                f"{w['seconds']:.1f} s",
            ]
        )
        rows.append(
            [
                "proxy peak RSS (VmHWM) after all runs",
                f"{w['memory_kib']['VmHWM'] / MIB_KIB:.1f} MiB",
                f"nginx VmHWM {w['nginx_memory_kib']['VmHWM'] / MIB_KIB:.1f} MiB",
            ]
        )
    if "proxy_rss_kib" in results:
        rows.append(
            [
                "proxy RSS (VmRSS) after each phase",
                ", ".join(f"{phase} {kib / MIB_KIB:.1f}" for phase, kib in results["proxy_rss_kib"].items()) + " MiB",
                "",
            ]
        )
    if results.get("startup_s"):
        s = results["startup_s"]
        rows.append(
            [
                f"process start to first /healthz 200 ({len(s)} starts)",
                f"median {statistics.median(s):.3f} s",
                f"min {min(s):.3f} s, max {max(s):.3f} s",
            ]
        )
    return lines + _table(["measure", "value", "detail"], rows) + breakdown


def _ttfb_breakdown(sides: Mapping[str, Mapping[str, float]], samples: int) -> list[str]:
    """Kept-alive first-event time added by a bare aiohttp relay and by the proxy per ``CACHE_BACKEND``, and what
    each step adds over the one before."""
    rows, before = [], 0.0
    for side, name, step in TTFB_STEPS:
        if side not in sides:
            continue
        added = sides[side]["first_event_added_ms"]
        rows.append(
            [
                name,
                f"{sides[side]['first_event_ms']:.3f}",
                f"{added:.3f}",
                f"{sides[side]['first_byte_added_ms']:.3f}",
                step,
                f"{added - before:+.3f}",
            ]
        )
        before = added
    if len(rows) < 2:
        return []
    return [
        "",
        f"### Streamed miss over kept-alive connections, step by step (median of {samples} rounds)",
        "",
        f"Direct to upstream: first event {sides['direct']['first_event_ms']:.3f} ms. All sides take turns in "
        "rotating order; each added time is the median of the per-round differences to direct.",
        "",
        *_table(["via", "first event ms", "first event added ms", "first byte added ms", "step", "step adds ms"], rows),
    ]


def _scaling(results: Mapping[str, Any]) -> list[str]:
    s = results["scaling"]
    head = [
        f"## Worker scaling (hit, 64 conns; {s['workers']} workers on cores {s['cores']}, wrk on core "
        f"{s['load_core']}: with 2 cores the load generator shares a core with a worker)",
        "",
    ]
    if "error" in s:
        return [*head, f"not measured: {s['error']}"]
    one_p = s.get("proxy_one_worker", results["hits"]["hit/64/proxy"])
    one_n = s.get("nginx_one_worker", results["hits"]["hit/64/nginx"])
    speed_up = ratios(results)["scaling"]["speed-up"]
    rows = [
        [1, _wrk(one_p, "requests_per_s", ".0f"), _wrk(one_n, "requests_per_s", ".0f"), _ratio(one_p, one_n), "1.00"],
        [
            s["workers"],
            _wrk(s["proxy"], "requests_per_s", ".0f"),
            _wrk(s["nginx"], "requests_per_s", ".0f"),
            _ratio(s["proxy"], s["nginx"]),
            _spread(speed_up, ".2f"),
        ],
    ]
    where = (
        "the one-worker rows ran in the same rounds"
        if "proxy_one_worker" in s
        else "the one-worker rows are the hit runs"
    )
    return [
        *head,
        _rounds_line(results, "req/s") + f" {where}.",
        "",
        *_table(["workers", "proxy req/s", "nginx req/s", "proxy/nginx", "proxy speed-up"], rows),
    ]


def _profile(results: Mapping[str, Any]) -> list[str]:
    profile = results["profile"]
    if "error" in profile:
        return ["## Profile", "", f"not taken: {profile['error']}"]
    lines = ["## Profile (py-spy, 64 conns; share of samples)", ""]
    for workload, summary in profile.items():
        rows = [[f"{share:.1%}", frame] for frame, share in summary["self"][:10]]
        totals = [[f"{share:.1%}", frame] for frame, share in summary["total"][:10]]
        lines += [
            f"{workload}: where samples landed (collapsed stacks in results/{summary['collapsed_stacks']})",
            "",
            *_table(["self", "function"], rows),
            "",
            f"{workload}: on the stack",
            "",
            *_table(["total", "function"], totals),
            "",
        ]
    return lines


def _log(results: Mapping[str, Any]) -> list[str]:
    found = results["proxy_log"]
    lines = [f"## Proxy log: {found['warning']} warnings, {found['error']} errors", ""]
    return lines + [f"- `{line}`" for line in found["first"]]


def markdown(results: Mapping[str, Any]) -> str:
    """The whole report: environment line, hit, miss, stream/memory/start-up, scaling and target tables.

    Raises ResultsFormatError when *results* lacks a part the report needs.
    """
    try:
        return _markdown(results)
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultsFormatError(f"cannot render these results: {type(exc).__name__} {exc}") from exc


def _markdown(results: Mapping[str, Any]) -> str:
    env = results["environment"]
    who = "a second nginx (calibration run)" if env["calibrate"] else "the proxy"
    runs = (
        f"{env['rounds']} interleaved rounds of {env['duration_s']} s wrk runs"
        if "rounds" in env
        else f"{env['duration_s']} s per wrk run, one run per server"
    )
    lines = [
        f"# Benchmark: {who} vs nginx proxy_cache",
        "",
        f"commit {env['commit']}, {env['cpu']} x{env['cores']}, Python {env['python']}, {env['nginx']}, "
        f"{env['wrk']}, {env['redis']}; {runs}; servers on core "
        f"{env['server_core']}, wrk/Redis/upstream on core {env['load_core']}. Busy before the run: "
        + ", ".join(f"core {c} {b:.0%}" for c, b in env.get("cores_busy_before_start", {}).items())
        + ".",
        "",
    ]
    for sections, render in (
        (("hits",), _hits),
        (("misses",), _misses),
        (("stream_ttfb", "working_set", "startup_s"), _other),
        (("scaling",), _scaling),
        (("profile",), _profile),
        (("proxy_log",), _log),
    ):
        if any(section in results for section in sections):
            lines += [*render(results), ""]
    checks = targets(results)
    lines += [
        "## Targets",
        "",
        *_table(
            ["target", "measured", "goal", "met"],
            [
                [
                    c["target"],
                    f"{c['measured']:.3f} {c['unit']}",
                    f"{c['goal']} {c['unit']}",
                    "yes" if c["met"] else "NO",
                ]
                for c in checks
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Print the report of a results file; 1 with the reason when it cannot be rendered."""
    if len(argv) != 1:
        print("usage: python report.py RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        print(markdown(json.loads(path.read_text())))
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
