"""The measurements of one run, in order; each adds its numbers to ``bench.results``."""

from __future__ import annotations

import subprocess
import sys
import time

import harness
import nginx_conf
import openai_shapes
import probes
import pyspy
import rounds
from harness import BenchmarkError
from stack import HERE, LOAD_CORE, SERVER_CORE, Bench, run_wrk, start_nginx, start_proxy

CHAT = "/v1/chat/completions"
# name: (wrk script, path, request body, upstream response the hit must equal)
HIT_WORKLOADS = {
    "hit": ("hit.lua", CHAT, "chat", openai_shapes.chat_completion()),
    "stream": ("stream.lua", CHAT, "chat_stream", b"".join(openai_shapes.chat_chunks())),
    "embeddings": ("embeddings.lua", "/v1/embeddings", "embeddings", openai_shapes.embeddings()),
}
CONNECTIONS = (64, 1)
TTFB_BACKENDS = ("redis", "memory", "off")


def measure_hits(bench: Bench) -> None:
    """Hit workloads at 64 and 1 connections against proxy, nginx and the aiohttp floor, once all answer
    ``X-Cache: HIT``, in interleaved rounds (``rounds.order``); one summary of its rounds per server.

    The floor's hit must carry the proxy's headers; the names of any that differ are recorded with its runs.
    """
    targets = {name: bench.ports[name] for name in ("proxy", "nginx", "floor")}
    hits: dict[str, object] = {}
    for workload, (script, path, body_name, expected) in HIT_WORKLOADS.items():
        body = openai_shapes.request_body(body_name)
        identical = {name: probes.warm_until_hit(port, path, body, expected) for name, port in targets.items()}
        proxy_headers, floor_headers = (
            harness.request(targets[name], "POST", path, body)[1] for name in ("proxy", "floor")
        )
        floor_differs = probes.differing_headers(proxy_headers, floor_headers)
        for connections in CONNECTIONS:
            runs: dict[str, list[dict[str, object]]] = {name: [] for name in targets}
            for round_index in range(bench.args.rounds):
                for name in rounds.order(list(targets), round_index):
                    upstream_before = probes.nginx_requests(bench.ports["upstream"])
                    run = run_wrk(
                        script,
                        targets[name],
                        connections,
                        bench.args.duration,
                        {name: bench.pids[name], "redis": bench.pids["redis"]},
                    )
                    # One request is the status probe itself; anything more reached upstream during a "hit" run.
                    run["upstream_requests"] = probes.nginx_requests(bench.ports["upstream"]) - upstream_before - 1
                    runs[name].append(run)
            for name, its_runs in runs.items():
                extra: dict[str, object] = {"body_identical_to_upstream": identical[name]}
                if name == "floor":
                    extra["headers_differing_from_proxy"] = floor_differs
                hits[f"{workload}/{connections}/{name}"] = rounds.summarize(its_runs, **extra)
    bench.results["hits"] = hits


def measure_misses(bench: Bench) -> None:
    """The miss workload against proxy, nginx and the fake upstream itself in interleaved rounds; a fresh nonce
    per run."""
    targets = {"proxy": bench.ports["proxy"], "nginx": bench.ports["nginx"], "upstream": bench.ports["upstream"]}
    for name in ("proxy", "nginx"):
        probes.expect_miss(targets[name], CHAT, openai_shapes.miss_body(f"probe-{bench.run_id}", 0))
    misses: dict[str, object] = {}
    for connections in CONNECTIONS:
        runs: dict[str, list[dict[str, object]]] = {name: [] for name in targets}
        for round_index in range(bench.args.rounds):
            for name in rounds.order(list(targets), round_index):
                keys_before = probes.redis_dbsize(bench.ports["redis"])
                watch = {name: bench.pids[name], "redis": bench.pids["redis"]}
                nonce = f"{bench.run_id}{name}{connections}r{round_index}"
                run = run_wrk("miss.lua", targets[name], connections, bench.args.duration, watch, (nonce,))
                time.sleep(0.2)
                run["redis_keys_added"] = probes.redis_dbsize(bench.ports["redis"]) - keys_before
                runs[name].append(run)
        for name, its_runs in runs.items():
            misses[f"miss/{connections}/{name}"] = rounds.summarize(its_runs)
    bench.results["misses"] = misses


def measure_ttfb(bench: Bench) -> None:
    """Added time to the first SSE event of streamed misses, with proxies of their own on a slow-to-start upstream.

    First with a new connection per request to the default (Redis) proxy and to upstream, then with one kept-alive
    connection per side to upstream, to a bare aiohttp relay (the miss path's floor) and to three proxies, one per
    ``CACHE_BACKEND`` (``redis``, ``memory``, ``off``), interleaved: the differences between them are what the
    proxy's own request path and each cache lookup add before the request goes upstream.
    """
    port = harness.free_port()
    upstream = bench.start(
        "fake-upstream",
        [
            sys.executable,
            str(HERE / "fake_upstream.py"),
            "--port",
            str(port),
            "--first-event-delay-ms",
            "20",
            "--rest-delay-ms",
            "10",
        ],
        str(LOAD_CORE),
        cwd=HERE,
    )
    harness.wait_ready(upstream, port, harness.http_probe("/"), b"HTTP/1.1 404")
    backends = ("redis",) if bench.args.calibrate else TTFB_BACKENDS
    relay_port = harness.free_port()
    relay = bench.start(
        "relay-floor",
        [sys.executable, str(HERE / "aiohttp_floor.py"), "--port", str(relay_port), "--relay-to", str(port)],
        str(SERVER_CORE),
        cwd=HERE,
    )
    harness.wait_ready(relay, relay_port, harness.http_probe("/"), b"HTTP/1.1 404")
    proxies, ports = [relay], {"direct": port, "relay": relay_port}
    for backend in backends:
        name = "proxy-ttfb" if backend == "redis" else f"proxy-ttfb-{backend}"
        proxy, ports[backend], started_s = start_proxy(bench, name, port, backend=backend)
        proxies.append(proxy)
        if backend == "redis":
            bench.startup_s.append(started_s)
    samples, warm = (10 if bench.args.quick else 60), 3

    def bodies(kind: str, sides: list[str]) -> list[dict[str, bytes]]:
        return [
            {side: openai_shapes.miss_body(f"ttfb-{kind}-{side}-{bench.run_id}", i, "chat_stream") for side in sides}
            for i in range(warm + samples)
        ]

    new = probes.stream_ttfb(
        {"direct": port, "proxy": ports["redis"]}, bodies("new", ["direct", "proxy"]), kept_alive=False, warm=warm
    )
    kept = probes.stream_ttfb(ports, bodies("kept", list(ports)), kept_alive=True, warm=warm)
    bench.results["stream_ttfb"] = {
        "samples": samples,
        "new_connection": new,
        "kept_alive": {"direct": kept["direct"], "proxy": kept["redis"]},
        "kept_alive_backends": kept,
    }
    for proxy in proxies:
        bench.stop(proxy)
    bench.stop(upstream)


def measure_working_set(bench: Bench) -> None:
    """Distinct bodies sent twice through the proxy, then its peak and current RSS."""
    size = 1000 if bench.args.quick else 10_000
    bodies = [openai_shapes.miss_body(f"ws-{bench.run_id}", i) for i in range(size)]
    started = time.perf_counter()
    passes = probes.fill_working_set(bench.ports["proxy"], bodies)
    bench.results["working_set"] = {
        "entries": size,
        "passes": passes,
        "seconds": time.perf_counter() - started,
        "memory_kib": harness.memory_kib(bench.pids["proxy"]),
        "nginx_memory_kib": harness.memory_kib(bench.pids["nginx"]),
    }


def measure_startup(bench: Bench) -> None:
    """Fresh proxy processes, each timed from start to its first ``/healthz`` 200 and stopped."""
    for i in range(3 if bench.args.quick else 5):
        service, _, started_s = start_proxy(bench, f"proxy-start-{i}", bench.ports["upstream"])
        bench.startup_s.append(started_s)
        bench.stop(service)


def measure_scaling(bench: Bench) -> None:
    """Hit throughput with N proxy workers and N nginx workers on cores 0..N-1 (skipped for N = 1), in rounds
    interleaved with the one-worker proxy and nginx, so that the speed-up compares runs close in time."""
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
    nginx = start_nginx(
        bench,
        f"nginx-w{workers}",
        nginx_conf.reference_conf(root, nginx_port, bench.ports["upstream"], workers),
        root,
        cores,
        workers,
    )
    harness.wait_ready(nginx, nginx_port, harness.http_probe("/healthz"), b"HTTP/1.1 200")
    body = openai_shapes.request_body(body_name)
    # entry name: (role, port, pid); the one-worker servers are the ones measured in every other phase.
    targets = {
        "proxy": ("proxy", proxy_port, proxy.pid),
        "nginx": ("nginx", nginx_port, nginx.pid),
        "proxy_one_worker": ("proxy", bench.ports["proxy"], bench.pids["proxy"]),
        "nginx_one_worker": ("nginx", bench.ports["nginx"], bench.pids["nginx"]),
    }
    for _, port, _ in targets.values():
        probes.warm_until_hit(port, path, body, expected)
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in targets}
    for round_index in range(bench.args.rounds):
        for name in rounds.order(list(targets), round_index):
            role, port, pid = targets[name]
            runs[name].append(run_wrk(script, port, 64, bench.args.duration, {role: pid}, label=name))
    for name, its_runs in runs.items():
        scaling[name] = rounds.summarize(its_runs)
    bench.stop(proxy)
    bench.stop(nginx)
    bench.results["scaling"] = scaling


def measure_profile(bench: Bench) -> None:
    """Sample the proxy with py-spy under the hit and miss loads, in runs apart from the measured ones."""
    py_spy = pyspy.executable()
    if py_spy is None or bench.args.calibrate:
        bench.results["profile"] = {"error": "py-spy not installed" if py_spy is None else "calibration run"}
        return
    seconds = min(bench.args.duration * bench.args.rounds, 10)
    profile: dict[str, object] = {}
    for workload, script, args in (("hit", "hit.lua", ()), ("miss", "miss.lua", (f"{bench.run_id}profile",))):
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
