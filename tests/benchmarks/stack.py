"""The processes of one run: Redis, the fake upstream and the servers under test, started pinned and stopped."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..redis_topologies import RedisCluster, RedisSentinel
from . import nginx, processes, shapes
from .figures import HIT_WORKLOADS, REDIS_HITS
from .processes import LOAD_CORE, SERVER_CORE, BenchmarkError, Service

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HEALTHZ = processes.http_probe("/healthz")
OK = b"HTTP/1.1 200"
# The aiohttp servers have no GET route; a 404 means they are listening.
NOT_FOUND = b"HTTP/1.1 404"
# This checkout's proxy, as the server list names it.
PROXY = "proxy"
# proxy.yaml of the proxy without an in-process tier: no entry fits in one byte, so every hit is looked up in Redis.
# The tier's size has no environment variable, and its entry count may not be 0.
NO_TIER_YAML = "cache:\n  memory_max_bytes: 1\n"


@dataclass
class Bench:
    """What one run started and measured so far; every service started here is stopped by ``stop_all``."""

    args: argparse.Namespace
    tmp: Path
    run_id: str
    out_prefix: Path
    services: list[Service] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    startup_s: list[float] = field(default_factory=list)
    servers: tuple[ServerUnderTest, ...] = ()
    # The checkout of ``--baseline REF`` whose proxy runs as the server "baseline".
    baseline_src: Path | None = None
    # With ``--redis-mode cluster|sentinel``: the deployment this checkout's proxy uses, and its settings.
    topology: RedisCluster | RedisSentinel | None = None
    topology_env: dict[str, str] = field(default_factory=dict)

    def redis_ports(self, name: str) -> list[int]:
        """The Redis servers that hold what server *name* stores (a cluster's masters for this checkout's)."""
        if isinstance(self.topology, RedisCluster) and name in (PROXY, REDIS_HITS):
            return [master.port for master in self.topology.masters()]
        if isinstance(self.topology, RedisSentinel) and name in (PROXY, REDIS_HITS):
            return [self.topology.master_port]
        return [self.ports["redis"]]

    def start(self, name: str, argv: list[str], cores: str, env: dict[str, str] | None = None) -> Service:
        service = processes.start(name, argv, cores, self.tmp, env=env, cwd=self.tmp)
        self.services.append(service)
        return service

    def stop(self, service: Service) -> None:
        processes.stop(service)
        self.services.remove(service)

    def stop_all(self) -> None:
        for service in reversed(self.services):
            processes.stop(service)
        self.services.clear()
        if self.topology is not None:
            self.topology.close()
            self.topology = None


@dataclass(frozen=True, slots=True)
class Running:
    """A started server that answered its readiness probe *startup_s* seconds after its process started."""

    service: Service
    port: int
    startup_s: float


def python_env(source: Path = REPO, **extra: str) -> dict[str, str]:
    """The runner's environment for a Python child, importing ``proxy`` and ``tests`` from *source* first."""
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_CONFIG", "PROXY_WORKERS")}
    return {**env, "PYTHONPATH": str(source), **extra}


def start_nginx(bench: Bench, name: str, conf: str, root: Path, cores: str, workers: int = 1) -> Service:
    """Write *conf* to ``root/nginx.conf`` and start nginx on *cores*."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nginx.conf").write_text(conf)
    return bench.start(name, nginx.argv(root, workers), cores)


def start_reference(
    bench: Bench, name: str, upstream_port: int, workers: int = 1, cores: str = str(SERVER_CORE)
) -> Running:
    """nginx ``proxy_cache`` in front of *upstream_port*, ready for requests."""
    port, root = processes.free_port(), bench.tmp / name
    conf = nginx.reference_conf(root, port, upstream_port, workers)
    service = start_nginx(bench, name, conf, root, cores, workers)
    return Running(service, port, processes.wait_ready(service, port, HEALTHZ, OK))


def start_proxy(
    bench: Bench,
    name: str,
    upstream_port: int,
    workers: int = 1,
    cores: str = str(SERVER_CORE),
    backend: str = "redis",
    source: Path = REPO,
    config: str = "",
) -> Running:
    """``python -m proxy`` of the checkout at *source* with ``CACHE_BACKEND=backend``, ready once ``/healthz``
    answers 200; with --calibrate, a second nginx reference in its place. A *config* is its ``proxy.yaml``.

    Only the environment variables every version of the proxy reads are set, so that an older checkout
    (``--baseline``) runs with the same settings as this one.
    """
    if bench.args.calibrate:
        return start_reference(bench, name, upstream_port, workers, cores)
    port = processes.free_port()
    env = python_env(
        source,
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
    if source == REPO:
        env.update(bench.topology_env)
        env.update(item.split("=", 1) for item in bench.args.proxy_env)
    if config:
        path = bench.tmp / f"{name}.yaml"
        path.write_text(config)
        env["PROXY_CONFIG"] = str(path)
    argv = [sys.executable, "-m", "proxy"] + (["--workers", str(workers)] if workers > 1 else [])
    # The scratch cwd (Bench.start) keeps a developer's proxy.yaml or .env out of the measurement.
    service = bench.start(name, argv, cores, env=env)
    return Running(service, port, processes.wait_ready(service, port, HEALTHZ, OK))


def start_aiohttp(bench: Bench, name: str, cores: int, *args: str) -> Running:
    """One of ``servers.py``'s apps (``floor``, ``relay --to U``, ``upstream``) on a free port, ready."""
    port = processes.free_port()
    argv = [sys.executable, "-m", f"{__package__}.servers", *args, "--port", str(port)]
    service = bench.start(name, argv, str(cores), env=python_env())
    return Running(service, port, processes.wait_ready(service, port, processes.http_probe("/"), NOT_FOUND))


def start_floor(bench: Bench, name: str, upstream_port: int) -> Running:
    """The bare aiohttp app answering with the proxy's hit bytes; it never calls *upstream_port*."""
    return start_aiohttp(bench, name, SERVER_CORE, "floor")


def start_relay(bench: Bench, name: str, upstream_port: int) -> Running:
    """A bare aiohttp relay to *upstream_port*: a miss with no key, lookup, coordination or store, over aiohttp's
    server and one pooled ClientSession, the floor of the proxy's miss path as long as it is built on them."""
    return start_aiohttp(bench, name, SERVER_CORE, "relay", "--to", str(upstream_port))


def start_proxy_redis(bench: Bench, name: str, upstream_port: int) -> Running:
    """This checkout's proxy with the subject's settings but no in-process tier: each hit is a Redis lookup."""
    return start_proxy(bench, name, upstream_port, config=NO_TIER_YAML)


def start_baseline(bench: Bench, name: str, upstream_port: int) -> Running:
    """The proxy of the ``--baseline`` checkout, with the subject's settings and a cache namespace of its own."""
    if bench.baseline_src is None:
        raise BenchmarkError("the baseline server needs a --baseline checkout")
    return start_proxy(bench, name, upstream_port, source=bench.baseline_src)


@dataclass(frozen=True, slots=True)
class ServerUnderTest:
    """A server the workloads run against: *start(bench, name, upstream_port)* returns it ready on core 0.

    The first of ``SERVERS`` is the subject; every ratio is the subject over one of the others. A server that
    answers every request from memory (the floor) has no miss path and runs only the hit workloads; one that
    copies the subject's hit (*copies_subject*) has its headers compared with the subject's. A peer may speak
    its own dialect of the API: *prefix* goes before every ``/v1`` path and *bodies* names the directory of
    ``bodies/`` its requests come from. One that says nothing like ``X-Cache: HIT`` (not *marks_hits*) is known
    to hit when the fake upstream's request counter stands still. A server a hundred times slower than the others
    runs for *run_s* seconds, whatever ``--duration`` says, with at most *max_connections*: enough for its slow
    answers to complete many times over, and few enough that none waits past wrk's timeout. One whose every hit
    must find its entry in Redis (*needs_redis*) is checked for that before its runs.
    """

    name: str
    start: Callable[[Bench, str, int], Running]
    serves_misses: bool = True
    copies_subject: bool = False
    prefix: str = ""
    bodies: str = ""
    marks_hits: bool = True
    workloads: tuple[str, ...] = HIT_WORKLOADS
    run_s: int | None = None
    max_connections: int | None = None
    needs_redis: bool = False

    def body_name(self, name: str) -> str:
        """The name under ``bodies/`` of this server's request *name* (``chat``, ``chat_stream``, ...)."""
        return f"{self.bodies}/{name}" if self.bodies else name

    def wrk_options(self) -> tuple[str, ...]:
        """The ``key=value`` arguments that make the wrk scripts speak this server's dialect."""
        return tuple(f"{key}={value}" for key, value in (("prefix", self.prefix), ("bodies", self.bodies)) if value)

    def seconds(self, asked_s: int) -> int:
        """Seconds of each of its wrk runs when *asked_s* are asked for."""
        return self.run_s or asked_s

    def connections(self, asked: int) -> int:
        """Connections of its wrk runs when *asked* are asked for."""
        return min(asked, self.max_connections or asked)


SERVERS = (
    ServerUnderTest("proxy", start_proxy),
    ServerUnderTest("nginx", start_reference),
    ServerUnderTest(REDIS_HITS, start_proxy_redis, serves_misses=False, copies_subject=True, needs_redis=True),
    ServerUnderTest("floor", start_floor, serves_misses=False, copies_subject=True),
    ServerUnderTest("relay", start_relay, workloads=()),
)
BASELINE = ServerUnderTest("baseline", start_baseline)


def servers_for(args: argparse.Namespace) -> tuple[ServerUnderTest, ...]:
    """The servers this run measures: ``SERVERS``, then the baseline proxy when ``--baseline`` asks for one."""
    return SERVERS + ((BASELINE,) if args.baseline else ())


def start_upstream(bench: Bench) -> Running:
    """nginx serving the fixed OpenAI-shaped bodies on the load core."""
    www, root, port = bench.tmp / "www", bench.tmp / "upstream", processes.free_port()
    shapes.write_static_bodies(www)
    service = start_nginx(bench, "upstream", nginx.upstream_conf(root, www, port), root, str(LOAD_CORE))
    return Running(service, port, processes.wait_ready(service, port, processes.http_probe("/_status"), OK))


def start_redis(bench: Bench) -> Running:
    """A redis-server without persistence on the load core."""
    port, data = processes.free_port(), bench.tmp / "redis"
    data.mkdir()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    service = bench.start("redis", [*argv, "--dir", str(data)], str(LOAD_CORE))
    return Running(service, port, processes.wait_ready(service, port, b"PING\r\n", b"+PONG"))


def start_topology(bench: Bench) -> None:
    """The ``--redis-mode`` deployment for this checkout's proxy, every process pinned to the load core."""
    if bench.args.redis_mode == "cluster":
        cluster = bench.topology = RedisCluster(masters=3, replicas=1)
        cluster.start()
        bench.topology_env = {"REDIS_MODE": "cluster", "REDIS_URL": cluster.url}
    elif bench.args.redis_mode == "sentinel":
        sentinel = bench.topology = RedisSentinel()
        sentinel.start()
        bench.topology_env = {
            "REDIS_MODE": "sentinel",
            "REDIS_URL": "redis://127.0.0.1/0",
            "REDIS_SENTINELS": sentinel.addresses,
            "REDIS_SENTINEL_MASTER": sentinel.name,
        }
    else:
        return
    nodes = bench.topology.nodes + getattr(bench.topology, "sentinels", [])
    for node in nodes:
        if node.process is not None:
            os.sched_setaffinity(node.process.pid, {LOAD_CORE})


def setup(bench: Bench) -> None:
    """Fake upstream and Redis on the load core, then every server under test on the server core."""
    for name, starter in (("upstream", start_upstream), ("redis", start_redis)):
        running = starter(bench)
        bench.ports[name], bench.pids[name] = running.port, running.service.pid
    start_topology(bench)
    started = bench.results["servers_startup_s"] = {}
    for server in bench.servers:
        running = server.start(bench, server.name, bench.ports["upstream"])
        bench.ports[server.name], bench.pids[server.name] = running.port, running.service.pid
        started[server.name] = running.startup_s
        if server is bench.servers[0]:
            bench.startup_s.append(running.startup_s)
    bench.results["startup_s"] = bench.startup_s
    bench.results["servers"] = {
        "hits": [server.name for server in bench.servers if server.workloads],
        "misses": [server.name for server in bench.servers if server.serves_misses],
    }
