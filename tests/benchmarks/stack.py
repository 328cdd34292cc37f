"""The processes under test and the load generator: start them pinned to cores, run wrk against them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
import nginx_conf
import openai_shapes
from harness import BenchmarkError, Service
from wrk_report import WrkOutputError, WrkResult, parse_wrk

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LUA = HERE / "lua"
SERVER_CORE, LOAD_CORE = 0, 1


@dataclass
class Bench:
    """What one run started and measured so far."""

    args: argparse.Namespace
    tmp: Path
    run_id: str
    out_prefix: Path
    services: list[Service] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    startup_s: list[float] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], cores: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Service:
        service = harness.start(name, argv, cores, self.tmp, env=env, cwd=cwd)
        self.services.append(service)
        return service

    def stop(self, service: Service) -> None:
        harness.stop(service)
        self.services.remove(service)


def nginx_argv(root: Path, workers: int) -> list[str]:
    """nginx in the foreground with everything under *root*; one worker runs without a master process."""
    single = " master_process off;" if workers == 1 else ""
    return [
        "nginx",
        "-p",
        str(root),
        "-c",
        str(root / "nginx.conf"),
        "-e",
        str(root / "error.log"),
        "-g",
        f"daemon off;{single}",
    ]


def start_nginx(bench: Bench, name: str, conf: str, root: Path, cores: str, workers: int = 1) -> Service:
    """Write *conf* to ``root/nginx.conf`` and start nginx on *cores*."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nginx.conf").write_text(conf)
    return bench.start(name, nginx_argv(root, workers), cores)


def start_proxy(
    bench: Bench, name: str, upstream_port: int, workers: int = 1, cores: str = str(SERVER_CORE), backend: str = "redis"
) -> tuple[Service, int, float]:
    """Start the proxy with ``CACHE_BACKEND=backend`` (or, with --calibrate, a second nginx reference) and wait
    for ``/healthz``.

    Returns the service, its port, and seconds from process start to the first 200.
    """
    port = harness.free_port()
    if bench.args.calibrate:
        root = bench.tmp / name
        service = start_nginx(
            bench, name, nginx_conf.reference_conf(root, port, upstream_port, workers), root, cores, workers
        )
    else:
        env = {k: v for k, v in os.environ.items() if k not in ("PROXY_CONFIG", "PROXY_WORKERS")}
        env.update(
            PYTHONPATH=str(REPO),
            PROXY_HOST="127.0.0.1",
            PROXY_PORT=str(port),
            UPSTREAM_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
            OPENAI_API_KEY="sk-bench",
            REDIS_URL=f"redis://127.0.0.1:{bench.ports['redis']}/0",
            CACHE_BACKEND=backend,
            CACHE_NAMESPACE=f"bench-{bench.run_id}-{name}",
            CACHE_TTL="3600",
            LOG_LEVEL=bench.args.log_level,
        )
        argv = [sys.executable, "-m", "proxy"] + (["--workers", str(workers)] if workers > 1 else [])
        # A scratch cwd keeps a developer's proxy.yaml or .env out of the measurement.
        service = bench.start(name, argv, cores, env=env, cwd=bench.tmp)
    started_s = harness.wait_ready(service, port, harness.http_probe("/healthz"), b"HTTP/1.1 200")
    return service, port, started_s


def run_wrk(
    script: str,
    port: int,
    connections: int,
    duration_s: int,
    watch: dict[str, int],
    script_args: tuple[str, ...] = (),
    label: str | None = None,
) -> dict[str, object]:
    """One wrk run on the load core; CPU seconds over the run of each watched process tree (role -> pid, the
    server under load first). *label* names the server in the progress line (default: its role).

    Raises BenchmarkError when wrk fails or reports any non-2xx response or socket error.
    """
    argv = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(LUA / script),
        f"http://127.0.0.1:{port}",
    ]
    if script_args:
        argv += ["--", *script_args]
    cpu_before = {role: harness.cpu_seconds(pid) for role, pid in watch.items()}
    cores_before = harness.core_times()
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    wall_s = time.perf_counter() - started
    cores = harness.core_busy(cores_before, harness.core_times())
    cpu = {role: harness.cpu_seconds(pid) - cpu_before[role] for role, pid in watch.items()}
    try:
        result: WrkResult = parse_wrk(done.stdout)
    except WrkOutputError as exc:
        raise BenchmarkError(f"wrk {script} on port {port}: {exc}\n{done.stdout}\n{done.stderr}") from None
    if result.errors:
        raise BenchmarkError(f"wrk {script} on port {port} saw errors:\n{done.stdout}")
    print(
        f"  {script:<15} {label or next(iter(watch)):<16} c={connections:<3} {result.requests_per_s:>9.0f} req/s "
        f"p50={result.p50_ms:.3f}ms p99={result.p99_ms:.3f}ms",
        flush=True,
    )
    return {
        "wrk": asdict(result),
        "wall_s": wall_s,
        "cpu_s": cpu,
        "cpu_us_per_request": {role: s * 1e6 / max(result.requests, 1) for role, s in cpu.items()},
        "core_busy": {role: s / wall_s for role, s in cpu.items()},
        # Busy time on the server core not spent by the server: other load on the machine (or interrupts).
        "server_core_other": max(0.0, cores.get(SERVER_CORE, 0.0) - cpu[next(iter(watch))] / wall_s),
        "cores_busy": cores,
    }


def setup(bench: Bench) -> None:
    """Fake upstream and Redis on the load core; nginx, the aiohttp floor and the proxy on the server core."""
    www = bench.tmp / "www"
    openai_shapes.write_static_bodies(www)
    load = str(LOAD_CORE)
    for name in ("upstream", "nginx", "redis", "floor"):
        bench.ports[name] = harness.free_port()
    upstream = start_nginx(
        bench,
        "upstream",
        nginx_conf.upstream_conf(bench.tmp / "upstream", www, bench.ports["upstream"]),
        bench.tmp / "upstream",
        load,
    )
    (bench.tmp / "redis").mkdir()
    redis = bench.start(
        "redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(bench.ports["redis"]),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(bench.tmp / "redis"),
        ],
        load,
    )
    nginx = start_nginx(
        bench,
        "nginx",
        nginx_conf.reference_conf(bench.tmp / "nginx", bench.ports["nginx"], bench.ports["upstream"]),
        bench.tmp / "nginx",
        str(SERVER_CORE),
    )
    floor_argv = [sys.executable, str(HERE / "aiohttp_floor.py"), "--port", str(bench.ports["floor"])]
    floor = bench.start("floor", floor_argv, str(SERVER_CORE), cwd=HERE)
    harness.wait_ready(upstream, bench.ports["upstream"], harness.http_probe("/_status"), b"HTTP/1.1 200")
    harness.wait_ready(redis, bench.ports["redis"], b"PING\r\n", b"+PONG")
    harness.wait_ready(nginx, bench.ports["nginx"], harness.http_probe("/healthz"), b"HTTP/1.1 200")
    harness.wait_ready(floor, bench.ports["floor"], harness.http_probe("/"), b"HTTP/1.1 404")
    proxy, bench.ports["proxy"], started_s = start_proxy(bench, "proxy", bench.ports["upstream"])
    bench.startup_s.append(started_s)
    bench.results["startup_s"] = bench.startup_s
    bench.pids.update(upstream=upstream.pid, redis=redis.pid, nginx=nginx.pid, floor=floor.pid, proxy=proxy.pid)
