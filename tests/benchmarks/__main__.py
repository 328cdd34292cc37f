"""``python -m tests.benchmarks``: measure the proxy against nginx ``proxy_cache``, or print an earlier report."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from . import checkout, figures, peers, phases, processes, report
from .processes import LOAD_CORE, SERVER_CORE, BenchmarkError
from .stack import HERE, REPO, Bench, python_env, servers_for, setup

RESULTS = HERE / "results"
TOOLS = ("wrk", "nginx", "redis-server", "taskset")
INSTALL_HINT = "apt-get install -y wrk nginx-light redis-server util-linux"
DESCRIPTION = "Measure the proxy against nginx proxy_cache, or print the report of an earlier run."
PHASES = tuple(phase.__name__.removeprefix("measure_") for phase in phases.ALL)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=DESCRIPTION)
    add = parser.add_argument
    add("--quick", action="store_true", help="1 s per run and smaller samples (a smoke run)")
    add("--duration", type=int, help="seconds per wrk run (default 4, or 1 with --quick)")
    add("--rounds", type=int, default=3, help="interleaved rounds of the hit, miss and scaling runs (default 3)")
    add("--workers", type=int, default=2, help="proxy workers for the scaling run; 1 skips it")
    add("--profile", action="store_true", help="after the measured runs, sample the proxy with py-spy under load")
    add("--keep", action="store_true", help="keep the scratch dir (configs and process logs)")
    add("--calibrate", action="store_true", help="a second nginx where the proxy goes: ratios should be near 1.0")
    add("--log-level", default="WARNING", help="LOG_LEVEL given to the proxy (default WARNING)")
    add("--baseline", metavar="REF", help="also measure the proxy of git ref REF in the same rounds: before/after")
    add("--only", metavar="PHASES", help=f"comma-separated phases to run (default all): {','.join(PHASES)}")
    add(
        "--peers", metavar="NAMES", help=f"also measure these peers in the hit and miss rounds: {','.join(peers.PEERS)}"
    )
    add(
        "--proxy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for this checkout's proxy only (repeatable), e.g. CACHE_TTL=60",
    )
    add(
        "--redis-mode",
        choices=("standalone", "cluster", "sentinel"),
        default="standalone",
        help="this checkout's proxy uses a 3-master Redis Cluster or a Sentinel-managed master instead of the "
        "single Redis that the baseline and the peers keep (default standalone)",
    )
    add("--report", type=Path, metavar="FILE.json", help="print the report of an earlier run's results and exit")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1 if args.quick else 4)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.only = [name.strip() for name in args.only.split(",")] if args.only else []
    if unknown := [name for name in args.only if name not in PHASES]:
        parser.error(f"--only: unknown phase {', '.join(unknown)}; phases are {', '.join(PHASES)}")
    if malformed := [item for item in args.proxy_env if "=" not in item]:
        parser.error(f"--proxy-env takes NAME=VALUE, got {', '.join(malformed)}")
    args.peers = [name.strip() for name in args.peers.split(",")] if args.peers else []
    if unknown := [name for name in args.peers if name not in peers.PEERS]:
        parser.error(f"--peers: unknown peer {', '.join(unknown)}; peers are {', '.join(peers.PEERS)}")
    return args


def runs_phase(args: argparse.Namespace, name: str) -> bool:
    """Whether phase *name* runs: the phases ``--only`` lists, or else all but the profile unless ``--profile``."""
    if args.only:
        return name in args.only
    return name != "profile" or bool(args.profile)


def _output(argv: Sequence[str], **kwargs: Any) -> str:
    """What *argv* prints (stdout, then stderr), stripped; ``"?"`` when it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, **kwargs)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip() or "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _cpuinfo() -> list[str]:
    return Path("/proc/cpuinfo").read_text().splitlines()


def environment(args: argparse.Namespace) -> dict[str, object]:
    """Commit, machine, tool versions and options: what a reader needs to compare two result files."""
    git = ["git", "-C", str(REPO)]
    dirty = _output([*git, "status", "--porcelain", "--", "proxy"]) not in ("", "?")
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "?")
    return {
        "commit": _output([*git, "rev-parse", "--short", "HEAD"]) + ("+dirty" if dirty else ""),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "wrk": _output(["wrk", "--version"]).splitlines()[0].split(" Copyright")[0],
        "nginx": _output(["nginx", "-v"]).splitlines()[0],
        "redis": " ".join(_output(["redis-server", "--version"]).split()[:3]),
        "proxy_source": _output([sys.executable, "-c", "import proxy; print(proxy.__file__)"], env=python_env()),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "quick": args.quick,
        "calibrate": args.calibrate,
        "log_level": args.log_level,
        "only": args.only,
        "proxy_env": args.proxy_env,
        "redis_mode": args.redis_mode,
        "server_core": SERVER_CORE,
        "load_core": LOAD_CORE,
    }


def _scratch_dir() -> Path:
    # The nginx cache sits in RAM when /dev/shm has room, as the proxy's cache does in Redis.
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * 1024**3
    return Path(tempfile.mkdtemp(prefix="llm-cache-bench-", dir=shm if roomy else None))


def _busy_before_start() -> dict[int, float]:
    before = processes.core_times()
    time.sleep(1.0)
    busy = processes.core_busy(before, processes.core_times())
    if max(busy.values()) > 0.1:
        print(f"warning: the machine is busy before the run starts ({busy}); numbers will be noisy", flush=True)
    return busy


def _check_baseline(bench: Bench, src: Path) -> None:
    """BenchmarkError unless the baseline checkout's own ``proxy`` is what its ``python -m proxy`` imports."""
    found = checkout.proxy_source(src, python_env(src))
    bench.results["environment"]["baseline"]["proxy_source"] = found
    if not found.startswith(str(src / "proxy")):
        raise BenchmarkError(f"python -m proxy would not run the baseline checkout's proxy: {found}")


def _measure(bench: Bench, baseline: str | None) -> None:
    """Check the baseline commit out when there is one, start the stack, run the phases asked for, and record the
    proxy's RSS after each; every process is stopped before the baseline's worktree is removed."""
    with ExitStack() as stack:
        if baseline is not None:
            src = bench.tmp / f"baseline-{baseline[:12]}"
            bench.baseline_src = stack.enter_context(checkout.worktree(REPO, baseline, src))
            _check_baseline(bench, src)
        stack.callback(bench.stop_all)
        setup(bench)
        rss = bench.results["proxy_rss_kib"] = {"start": processes.memory_kib(bench.pids["proxy"])["VmRSS"]}
        for phase in phases.ALL:
            name = phase.__name__.removeprefix("measure_")
            if runs_phase(bench.args, name):
                print(f"{name}:", flush=True)
                phase(bench)
                rss[name] = processes.memory_kib(bench.pids["proxy"])["VmRSS"]


def _write(bench: Bench) -> list[Path]:
    """Print the report and write it beside the results; return both files."""
    text = report.markdown(bench.results)
    print(text)
    bench.results["ratios"] = figures.ratios(bench.results)
    bench.results["targets"] = figures.targets(bench.results)
    json_path, md_path = bench.out_prefix.with_suffix(".json"), bench.out_prefix.with_suffix(".md")
    json_path.write_text(json.dumps(bench.results, indent=2) + "\n")
    md_path.write_text(text + "\n")
    return [json_path, md_path]


def _unfit() -> str | None:
    """Why this machine cannot run the benchmark (a tool or a core missing), or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing: {', '.join(missing)}. Install with: {INSTALL_HINT}"
    if len(os.sched_getaffinity(0)) < 2:
        return "needs two CPU cores (server on core 0, load on core 1)"
    return None


def _baseline(args: argparse.Namespace, env: dict[str, object]) -> str | None:
    """The commit ``--baseline`` names, recorded in *env*; None without the option. Raises CheckoutError."""
    if not args.baseline:
        return None
    commit = checkout.resolve(REPO, args.baseline)
    env["baseline"] = {"ref": args.baseline, **checkout.describe(REPO, commit)}
    return commit


def run(args: argparse.Namespace) -> int:
    """Measure everything; 0 on success, 1 when a measurement was invalid, 2 when the machine lacks a tool or core
    or the proxy (this checkout's, or the baseline's) cannot be run."""
    env = environment(args)
    problem = _unfit()
    if problem is None and not str(env["proxy_source"]).startswith(str(REPO / "proxy")):
        problem = f"python -m proxy would not run this checkout's proxy: {env['proxy_source']}"
    try:
        baseline = _baseline(args, env)
    except checkout.CheckoutError as exc:
        problem = problem or str(exc)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOAD_CORE})
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ("-calibrate" if args.calibrate else "")
    RESULTS.mkdir(exist_ok=True)
    chosen, skipped = peers.select(args.peers)
    env["peers"] = {server.name: peers.version(server.name) for server in chosen}
    servers = (*servers_for(args), *chosen)
    bench = Bench(args, _scratch_dir(), f"{time.time_ns():x}", RESULTS / stamp, servers=servers)
    bench.results["environment"] = env | {"cores_busy_before_start": _busy_before_start(), "peers_skipped": skipped}
    print(f"scratch dir {bench.tmp}; {args.rounds} rounds of {args.duration} s wrk runs", flush=True)
    try:
        _measure(bench, baseline)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}\nlogs in {bench.tmp}", file=sys.stderr)
        return 1
    finally:
        bench.stop_all()
        for role in ("proxy", "baseline") if baseline else ("proxy",):
            bench.results[f"{role}_log"] = processes.scan_logs(sorted(bench.tmp.glob(f"{role}*.log")))
        for cache in bench.tmp.glob("*/cache"):
            shutil.rmtree(cache, ignore_errors=True)
    return _finish(bench)


def _finish(bench: Bench) -> int:
    """Write the report and results, remove the scratch dir unless ``--keep``; 0."""
    written = _write(bench)
    if bench.args.keep:
        print(f"\nconfigs and logs kept in {bench.tmp}")
    else:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    print("\nresults: " + ", ".join(str(path.relative_to(REPO)) for path in written))
    return 0


def reprint(path: Path) -> int:
    """Print the report of a results file; 1 with the reason when it cannot be rendered."""
    try:
        print(report.markdown(json.loads(path.read_text())))
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    return 0


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return reprint(args.report)
    signal.signal(signal.SIGTERM, _terminate)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
