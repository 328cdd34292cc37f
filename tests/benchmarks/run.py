"""Benchmark the proxy against nginx ``proxy_cache`` in one run; every process is started and stopped here.

    python tests/benchmarks/run.py [--quick] [--duration S] [--rounds N] [--workers N] [--profile] [--keep]
                                   [--calibrate]

See README.md beside this file for what is measured, how, and the targets.
"""

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
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import figures
import harness
import phases
import report
from harness import BenchmarkError
from stack import HERE, LOAD_CORE, REPO, SERVER_CORE, Bench, setup

TOOLS = ("wrk", "nginx", "redis-server", "taskset")
INSTALL_HINT = "apt-get install -y wrk nginx-light redis-server util-linux"


def environment(args: argparse.Namespace) -> dict[str, object]:
    """Commit, machine, tool versions and options: what a reader needs to compare two result files."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "proxy"], capture_output=True, text=True
        ).stdout.strip()
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    redis = " ".join(harness.tool_version(["redis-server", "--version"]).split()[:3])
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "wrk": harness.tool_version(["wrk", "--version"]).split(" Copyright")[0],
        "nginx": harness.tool_version(["nginx", "-v"]),
        "redis": redis,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "quick": args.quick,
        "calibrate": args.calibrate,
        "log_level": args.log_level,
        "server_core": SERVER_CORE,
        "load_core": LOAD_CORE,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the proxy against nginx proxy_cache.")
    parser.add_argument("--quick", action="store_true", help="1 s per run and smaller samples (a smoke run)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 4, or 1 with --quick)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the hit, miss and scaling runs (default 3)"
    )
    parser.add_argument("--workers", type=int, default=2, help="proxy workers for the scaling run; 1 skips it")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measured runs, sample the proxy with py-spy under the hit and miss loads",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (configs and process logs)")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="put a second nginx where the proxy goes: every ratio should come out near 1.0",
    )
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL given to the proxy (default WARNING)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1 if args.quick else 4)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run every phase; 0 on success, 1 when a measurement was invalid, 2 when the machine lacks a tool or core."""
    args = parse_args(argv)
    missing = harness.missing_tools(TOOLS)
    if missing:
        print(f"missing: {', '.join(missing)}. Install with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two CPU cores (server on core 0, load on core 1)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    os.sched_setaffinity(0, {LOAD_CORE})
    # The nginx cache sits in RAM when /dev/shm has room, as the proxy's cache does in Redis.
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * 1024**3
    tmp = Path(tempfile.mkdtemp(prefix="llm-cache-bench-", dir=shm if roomy else None))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ("-calibrate" if args.calibrate else "")
    (HERE / "results").mkdir(exist_ok=True)
    bench = Bench(args, tmp, f"{time.time_ns():x}", HERE / "results" / stamp)
    bench.results["environment"] = environment(args)
    before = harness.core_times()
    time.sleep(1.0)
    idle_busy = harness.core_busy(before, harness.core_times())
    bench.results["environment"]["cores_busy_before_start"] = idle_busy
    if max(idle_busy.values()) > 0.1:
        print(f"warning: the machine is busy before the run starts ({idle_busy}); numbers will be noisy", flush=True)
    print(f"scratch dir {bench.tmp}; {args.rounds} rounds of {args.duration} s wrk runs", flush=True)
    try:
        setup(bench)
        rss = bench.results["proxy_rss_kib"] = {"start": harness.memory_kib(bench.pids["proxy"])["VmRSS"]}
        for phase in phases.ALL:
            if phase is not phases.measure_profile or args.profile:
                name = phase.__name__.removeprefix("measure_")
                print(f"{name}:", flush=True)
                phase(bench)
                rss[name] = harness.memory_kib(bench.pids["proxy"])["VmRSS"]
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}\nlogs in {bench.tmp}", file=sys.stderr)
        return 1
    finally:
        for service in reversed(bench.services):
            harness.stop(service)
        bench.results["proxy_log"] = harness.scan_logs(sorted(bench.tmp.glob("proxy*.log")))
        for cache in bench.tmp.glob("*/cache"):
            shutil.rmtree(cache, ignore_errors=True)
    print(report.markdown(bench.results))
    bench.results["ratios"] = figures.ratios(bench.results)
    bench.results["targets"] = figures.targets(bench.results)
    out = bench.out_prefix.with_suffix(".json")
    out.write_text(json.dumps(bench.results, indent=2) + "\n")
    if args.keep:
        print(f"\nconfigs and logs kept in {bench.tmp}")
    else:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    print(f"\nresults: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
