"""Markdown tables of the wrk runs: hits, misses and worker scaling, each number as median (min-max) of rounds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .figures import (
    CONNECTIONS,
    HIT_WORKLOADS,
    REDIS_HITS,
    REFERENCE,
    difference,
    gap_split,
    ratio,
    ratios,
    runs_of,
    servers,
    wrk_spread,
)

Entry = Mapping[str, Any]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(str(cell) for cell in row) + " |" for row in (header, ["---"] * len(header), *rows)]


def spread(s: Mapping[str, float], fmt: str) -> str:
    """``median (min-max)``, or only the value when there was one round."""
    if s["min"] == s["max"]:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def _wrk(entry: Entry | None, key: str, fmt: str = ".3f") -> str:
    return spread(wrk_spread(entry, key), fmt) if entry is not None else "-"


def _ratio(top: Entry | None, bottom: Entry | None) -> str:
    return spread(ratio(top, bottom), ".2f") if top is not None and bottom is not None else "-"


def _per_role(entry: Entry | None, key: str, role: str, fmt: str) -> str:
    return format(entry[key][role], fmt) if entry is not None else "-"


def _entries(phase: Mapping[str, Entry], prefix: str, names: Sequence[str]) -> list[Entry | None]:
    """The entries of *names* under *prefix*; the subject's and the reference's must be there, others may not."""
    return [
        phase[f"{prefix}/{n}"] if i == 0 or n == REFERENCE else phase.get(f"{prefix}/{n}") for i, n in enumerate(names)
    ]


def _noise(label: str, entry: Entry) -> list[str]:
    return [
        f"- {label} (round {i + 1}): {run['server_core_other']:.0%} of the server core went to other processes; noisy"
        for i, run in enumerate(runs_of(entry))
        if run.get("server_core_other", 0.0) > 0.05
    ]


def _capped(label: str, conns: int, entry: Entry) -> list[str]:
    """A note when the runs of *entry* used fewer connections than their row says (a peer's cap)."""
    used = sorted({int(run.get("connections", conns)) for run in runs_of(entry)})
    return [f"- {label}: ran with {', '.join(map(str, used))} connections, not {conns}"] if used != [conns] else []


def _stored(entry: Entry) -> float:
    """Redis keys added per request completed over a miss entry's rounds."""
    return float(entry["redis_keys_added"]) / max(float(entry["wrk"]["requests"]), 1.0)


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


def _hit_notes(workload: str, conns: int, name: str, run: Entry) -> list[str]:
    notes = []
    if run.get("upstream_requests"):
        notes.append(f"- {workload}/{conns}/{name}: {run['upstream_requests']} requests reached upstream")
    if not run.get("body_identical_to_upstream", True):
        notes.append(f"- {workload}/{name}: the hit's body differs from upstream's bytes")
    if run.get("headers_differing_from_proxy"):
        differing = ", ".join(run["headers_differing_from_proxy"])
        notes.append(f"- {workload}/{name}: headers unlike the proxy's hit: {differing}")
    return notes + _capped(f"{workload}/{conns}/{name}", conns, run) + _noise(f"{workload}/{conns}/{name}", run)


def _redis_notes(label: str, name: str, subject: str, run: Entry) -> list[str]:
    """A note when the proxy without its tier served hits that Redis did not find, or when the subject's hits,
    meant to come from its in-process tier, found their entries in Redis (more than 1 %)."""
    found = run.get("redis_keys_found")
    if found is None:
        return []
    requests = run["wrk"]["requests"]
    if name == REDIS_HITS and found < requests:
        return [f"- {label}: {found} entries found in Redis for {requests} hits: not every hit needed Redis"]
    if name == subject and found > requests / 100:
        return [f"- {label}: {found} entries found in Redis for {requests} hits: not all came from the in-process tier"]
    return []


def _gap_lines(results: Mapping[str, Any]) -> list[str]:
    split = [
        f"- {workload}: {s['gap_us']:.1f} µs, of which aiohttp's floor {s['aiohttp_us']:.1f} µs "
        f"({s['aiohttp_share']:.0%}) and the proxy's own work {s['proxy_us']:.1f} µs"
        for workload, s in gap_split(results).items()
    ]
    head = "CPU per hit the proxy spends above nginx at 64 conns (medians), split at the aiohttp floor:"
    return [head, "", *split, ""] if split else []


def hits(results: Mapping[str, Any]) -> list[str]:
    """Req/s and ratios, latency, and CPU per request of every hit workload and server, then notes on any run
    whose hits reached upstream, differed from upstream's bytes or the subject's headers, or shared its core."""
    names = servers(results, "hits")
    # The proxy without its tier is judged against nginx, as the subject is.
    redis_vs = [(names.index(REDIS_HITS), names.index(REFERENCE))] if {REDIS_HITS, REFERENCE} <= set(names) else []
    judged = not results["environment"]["calibrate"]
    speed, latency, cpu, notes = [], [], [], []
    for workload in HIT_WORKLOADS:
        for conns in CONNECTIONS:
            runs = _entries(results["hits"], f"{workload}/{conns}", names)
            rps = [_wrk(run, "requests_per_s", ".0f") for run in runs]
            ratios_ = [*(_ratio(runs[0], run) for run in runs[1:]), *(_ratio(runs[a], runs[b]) for a, b in redis_vs)]
            speed.append([workload, conns, *rps, *ratios_])
            latency.append([workload, conns, *(_wrk(run, key) for run in runs for key in ("p50_ms", "p99_ms"))])
            pairs = list(zip(runs, names, strict=True))
            busy = [_per_role(run, "core_busy", name, ".0%") for run, name in pairs]
            cpu.append([workload, conns, *(_per_role(r, "cpu_us_per_request", n, ".1f") for r, n in pairs), *busy])
            notes += [line for run, name in pairs if run is not None for line in _hit_notes(workload, conns, name, run)]
            notes += [
                line
                for run, name in pairs
                if run is not None and judged
                for line in _redis_notes(f"{workload}/{conns}/{name}", name, names[0], run)
            ]
    # A workload's body checks are shared by its runs at every connection count: each said once.
    notes = list(dict.fromkeys(notes))
    return [
        "## Cache hits",
        "",
        _rounds_line(results, "req/s"),
        "",
        *table(
            [
                "workload",
                "conns",
                *(f"{n} req/s" for n in names),
                *(f"{names[0]}/{n}" for n in names[1:]),
                *(f"{names[a]}/{names[b]}" for a, b in redis_vs),
            ],
            speed,
        ),
        "",
        "Latency in ms, median over the rounds of each run's percentile (min-max):",
        "",
        *table(["workload", "conns", *(f"{n} {p}" for n in names for p in ("p50", "p99"))], latency),
        "",
        "CPU per request and core busy, median over the rounds:",
        "",
        *table(["workload", "conns", *(f"{n} CPU µs/req" for n in names), *(f"{n} core busy" for n in names)], cpu),
        "",
        *_gap_lines(results),
        *notes,
    ]


def _miss_tables(results: Mapping[str, Any], names: list[str]) -> list[str]:
    sides, speed, rest = [*names, "upstream"], [], []
    for conns in CONNECTIONS:
        runs = _entries(results["misses"], f"miss/{conns}", sides)
        stored = _stored(runs[0]) if runs[0] is not None else 0.0
        rps = [_wrk(run, "requests_per_s", ".0f") for run in runs]
        speed.append([conns, *rps, *(_ratio(runs[0], run) for run in runs[1:-1])])
        latencies = [_wrk(run, key) for key in ("p50_ms", "p99_ms") for run in runs]
        cpus = [_per_role(run, "cpu_us_per_request", name, ".1f") for run, name in zip(runs[:-1], names, strict=True)]
        rest.append([conns, *latencies, *cpus, f"{stored:.2f}"])
    labels = [*names, "direct"]
    cpu = [f"{n} CPU µs/req" for n in names]
    return [
        *table(
            ["conns", *(f"{n} req/s" for n in names), "upstream direct req/s", *(f"{names[0]}/{n}" for n in names[1:])],
            speed,
        ),
        "",
        *table(
            ["conns", *(f"{n} {p} ms" for p in ("p50", "p99") for n in labels), *cpu, "Redis keys added per request"],
            rest,
        ),
    ]


def misses(results: Mapping[str, Any]) -> list[str]:
    """Req/s and ratios, latency, CPU and Redis writes per miss of every server with a miss path and of upstream
    itself, the latency each adds over upstream, and notes on shared cores or misses that were not stored."""
    entries, names = results["misses"], servers(results, "misses")
    notes = [line for key, run in entries.items() if not key.endswith("/upstream") for line in _noise(key, run)]
    notes += [line for key, run in entries.items() for line in _capped(key, int(key.split("/")[1]), run)]
    for conns in CONNECTIONS:
        stored = _stored(entries[f"miss/{conns}/{names[0]}"])
        if stored < 0.9 and not results["environment"]["calibrate"]:
            notes.append(f"- miss/{conns}/{names[0]}: only {stored:.0%} of the misses were written to Redis")
    direct = entries["miss/1/upstream"]
    added = [
        f"{n} {difference(entries[f'miss/1/{n}'], direct, 'p50_ms'):.3f} ms" for n in names if f"miss/1/{n}" in entries
    ]
    return [
        "## Cache misses (a new body every request)",
        "",
        _rounds_line(results, "req/s"),
        "",
        *_miss_tables(results, names),
        "",
        "Latency added over calling upstream directly (p50, 1 conn; median of the per-round differences): "
        + ", ".join(added)
        + ".",
        *notes,
    ]


def scaling(results: Mapping[str, Any]) -> list[str]:
    """N workers of proxy and nginx against one of each, run in the same rounds (older files: the hit runs)."""
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
    speed_up = spread(ratios(results)["scaling"]["speed-up"], ".2f")
    rows = [
        [count, _wrk(p, "requests_per_s", ".0f"), _wrk(n, "requests_per_s", ".0f"), _ratio(p, n), up]
        for count, p, n, up in ((1, one_p, one_n, "1.00"), (s["workers"], s["proxy"], s["nginx"], speed_up))
    ]
    same = "proxy_one_worker" in s
    where = "the one-worker rows ran in the same rounds" if same else "the one-worker rows are the hit runs"
    return [
        *head,
        _rounds_line(results, "req/s") + f" {where}.",
        "",
        *table(["workers", "proxy req/s", "nginx req/s", "proxy/nginx", "proxy speed-up"], rows),
    ]


def _before_after_row(entries: Mapping[str, Entry], workload: str, conns: int) -> list[object] | None:
    top, bottom = entries.get(f"{workload}/{conns}/proxy"), entries.get(f"{workload}/{conns}/baseline")
    if top is None or bottom is None:
        return None
    by_round = ratio(top, bottom)
    cpu = " / ".join(
        _per_role(run, "cpu_us_per_request", name, ".1f") for run, name in ((top, "proxy"), (bottom, "baseline"))
    )
    return [
        workload,
        conns,
        _wrk(top, "requests_per_s", ".0f"),
        _wrk(bottom, "requests_per_s", ".0f"),
        spread(by_round, ".2f"),
        " ".join(f"{value:.2f}" for value in by_round["rounds"]),
        f"{_wrk(top, 'p50_ms')} / {_wrk(bottom, 'p50_ms')}",
        cpu,
    ]


def before_after(results: Mapping[str, Any]) -> list[str]:
    """This checkout's proxy over the ``--baseline`` one, round by round, for each hit workload and the misses;
    nothing when the run had no baseline. A change to the request path is judged by these ratios: both proxies
    ran seconds apart in every round, so the drift of the machine between rounds cancels out."""
    base = results["environment"].get("baseline")
    if base is None:
        return []
    rows = [
        row
        for phase, workloads in (("hits", HIT_WORKLOADS), ("misses", ("miss",)))
        for workload in workloads
        for conns in CONNECTIONS
        if (row := _before_after_row(results.get(phase, {}), workload, conns)) is not None
    ]
    header = ["workload", "conns", "proxy req/s", "baseline req/s", "proxy/baseline", "per round"]
    header += ["p50 ms proxy / baseline", "CPU µs/req proxy / baseline"]
    return [
        f"## Before/after: this checkout over {base['ref']} ({base['commit']} {base['subject']})",
        "",
        "req/s of the proxy over the baseline's, computed within each round (both ran in the same interleaved "
        "rounds), then the median (min-max); below 1.00 this checkout is slower:",
        "",
        *table(header, rows),
        *_ttfb_before_after(results),
    ]


def _ttfb_before_after(results: Mapping[str, Any]) -> list[str]:
    stream = results.get("stream_ttfb", {})
    lines = []
    for label, key in (("new connection", "new_connection"), ("kept-alive", "kept_alive")):
        sides = stream.get(key, {})
        if "baseline" in sides:
            proxy, base = (sides[side]["first_event_added_ms"] for side in ("proxy", "baseline"))
            lines.append(
                f"- streamed miss, first event added over direct, {label}: proxy {proxy:.3f} ms, baseline "
                f"{base:.3f} ms ({proxy - base:+.3f} ms)"
            )
    return ["", *lines] if lines else []
