"""A run's results as one Markdown report: the wrk tables, stream, memory, start-up, profile, log and targets."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from .figures import MIB_KIB, targets, ttfb
from .tables import before_after, hits, misses, scaling, table

# kept-alive TTFB side -> (its name, what it adds over the side before it)
TTFB_STEPS = (
    ("relay", "bare aiohttp relay", "aiohttp server and client, stream copy"),
    ("off", "proxy, CACHE_BACKEND=off", "+ the proxy's own miss path: key, plan, headers, recording"),
    ("memory", "proxy, CACHE_BACKEND=memory", "+ in-process lookup"),
    ("redis", "proxy, CACHE_BACKEND=redis", "+ Redis lookup (in-process tier, then a Redis GET)"),
)
TTFB_ROWS = (("new connection per request", "new_connection"), ("one kept-alive connection per side", "kept_alive"))


class ResultsFormatError(ValueError):
    """A results file lacks what the report needs (not one this benchmark wrote, or from a much older one)."""


def _ttfb_rows(t: Mapping[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, key in (k for k in TTFB_ROWS if k[1] in t):
        direct, proxy = t[key]["direct"], t[key]["proxy"]
        for what, m in (
            (f"first SSE event, {label} (median of {t['samples']})", "first_event"),
            (f"first response byte, {label}", "first_byte"),
        ):
            via = f"{direct[f'{m}_ms']:.2f} ms direct, {proxy[f'{m}_ms']:.2f} ms via proxy"
            rows.append([f"streamed miss, {what}", via, f"{proxy[f'{m}_added_ms']:.3f} ms added"])
            if base := t[key].get("baseline"):
                via = f"{base[f'{m}_ms']:.2f} ms via the baseline proxy"
                rows.append([f"streamed miss, {what}, baseline", via, f"{base[f'{m}_added_ms']:.3f} ms added"])
    return rows


def _memory_rows(results: Mapping[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    if "working_set" in results:
        w = results["working_set"]
        peak, nginx_peak = (w[key]["VmHWM"] / MIB_KIB for key in ("memory_kib", "nginx_memory_kib"))
        passes = f"pass 1 {w['passes'][0]}, pass 2 {w['passes'][1]}"
        rows += [
            [f"working set of {w['entries']} bodies, sent twice", passes, f"{w['seconds']:.1f} s"],
            ["proxy peak RSS (VmHWM) after all runs", f"{peak:.1f} MiB", f"nginx VmHWM {nginx_peak:.1f} MiB"],
        ]
    if "proxy_rss_kib" in results:
        phases = ", ".join(f"{phase} {kib / MIB_KIB:.1f}" for phase, kib in results["proxy_rss_kib"].items())
        rows.append(["proxy RSS (VmRSS) after each phase", f"{phases} MiB", ""])
    if s := results.get("startup_s"):
        spread = f"min {min(s):.3f} s, max {max(s):.3f} s"
        rows.append(
            [f"process start to first /healthz 200 ({len(s)} starts)", f"median {statistics.median(s):.3f} s", spread]
        )
    return rows


def _other(results: Mapping[str, Any]) -> list[str]:
    t = ttfb(results) if "stream_ttfb" in results else {}
    rows = _ttfb_rows(t) + _memory_rows(results)
    breakdown = _ttfb_breakdown(t["kept_alive_backends"], t["samples"]) if "kept_alive_backends" in t else []
    return ["## Stream, memory, start-up", "", *table(["measure", "value", "detail"], rows), *breakdown]


def _ttfb_breakdown(sides: Mapping[str, Mapping[str, float]], samples: int) -> list[str]:
    """Kept-alive first-event time added by a bare aiohttp relay and by the proxy per ``CACHE_BACKEND``, and what
    each step adds over the one before."""
    rows, before = [], 0.0
    for side, name, step in TTFB_STEPS:
        if side not in sides:
            continue
        s, added = sides[side], sides[side]["first_event_added_ms"]
        cells = (s["first_event_ms"], added, s["first_byte_added_ms"])
        rows.append([name, *(f"{cell:.3f}" for cell in cells), step, f"{added - before:+.3f}"])
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
        *table(["via", "first event ms", "first event added ms", "first byte added ms", "step", "step adds ms"], rows),
    ]


def _profile(results: Mapping[str, Any]) -> list[str]:
    profile = results["profile"]
    if "error" in profile:
        return ["## Profile", "", f"not taken: {profile['error']}"]
    lines = ["## Profile (py-spy, 64 conns; share of samples)", ""]
    for workload, summary in profile.items():
        lines += [
            f"{workload}: where samples landed (collapsed stacks in results/{summary['collapsed_stacks']})",
            "",
            *table(["self", "function"], [[f"{share:.1%}", frame] for frame, share in summary["self"][:10]]),
            "",
            f"{workload}: on the stack",
            "",
            *table(["total", "function"], [[f"{share:.1%}", frame] for frame, share in summary["total"][:10]]),
            "",
        ]
    return lines


def _peers(results: Mapping[str, Any]) -> list[str]:
    """The peers asked for: version and start-up time of each measured, and why any was skipped."""
    env = results["environment"]
    measured, skipped = env.get("peers", {}), env.get("peers_skipped", {})
    if not measured and not skipped:
        return []
    started = results.get("servers_startup_s", {})
    rows = [[name, version, f"{started[name]:.2f} s" if name in started else "-"] for name, version in measured.items()]
    lines = ["## Peers"]
    if rows:
        lines += [
            "",
            "Measured in the same rounds as nginx and the proxy (tables above). A peer without an `X-Cache` header "
            "was checked to hit by the fake upstream's request counter standing still.",
            "",
            *table(["peer", "version", "process start to ready"], rows),
        ]
    return [*lines, "", *(f"- {name} skipped: {reason}" for name, reason in skipped.items())] if skipped else lines


def _log(results: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, title in (("proxy_log", "Proxy log"), ("baseline_log", "Baseline proxy log")):
        if found := results.get(key):
            lines += ["", f"## {title}: {found['warning']} warnings, {found['error']} errors", ""]
            lines += [f"- `{line}`" for line in found["first"]]
    return lines[1:]


def _measured(check: Mapping[str, Any]) -> str:
    """The measured value with its unit, and the min-max of a ratio computed per round when it varied."""
    value = f"{check['measured']:.3f} {check['unit']}"
    if "min" in check and check["min"] != check["max"]:
        value += f" ({check['min']:.3f}-{check['max']:.3f})"
    return value


def _targets(results: Mapping[str, Any]) -> list[str]:
    rows = [
        [c["target"], _measured(c), f"{c['goal']} {c['unit']}", "yes" if c["met"] else "NO"] for c in targets(results)
    ]
    return [
        "## Targets",
        "",
        "Ratios to nginx are computed within each round, then the median (min-max) is shown:",
        "",
        *table(["target", "measured", "goal", "met"], rows),
    ]


def _heading(env: Mapping[str, Any]) -> list[str]:
    who = "a second nginx (calibration run)" if env["calibrate"] else "the proxy"
    runs = (
        f"{env['rounds']} interleaved rounds of {env['duration_s']} s wrk runs"
        if "rounds" in env
        else f"{env['duration_s']} s per wrk run, one run per server"
    )
    busy = ", ".join(f"core {c} {b:.0%}" for c, b in env.get("cores_busy_before_start", {}).items())
    libraries = "".join(f", {name} {env[name]}" for name in ("aiohttp", "uvloop") if name in env)
    base = env.get("baseline")
    against = f" Baseline: {base['ref']} = {base['commit']}." if base else ""
    mode, settings = env.get("redis_mode", "standalone"), " ".join(env.get("proxy_env", []))
    if mode != "standalone":
        against += f" This checkout's proxy runs on Redis {mode}; the baseline and the peers on the single Redis."
    if settings:
        against += f" This checkout's proxy has {settings}."
    return [
        f"# Benchmark: {who} vs nginx proxy_cache",
        "",
        f"commit {env['commit']}, {env['cpu']} x{env['cores']}, Python {env['python']}{libraries}, {env['nginx']}, "
        f"{env['wrk']}, {env['redis']}; {runs}; servers on core {env['server_core']}, wrk/Redis/upstream on core "
        f"{env['load_core']}. Busy before the run: {busy}.{against}",
        "",
    ]


SECTIONS = (
    (("hits", "misses"), before_after),
    (("hits",), hits),
    (("misses",), misses),
    (("stream_ttfb", "working_set", "startup_s"), _other),
    (("environment",), _peers),
    (("scaling",), scaling),
    (("profile",), _profile),
    (("proxy_log", "baseline_log"), _log),
)


def markdown(results: Mapping[str, Any]) -> str:
    """The whole report: environment line, the sections *results* has, and the target check.

    Raises ResultsFormatError when *results* lacks a part the report needs.
    """
    try:
        lines = _heading(results["environment"])
        for keys, render in SECTIONS:
            if any(key in results for key in keys) and (section := render(results)):
                lines += [*section, ""]
        return "\n".join(lines + _targets(results))
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultsFormatError(f"cannot render these results: {type(exc).__name__} {exc}") from exc
