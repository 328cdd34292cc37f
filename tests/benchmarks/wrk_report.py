"""Parse the text wrk 4 prints with ``--latency`` into numbers."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
