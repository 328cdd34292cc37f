"""The measurements of one run, in order; each adds its numbers to ``bench.results``."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from . import clients, pyspy, shapes
from .figures import CONNECTIONS, in_rounds, summarize
from .processes import LOAD_CORE, SERVER_CORE, BenchmarkError, memory_kib
from .stack import Bench, Running, ServerUnderTest, start_aiohttp, start_baseline, start_proxy, start_reference
from .wrk import run_wrk

CHAT = "/v1/chat/completions"
# name: (wrk script, path, request body, upstream response the hit must equal)
HIT_WORKLOADS = {
    "hit": ("hit.lua", CHAT, "chat", shapes.chat_completion()),
    "stream": ("stream.lua", CHAT, "chat_stream", b"".join(shapes.chat_chunks())),
    "embeddings": ("embeddings.lua", "/v1/embeddings", "embeddings", shapes.embeddings()),
}
TTFB_BACKENDS = ("redis", "memory", "off")
TTFB_WARM_ROUNDS = 3
# Hits in a row that must each find their entry in Redis on a server that needs Redis for every hit.
REDIS_CHECK_HITS = 20


def _keys_found(bench: Bench, name: str) -> int:
    """Keys found by reads so far in the Redis servers that hold what server *name* stores."""
    return sum(clients.redis_keyspace_hits(port) for port in bench.redis_ports(name))


def _check_redis_hits(bench: Bench, server: ServerUnderTest, path: str, body: bytes, expected: bytes) -> None:
    """BenchmarkError unless each of a few hits in a row on *server* found its entry in Redis."""
    before = _keys_found(bench, server.name)
    for _ in range(REDIS_CHECK_HITS):
        clients.warm_until_hit(bench.ports[server.name], server.prefix + path, body, expected)
    found = _keys_found(bench, server.name) - before
    if found < REDIS_CHECK_HITS:
        raise BenchmarkError(
            f"{server.name}: {found} entries found in Redis for {REDIS_CHECK_HITS} hits in a row; "
            "its hits do not all need Redis"
        )


def _hit_checks(bench: Bench, workload: str, servers: list[ServerUnderTest]) -> dict[str, dict[str, object]]:
    """Warm each of *servers* until it answers *workload*'s body with a hit, and check that a server needing Redis
    for every hit does; per server, whether the hit's body equals upstream's and, for a server copying the
    subject, the headers that differ from the subject's."""
    _, path, body_name, expected = HIT_WORKLOADS[workload]
    checks: dict[str, dict[str, object]] = {}
    for server in servers:
        port, body = bench.ports[server.name], shapes.request_body(server.body_name(body_name))
        counter = None if server.marks_hits else bench.ports["upstream"]
        identical = clients.warm_until_hit(port, server.prefix + path, body, expected, counter)
        checks[server.name] = {"body_identical_to_upstream": identical}
        if server.needs_redis and not bench.args.calibrate:
            _check_redis_hits(bench, server, path, body, expected)
    body = shapes.request_body(body_name)
    subject = clients.request(bench.ports[bench.servers[0].name], "POST", path, body)[1]
    for server in servers:
        if server.copies_subject:
            theirs = clients.request(bench.ports[server.name], "POST", path, body)[1]
            checks[server.name]["headers_differing_from_proxy"] = clients.differing_headers(subject, theirs)
    return checks


def _hit_rounds(
    bench: Bench, script: str, connections: int, servers: list[ServerUnderTest]
) -> dict[str, list[dict[str, Any]]]:
    upstream, by_name = bench.ports["upstream"], {server.name: server for server in servers}

    def measure(name: str, _round: int) -> dict[str, Any]:
        server = by_name[name]
        before, found_before = clients.nginx_requests(upstream), _keys_found(bench, name)
        watch = {name: bench.pids[name], "redis": bench.pids["redis"]}
        conns, seconds = server.connections(connections), server.seconds(bench.args.duration)
        run = run_wrk(script, bench.ports[name], conns, seconds, watch, server.wrk_options())
        # One request is the status probe itself; anything more reached upstream during a "hit" run.
        run["upstream_requests"] = clients.nginx_requests(upstream) - before - 1
        run["redis_keys_found"] = _keys_found(bench, name) - found_before
        run["connections"] = conns
        return run

    return in_rounds(list(by_name), bench.args.rounds, measure)


def measure_hits(bench: Bench) -> None:
    """Hit workloads at 64 and 1 connections against every server under test that serves them, once each answers
    with a hit, in interleaved rounds (``figures.order``); one summary of its rounds per server."""
    hits: dict[str, object] = {}
    for workload, (script, *_) in HIT_WORKLOADS.items():
        servers = [server for server in bench.servers if workload in server.workloads]
        checks = _hit_checks(bench, workload, servers)
        for connections in CONNECTIONS:
            for name, runs in _hit_rounds(bench, script, connections, servers).items():
                hits[f"{workload}/{connections}/{name}"] = summarize(runs, **checks[name])
    bench.results["hits"] = hits


def _miss_rounds(bench: Bench, servers: list[ServerUnderTest], connections: int) -> dict[str, list[dict[str, Any]]]:
    by_name = {server.name: server for server in servers}

    def keys(name: str) -> int:
        return sum(clients.redis_dbsize(port) for port in bench.redis_ports(name))

    def measure(name: str, round_index: int) -> dict[str, Any]:
        keys_before = keys(name)
        watch = {name: bench.pids[name], "redis": bench.pids["redis"]}
        nonce = f"nonce={bench.run_id}{name}{connections}r{round_index}"
        server = by_name.get(name)
        args = (nonce, *server.wrk_options()) if server else (nonce,)
        conns = server.connections(connections) if server else connections
        seconds = server.seconds(bench.args.duration) if server else bench.args.duration
        run = run_wrk("miss.lua", bench.ports[name], conns, seconds, watch, args)
        # Requests in flight when wrk stops are still answered and stored; let those writes land.
        time.sleep(0.2)
        run["redis_keys_added"] = keys(name) - keys_before
        run["connections"] = conns
        return run

    return in_rounds([*by_name, "upstream"], bench.args.rounds, measure)


def measure_misses(bench: Bench) -> None:
    """The miss workload against every server with a miss path and the fake upstream itself, in interleaved
    rounds; a fresh nonce per run."""
    servers = [server for server in bench.servers if server.serves_misses]
    for server in servers:
        body = shapes.miss_body(f"probe-{bench.run_id}", 0, server.body_name("chat"))
        counter = None if server.marks_hits else bench.ports["upstream"]
        clients.expect_miss(bench.ports[server.name], server.prefix + CHAT, body, counter)
    misses: dict[str, object] = {}
    for connections in CONNECTIONS:
        for name, runs in _miss_rounds(bench, servers, connections).items():
            misses[f"miss/{connections}/{name}"] = summarize(runs)
    bench.results["misses"] = misses


def _start_ttfb_sides(bench: Bench) -> tuple[dict[str, int], list[Running]]:
    """A slow-to-stream upstream on the load core, then on the server core a bare relay to it, one proxy per
    ``CACHE_BACKEND`` and the baseline's proxy when there is one; their ports by side (``direct``, ``relay``,
    backend, ``baseline``) and every one started."""
    upstream = start_aiohttp(bench, "fake-upstream", LOAD_CORE, "upstream")
    relay = start_aiohttp(bench, "relay-floor", SERVER_CORE, "relay", "--to", str(upstream.port))
    started, ports = [upstream, relay], {"direct": upstream.port, "relay": relay.port}
    for backend in ("redis",) if bench.args.calibrate else TTFB_BACKENDS:
        name = "proxy-ttfb" if backend == "redis" else f"proxy-ttfb-{backend}"
        proxy = start_proxy(bench, name, upstream.port, backend=backend)
        started.append(proxy)
        ports[backend] = proxy.port
        if backend == "redis":
            bench.startup_s.append(proxy.startup_s)
    if bench.baseline_src is not None:
        baseline = start_baseline(bench, "baseline-ttfb", upstream.port)
        started.append(baseline)
        ports["baseline"] = baseline.port
    return ports, started


def measure_ttfb(bench: Bench) -> None:
    """Added time to the first SSE event of streamed misses, with proxies of their own on a slow-to-start upstream.

    First with a new connection per request to the default (Redis) proxy and to upstream, then with one kept-alive
    connection per side to upstream, to a bare aiohttp relay (the miss path's floor) and to three proxies, one per
    ``CACHE_BACKEND``, interleaved: the differences between them are what the proxy's own request path and each
    cache lookup add before the request goes upstream.
    """
    ports, started = _start_ttfb_sides(bench)
    samples = 10 if bench.args.quick else 60

    def bodies(kind: str, sides: list[str]) -> list[dict[str, bytes]]:
        nonce = f"ttfb-{kind}-{bench.run_id}"
        count = TTFB_WARM_ROUNDS + samples
        return [{side: shapes.miss_body(f"{nonce}-{side}", i, "chat_stream") for side in sides} for i in range(count)]

    pair = {"direct": ports["direct"], "proxy": ports["redis"]}
    pair |= {"baseline": ports["baseline"]} if "baseline" in ports else {}
    new = clients.stream_ttfb(pair, bodies("new", list(pair)), kept_alive=False, warm=TTFB_WARM_ROUNDS)
    kept = clients.stream_ttfb(ports, bodies("kept", list(ports)), kept_alive=True, warm=TTFB_WARM_ROUNDS)
    kept_pair = {"direct": kept["direct"], "proxy": kept["redis"]}
    kept_pair |= {"baseline": kept["baseline"]} if "baseline" in kept else {}
    bench.results["stream_ttfb"] = {
        "samples": samples,
        "new_connection": new,
        "kept_alive": kept_pair,
        "kept_alive_backends": kept,
    }
    for running in reversed(started):
        bench.stop(running.service)


def measure_working_set(bench: Bench) -> None:
    """Distinct bodies sent twice through the proxy, then its peak and current RSS."""
    size = 1000 if bench.args.quick else 10_000
    bodies = [shapes.miss_body(f"ws-{bench.run_id}", i) for i in range(size)]
    started = time.perf_counter()
    passes = clients.fill_working_set(bench.ports["proxy"], bodies)
    bench.results["working_set"] = {
        "entries": size,
        "passes": passes,
        "seconds": time.perf_counter() - started,
        "memory_kib": memory_kib(bench.pids["proxy"]),
        "nginx_memory_kib": memory_kib(bench.pids["nginx"]),
    }


def measure_startup(bench: Bench) -> None:
    """Fresh proxy processes, each timed from start to its first ``/healthz`` 200 and stopped."""
    for i in range(3 if bench.args.quick else 5):
        running = start_proxy(bench, f"proxy-start-{i}", bench.ports["upstream"])
        bench.startup_s.append(running.startup_s)
        bench.stop(running.service)


def _scaling_rounds(bench: Bench, proxy: Running, nginx: Running) -> dict[str, object]:
    script, path, body_name, expected = HIT_WORKLOADS["hit"]
    # entry name: (role, port, pid); the one-worker servers are the ones measured in every other phase.
    targets = {
        "proxy": ("proxy", proxy.port, proxy.service.pid),
        "nginx": ("nginx", nginx.port, nginx.service.pid),
        "proxy_one_worker": ("proxy", bench.ports["proxy"], bench.pids["proxy"]),
        "nginx_one_worker": ("nginx", bench.ports["nginx"], bench.pids["nginx"]),
    }
    for _, port, _ in targets.values():
        clients.warm_until_hit(port, path, shapes.request_body(body_name), expected)

    def measure(name: str, _round: int) -> dict[str, Any]:
        role, port, pid = targets[name]
        return run_wrk(script, port, 64, bench.args.duration, {role: pid}, label=name)

    runs = in_rounds(list(targets), bench.args.rounds, measure)
    return {name: summarize(its_runs) for name, its_runs in runs.items()}


def measure_scaling(bench: Bench) -> None:
    """Hit throughput with N proxy workers and N nginx workers on cores 0..N-1 (skipped for N = 1), in rounds
    interleaved with the one-worker proxy and nginx, so that the speed-up compares runs close in time."""
    workers = bench.args.workers
    if workers < 2:
        return
    cores = f"{SERVER_CORE}-{SERVER_CORE + workers - 1}"
    scaling: dict[str, object] = {"workers": workers, "cores": cores, "load_core": LOAD_CORE}
    upstream = bench.ports["upstream"]
    try:
        proxy = start_proxy(bench, f"proxy-w{workers}", upstream, workers, cores)
    except BenchmarkError as exc:
        bench.results["scaling"] = {**scaling, "error": str(exc).splitlines()[0]}
        return
    nginx = start_reference(bench, f"nginx-w{workers}", upstream, workers, cores)
    scaling |= _scaling_rounds(bench, proxy, nginx)
    bench.stop(proxy.service)
    bench.stop(nginx.service)
    bench.results["scaling"] = scaling


def measure_profile(bench: Bench) -> None:
    """Sample the proxy with py-spy under the hit and miss loads, in runs apart from the measured ones."""
    py_spy = pyspy.executable()
    if py_spy is None or bench.args.calibrate:
        bench.results["profile"] = {"error": "py-spy not installed" if py_spy is None else "calibration run"}
        return
    seconds = min(bench.args.duration * bench.args.rounds, 10)
    profile: dict[str, object] = {}
    for workload, script, args in (("hit", "hit.lua", ()), ("miss", "miss.lua", (f"nonce={bench.run_id}profile",))):
        out = bench.out_prefix.with_name(f"{bench.out_prefix.name}-profile-{workload}.txt")
        sampler = pyspy.record(py_spy, bench.pids["proxy"], seconds + 1, out, LOAD_CORE)
        time.sleep(0.5)
        run_wrk(script, bench.ports["proxy"], 64, seconds, {"proxy": bench.pids["proxy"]}, args)
        try:
            sampler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sampler.kill()
        summary = pyspy.summarize(out.read_text()) if out.exists() else {"self": [], "total": []}
        profile[workload] = {"collapsed_stacks": out.name, **summary}
    bench.results["profile"] = profile


ALL = (
    measure_hits,
    measure_misses,
    measure_ttfb,
    measure_working_set,
    measure_startup,
    measure_scaling,
    measure_profile,
)
