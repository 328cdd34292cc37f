"""One wrk run pinned to the load core, with CPU accounting, and the parser of what wrk 4 prints."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .processes import LOAD_CORE, SERVER_CORE, BenchmarkError, core_busy, core_times, cpu_seconds

LUA = Path(__file__).resolve().parent / "lua"

_TIME_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE_B = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_NUMBER_UNIT = r"([0-9.]+)([a-zA-Z]+)"

_TOTALS = re.compile(rf"^\s*(\d+) requests in {_NUMBER_UNIT}, {_NUMBER_UNIT} read\s*$", re.M)
_PERCENTILE = re.compile(rf"^\s*(50|75|90|99)%\s+{_NUMBER_UNIT}\s*$", re.M)
_LATENCY = re.compile(rf"^\s*Latency\s+{_NUMBER_UNIT}\s+{_NUMBER_UNIT}\s+{_NUMBER_UNIT}", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.M)


class WrkOutputError(ValueError):
    """The text is not the output of a finished ``wrk --latency`` run."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run. Latencies are milliseconds; counts are totals over the run."""

    requests: int
    duration_s: float
    requests_per_s: float
    bytes_read: int
    latency_avg_ms: float
    latency_max_ms: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int

    @property
    def errors(self) -> int:
        """Every failed request or socket error: a run with any is not a valid measurement."""
        return self.non_2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts


def _ms(number: str, unit: str) -> float:
    if unit not in _TIME_MS:
        raise WrkOutputError(f"unknown time unit {unit!r}")
    return float(number) * _TIME_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Return the numbers of a ``wrk --latency`` report; raise WrkOutputError when a required line is absent."""
    totals, rps, latency = _TOTALS.search(text), _RPS.search(text), _LATENCY.search(text)
    percentiles = {int(m[1]): _ms(m[2], m[3]) for m in _PERCENTILE.finditer(text)}
    if totals is None or rps is None or latency is None:
        raise WrkOutputError("no totals, Requests/sec or Latency line; did wrk finish?")
    if set(percentiles) != {50, 75, 90, 99}:
        raise WrkOutputError("no latency distribution; was wrk run with --latency?")
    if totals[5] not in _SIZE_B:
        raise WrkOutputError(f"unknown size unit {totals[5]!r}")
    socket = _SOCKET.search(text)
    connect, read, write, timeout = (int(g) for g in socket.groups()) if socket else (0, 0, 0, 0)
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests=int(totals[1]),
        duration_s=_ms(totals[2], totals[3]) / 1000.0,
        requests_per_s=float(rps[1]),
        bytes_read=round(float(totals[4]) * _SIZE_B[totals[5]]),
        latency_avg_ms=_ms(latency[1], latency[2]),
        latency_max_ms=_ms(latency[5], latency[6]),
        p50_ms=percentiles[50],
        p75_ms=percentiles[75],
        p90_ms=percentiles[90],
        p99_ms=percentiles[99],
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeout,
    )


def _argv(script: str, port: int, connections: int, duration_s: int, script_args: tuple[str, ...]) -> list[str]:
    argv = ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    argv += ["--timeout", "5s", "-s", str(LUA / script), f"http://127.0.0.1:{port}"]
    return [*argv, "--", *script_args] if script_args else argv


def run_wrk(
    script: str,
    port: int,
    connections: int,
    duration_s: int,
    watch: Mapping[str, int],
    script_args: tuple[str, ...] = (),
    label: str | None = None,
) -> dict[str, Any]:
    """One run of ``lua/<script>``; CPU seconds over the run of each watched process tree (role -> pid, the
    server under load first). *label* names the server in the progress line (default: its role).

    Raises BenchmarkError when wrk fails or reports any non-2xx response or socket error.
    """
    server = next(iter(watch))
    cpu_before = {role: cpu_seconds(pid) for role, pid in watch.items()}
    cores_before = core_times()
    started = time.perf_counter()
    done = subprocess.run(
        _argv(script, port, connections, duration_s, script_args),
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
    )
    wall_s = time.perf_counter() - started
    cores = core_busy(cores_before, core_times())
    cpu = {role: cpu_seconds(pid) - cpu_before[role] for role, pid in watch.items()}
    try:
        result = parse_wrk(done.stdout)
    except WrkOutputError as exc:
        raise BenchmarkError(f"wrk {script} on port {port}: {exc}\n{done.stdout}\n{done.stderr}") from None
    if result.errors:
        raise BenchmarkError(f"wrk {script} on port {port} saw errors:\n{done.stdout}")
    print(
        f"  {script:<15} {label or server:<16} c={connections:<3} {result.requests_per_s:>9.0f} req/s "
        f"p50={result.p50_ms:.3f}ms p99={result.p99_ms:.3f}ms",
        flush=True,
    )
    return _accounted(result, wall_s, cpu, cores, server)


def _accounted(
    result: WrkResult, wall_s: float, cpu: Mapping[str, float], cores: Mapping[int, float], server: str
) -> dict[str, Any]:
    """One run's record: wrk's numbers, and the CPU each watched role spent per request and per second."""
    return {
        "wrk": asdict(result),
        "wall_s": wall_s,
        "cpu_s": dict(cpu),
        "cpu_us_per_request": {role: s * 1e6 / max(result.requests, 1) for role, s in cpu.items()},
        "core_busy": {role: s / wall_s for role, s in cpu.items()},
        # Busy time on the server core not spent by the server: other load on the machine (or interrupts).
        "server_core_other": max(0.0, cores.get(SERVER_CORE, 0.0) - cpu[server] / wall_s),
        "cores_busy": dict(cores),
    }
