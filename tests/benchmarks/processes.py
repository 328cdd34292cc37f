"""Processes the benchmark owns: start pinned to cores, wait until they answer, read /proc, stop by group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# The server measured runs alone on one core; the load generator and everything that serves it share the other.
SERVER_CORE, LOAD_CORE = 0, 1


class BenchmarkError(RuntimeError):
    """The run cannot produce a valid measurement; the message says why."""


@dataclass
class Service:
    """A started process, its own process group, and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    name: str,
    argv: Sequence[str],
    cores: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    """Start *argv* under ``taskset -c cores`` in a new session, so that stopping it reaches its children."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        started_at = time.perf_counter()
        popen = subprocess.Popen(
            ["taskset", "-c", cores, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    return Service(name, popen, log_path, started_at)


def stop(service: Service, timeout_s: float = 5.0) -> None:
    """SIGTERM the service's main process, as a service manager would; SIGKILL its group after *timeout_s*."""
    try:
        os.kill(service.pid, signal.SIGTERM)
        service.popen.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.perf_counter() + timeout_s
    # Workers may still be finishing after their master returned; the group id stays ours until they are gone.
    while time.perf_counter() < deadline:
        try:
            os.killpg(service.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    try:
        os.killpg(service.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    service.popen.wait()


def http_probe(path: str) -> bytes:
    """The bytes of a ``GET path`` that closes its connection, for ``wait_ready``."""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()


def wait_ready(service: Service, port: int, probe: bytes, expect: bytes, timeout_s: float = 15.0) -> float:
    """Send *probe* on fresh connections until the reply starts with *expect*; return seconds since start."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if service.popen.poll() is not None:
            raise BenchmarkError(f"{service.name} exited with {service.popen.returncode}:\n{service.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(probe)
                if sock.recv(64).startswith(expect):
                    return time.perf_counter() - service.started_at
        except OSError:
            pass
        time.sleep(0.0005)
    raise BenchmarkError(f"{service.name} did not answer on port {port} within {timeout_s} s:\n{service.log_tail()}")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may contain spaces; the fields after it start at "state".
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """Return *pid* and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by *pid* and its live descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS_PER_S


def core_times() -> dict[int, tuple[int, int]]:
    """Per core, (busy, total) jiffies since boot from /proc/stat.

    Busy is process time plus steal (the hypervisor running someone else). Interrupt time is left out: loopback
    traffic the server itself causes is handled there, and it is not charged to any process.
    """
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
            times[int(name[3:])] = (
                user + nice + system + steal,
                user + nice + system + idle + iowait + irq + softirq + steal,
            )
    return times


def core_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """Share of each core's time spent busy between two ``core_times`` snapshots."""
    return {
        core: (after[core][0] - before[core][0]) / max(after[core][1] - before[core][1], 1)
        for core in after
        if core in before
    }


def memory_kib(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak RSS) and ``VmRSS`` of *pid* in KiB, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values


def scan_logs(paths: Sequence[Path], limit: int = 5) -> dict[str, object]:
    """Count warning, error and traceback lines in *paths*; keep the first *limit* distinct ones, shortened."""
    counts = {"warning": 0, "error": 0}
    first: list[str] = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            upper = line.upper()
            # A warning may quote an exception name ("error=MaxConnectionsError"), so its level is looked at first.
            kind = "warning" if "WARNING" in upper else "error" if "ERROR" in upper or "TRACEBACK" in upper else None
            if kind is None:
                continue
            counts[kind] += 1
            short = f"{path.stem}: {line[:200]}"
            if len(first) < limit and short not in first:
                first.append(short)
    return {**counts, "first": first}
