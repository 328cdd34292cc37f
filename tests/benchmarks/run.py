"""Benchmark the proxy against nginx ``proxy_cache`` in one run; every process is started and stopped here.

    python tests/benchmarks/run.py [--quick] [--duration S] [--workers N] [--calibrate]

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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import harness
import nginx_conf
import openai_shapes
import probes
import report
from harness import BenchmarkError, Service
from wrk_report import WrkOutputError, WrkResult, parse_wrk

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LUA = HERE / "lua"
TOOLS = ("wrk", "nginx", "redis-server", "taskset")
INSTALL_HINT = "apt-get install -y wrk nginx-light redis-server util-linux"
SERVER_CORE, LOAD_CORE = 0, 1
CHAT = "/v1/chat/completions"
# name: (wrk script, path, request body, upstream response the hit must equal)
HIT_WORKLOADS = {
    "hit": ("hit.lua", CHAT, "chat", openai_shapes.chat_completion()),
    "stream": ("stream.lua", CHAT, "chat_stream", b"".join(openai_shapes.chat_chunks())),
    "embeddings": ("embeddings.lua", "/v1/embeddings", "embeddings", openai_shapes.embeddings()),
}
CONNECTIONS = (64, 1)


@dataclass
class Bench:
    """What one run started and measured so far."""

    args: argparse.Namespace
    tmp: Path
    run_id: str
    services: list[Service] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    results: dict[str, object] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], cores: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Service:
        service = harness.start(name, argv, cores, self.tmp, env=env, cwd=cwd)
        self.services.append(service)
        return service

    def stop(self, service: Service) -> None:
        harness.stop(service)
        self.services.remove(service)


def nginx_argv(root: Path, workers: int) -> list[str]:
    single = " master_process off;" if workers == 1 else ""
    return ["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log"),
            "-g", f"daemon off;{single}"]


def start_nginx(bench: Bench, name: str, conf: str, root: Path, cores: str, workers: int = 1) -> Service:
    root.mkdir(parents=True, exist_ok=True)
    (root / "nginx.conf").write_text(conf)
    return bench.start(name, nginx_argv(root, workers), cores)


def start_proxy(bench: Bench, name: str, upstream_port: int, workers: int = 1,
                cores: str = str(SERVER_CORE)) -> tuple[Service, int, float]:
    """Start the proxy (or, with --calibrate, a second nginx reference) and wait for ``/healthz``.

    Returns the service, its port, and seconds from process start to the first 200.
    """
    port = harness.free_port()
    if bench.args.calibrate:
        root = bench.tmp / name
        service = start_nginx(bench, name, nginx_conf.reference_conf(root, port, upstream_port, workers),
                              root, cores, workers)
    else:
        env = {k: v for k, v in os.environ.items() if k not in ("PROXY_CONFIG", "PROXY_WORKERS")}
        env.update(PYTHONPATH=str(REPO), PROXY_HOST="127.0.0.1", PROXY_PORT=str(port),
                   UPSTREAM_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1", OPENAI_API_KEY="sk-bench",
                   REDIS_URL=f"redis://127.0.0.1:{bench.ports['redis']}/0", CACHE_BACKEND="redis",
                   CACHE_NAMESPACE=f"bench-{bench.run_id}-{name}", CACHE_TTL="3600",
                   LOG_LEVEL=bench.args.log_level)
        argv = [sys.executable, "-m", "proxy"] + (["--workers", str(workers)] if workers > 1 else [])
        # A scratch cwd keeps a developer's proxy.yaml or .env out of the measurement.
        service = bench.start(name, argv, cores, env=env, cwd=bench.tmp)
    started_s = harness.wait_ready(service, port, harness.http_probe("/healthz"), b"HTTP/1.1 200")
    return service, port, started_s


def run_wrk(bench: Bench, script: str, port: int, connections: int, duration_s: int,
            watch: dict[str, int], script_args: tuple[str, ...] = ()) -> dict[str, object]:
    """One wrk run on the load core; CPU seconds of every watched process tree over the run.

    Raises BenchmarkError when wrk fails or reports any non-2xx response or socket error.
    """
    argv = ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency",
            "--timeout", "5s", "-s", str(LUA / script), f"http://127.0.0.1:{port}"]
    if script_args:
        argv += ["--", *script_args]
    cpu_before = {role: harness.cpu_seconds(pid) for role, pid in watch.items()}
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    wall_s = time.perf_counter() - started
    cpu = {role: harness.cpu_seconds(pid) - cpu_before[role] for role, pid in watch.items()}
    try:
        result: WrkResult = parse_wrk(done.stdout)
    except WrkOutputError as exc:
        raise BenchmarkError(f"wrk {script} on port {port}: {exc}\n{done.stdout}\n{done.stderr}") from None
    if result.errors:
        raise BenchmarkError(f"wrk {script} on port {port} saw errors:\n{done.stdout}")
    print(f"  {script:<15} port={port} c={connections:<3} {result.requests_per_s:>9.0f} req/s "
          f"p50={result.p50_ms:.3f}ms p99={result.p99_ms:.3f}ms", flush=True)
    return {"wrk": asdict(result), "wall_s": wall_s, "cpu_s": cpu,
            "cpu_us_per_request": {role: s * 1e6 / max(result.requests, 1) for role, s in cpu.items()},
            "core_busy": {role: s / wall_s for role, s in cpu.items()}}


def measure_hits(bench: Bench) -> None:
    targets = {"proxy": bench.ports["proxy"], "nginx": bench.ports["nginx"]}
    hits: dict[str, object] = {}
    for workload, (script, path, body_name, expected) in HIT_WORKLOADS.items():
        body = openai_shapes.request_body(body_name)
        identical = {name: probes.warm_until_hit(port, path, body, expected) for name, port in targets.items()}
        for connections in CONNECTIONS:
            for name, port in targets.items():
                upstream_before = probes.nginx_requests(bench.ports["upstream"])
                run = run_wrk(bench, script, port, connections, bench.args.duration,
                              {name: bench.pids[name], "redis": bench.pids["redis"]})
                # One request is the status probe itself; anything more reached upstream during a "hit" run.
                run["upstream_requests"] = probes.nginx_requests(bench.ports["upstream"]) - upstream_before - 1
                run["body_identical_to_upstream"] = identical[name]
                hits[f"{workload}/{connections}/{name}"] = run
    bench.results["hits"] = hits


def measure_misses(bench: Bench) -> None:
    targets = {"proxy": bench.ports["proxy"], "nginx": bench.ports["nginx"], "upstream": bench.ports["upstream"]}
    for name in ("proxy", "nginx"):
        probes.expect_miss(targets[name], CHAT, openai_shapes.miss_body(f"probe-{bench.run_id}", 0))
    misses: dict[str, object] = {}
    for connections in CONNECTIONS:
        for name, port in targets.items():
            keys_before = probes.redis_dbsize(bench.ports["redis"])
            watch = {name: bench.pids[name], "redis": bench.pids["redis"]}
            nonce = f"{bench.run_id}{name}{connections}"
            run = run_wrk(bench, "miss.lua", port, connections, bench.args.duration, watch, (nonce,))
            time.sleep(0.2)
            run["redis_keys_added"] = probes.redis_dbsize(bench.ports["redis"]) - keys_before
            misses[f"miss/{connections}/{name}"] = run
    bench.results["misses"] = misses


def measure_ttfb(bench: Bench) -> None:
    port = harness.free_port()
    upstream = bench.start("fake-upstream", [sys.executable, str(HERE / "fake_upstream.py"), "--port", str(port),
                                             "--first-event-delay-ms", "20", "--rest-delay-ms", "10"],
                           str(LOAD_CORE), cwd=HERE)
    harness.wait_ready(upstream, port, harness.http_probe("/"), b"HTTP/1.1 404")
    proxy, proxy_port, started_s = start_proxy(bench, "proxy-ttfb", port)
    samples = 10 if bench.args.quick else 60
    bodies = [(openai_shapes.miss_body(f"ttfb-d-{bench.run_id}", i, "chat_stream"),
               openai_shapes.miss_body(f"ttfb-p-{bench.run_id}", i, "chat_stream")) for i in range(samples + 3)]
    probes.stream_ttfb(port, proxy_port, bodies[:3])  # connections, imports and pools warm up first
    bench.results["stream_ttfb"] = probes.stream_ttfb(port, proxy_port, bodies[3:])
    bench.results["startup_s"].append(started_s)  # type: ignore[attr-defined]
    bench.stop(proxy)
    bench.stop(upstream)


def measure_working_set(bench: Bench) -> None:
    size = 1000 if bench.args.quick else 10_000
    bodies = [openai_shapes.miss_body(f"ws-{bench.run_id}", i) for i in range(size)]
    started = time.perf_counter()
    passes = probes.fill_working_set(bench.ports["proxy"], bodies)
    bench.results["working_set"] = {
        "entries": size, "passes": passes, "seconds": time.perf_counter() - started,
        "memory_kib": harness.memory_kib(bench.pids["proxy"]),
        "nginx_memory_kib": harness.memory_kib(bench.pids["nginx"]),
    }


def measure_startup(bench: Bench) -> None:
    for i in range(3 if bench.args.quick else 5):
        service, _, started_s = start_proxy(bench, f"proxy-start-{i}", bench.ports["upstream"])
        bench.results["startup_s"].append(started_s)  # type: ignore[attr-defined]
        bench.stop(service)


def measure_scaling(bench: Bench) -> None:
    workers = bench.args.workers
    if workers < 2:
        return
    cores = f"{SERVER_CORE}-{SERVER_CORE + workers - 1}"
    script, path, body_name, expected = HIT_WORKLOADS["hit"]
    scaling: dict[str, object] = {"workers": workers, "cores": cores, "load_core": LOAD_CORE}
    try:
        proxy, proxy_port, _ = start_proxy(bench, f"proxy-w{workers}", bench.ports["upstream"], workers, cores)
    except BenchmarkError as exc:
        scaling["error"] = str(exc).splitlines()[0]
        bench.results["scaling"] = scaling
        return
    root = bench.tmp / f"nginx-w{workers}"
    nginx_port = harness.free_port()
    nginx = start_nginx(bench, f"nginx-w{workers}", nginx_conf.reference_conf(root, nginx_port,
                                                                             bench.ports["upstream"], workers),
                        root, cores, workers)
    harness.wait_ready(nginx, nginx_port, harness.http_probe("/healthz"), b"HTTP/1.1 200")
    body = openai_shapes.request_body(body_name)
    for name, service, port in (("proxy", proxy, proxy_port), ("nginx", nginx, nginx_port)):
        probes.warm_until_hit(port, path, body, expected)
        scaling[name] = run_wrk(bench, script, port, 64, bench.args.duration, {name: service.pid})
    bench.stop(proxy)
    bench.stop(nginx)
    bench.results["scaling"] = scaling


def setup(bench: Bench) -> None:
    www = bench.tmp / "www"
    openai_shapes.write_static_bodies(www)
    load = str(LOAD_CORE)
    for name in ("upstream", "nginx", "redis"):
        bench.ports[name] = harness.free_port()
    upstream = start_nginx(bench, "upstream", nginx_conf.upstream_conf(bench.tmp / "upstream", www,
                                                                      bench.ports["upstream"]),
                           bench.tmp / "upstream", load)
    (bench.tmp / "redis").mkdir()
    redis = bench.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(bench.ports["redis"]),
                                  "--save", "", "--appendonly", "no", "--dir", str(bench.tmp / "redis")], load)
    nginx = start_nginx(bench, "nginx", nginx_conf.reference_conf(bench.tmp / "nginx", bench.ports["nginx"],
                                                                 bench.ports["upstream"]),
                        bench.tmp / "nginx", str(SERVER_CORE))
    harness.wait_ready(upstream, bench.ports["upstream"], harness.http_probe("/_status"), b"HTTP/1.1 200")
    harness.wait_ready(redis, bench.ports["redis"], b"PING\r\n", b"+PONG")
    harness.wait_ready(nginx, bench.ports["nginx"], harness.http_probe("/healthz"), b"HTTP/1.1 200")
    proxy, bench.ports["proxy"], started_s = start_proxy(bench, "proxy", bench.ports["upstream"])
    bench.results["startup_s"] = [started_s]
    bench.pids.update(upstream=upstream.pid, redis=redis.pid, nginx=nginx.pid, proxy=proxy.pid)


def environment(args: argparse.Namespace) -> dict[str, object]:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "proxy"],
                                capture_output=True, text=True).stdout.strip())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {
        "commit": commit + ("+dirty" if dirty else ""), "cpu": cpu, "cores": os.cpu_count(),
        "python": sys.version.split()[0], "wrk": harness.tool_version(["wrk", "--version"]),
        "nginx": harness.tool_version(["nginx", "-v"]), "redis": harness.tool_version(["redis-server", "--version"]),
        "duration_s": args.duration, "quick": args.quick, "calibrate": args.calibrate, "log_level": args.log_level,
        "server_core": SERVER_CORE, "load_core": LOAD_CORE,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the proxy against nginx proxy_cache.")
    parser.add_argument("--quick", action="store_true", help="1 s per run and smaller samples (a smoke run)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 10, or 1 with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="proxy workers for the scaling run; 1 skips it")
    parser.add_argument("--calibrate", action="store_true",
                        help="put a second nginx where the proxy goes: every ratio should come out near 1.0")
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL given to the proxy (default WARNING)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (1 if args.quick else 10)
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
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
    scratch = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) and os.statvfs(shm).f_bavail * os.statvfs(
        shm).f_frsize > 2 * 1024**3 else None
    bench = Bench(args, Path(tempfile.mkdtemp(prefix="llm-cache-bench-", dir=scratch)), f"{time.time_ns():x}")
    bench.results["environment"] = environment(args)
    print(f"scratch dir {bench.tmp}; {args.duration} s per wrk run", flush=True)
    try:
        setup(bench)
        for phase in (measure_hits, measure_misses, measure_ttfb, measure_working_set, measure_startup,
                      measure_scaling):
            print(f"{phase.__name__.removeprefix('measure_')}:", flush=True)
            phase(bench)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}\nlogs in {bench.tmp}", file=sys.stderr)
        return 1
    finally:
        for service in reversed(bench.services):
            harness.stop(service)
        for cache in bench.tmp.glob("*/cache"):
            shutil.rmtree(cache, ignore_errors=True)
    print(report.markdown(bench.results))
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"{stamp}{'-calibrate' if args.calibrate else ''}.json"
    bench.results["targets"] = report.targets(bench.results)
    out.write_text(json.dumps(bench.results, indent=2) + "\n")
    shutil.rmtree(bench.tmp, ignore_errors=True)
    print(f"\nresults: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
