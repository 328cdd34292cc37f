"""Optional peers (``--peers``), measured in the same rounds as nginx and the proxy: Varnish, TensorZero, LiteLLM.

Varnish comes from apt; TensorZero and LiteLLM from PyPI, installed into a virtualenv of their own beside this
file, so that neither their hundreds of dependencies nor their pins reach the project's test environment. The
runner never installs anything: a peer that is not there is skipped, with the command that installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import processes, varnish
from .processes import SERVER_CORE, BenchmarkError, Service
from .stack import HEALTHZ, HERE, OK, REPO, Bench, Running, ServerUnderTest, python_env

PEERS_VENV = HERE / ".peers-venv"
_VENV = PEERS_VENV.relative_to(REPO)
VENV_INSTALL = f"python3 -m venv {_VENV} && {_VENV}/bin/pip install tensorzero 'litellm[proxy]'"
VARNISH_INSTALL = "apt-get install -y varnish varnish-modules"
VMODS = "/usr/lib/*/varnish/vmods/libvmod_bodyaccess.so"
# LiteLLM loads its model price list from the network at start unless told to use the copy it ships.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_ADMIN_UI": "True"}
START_TIMEOUT_S = 90.0


def _site_packages(package: str) -> list[Path]:
    return sorted(PEERS_VENV.glob(f"lib/python3*/site-packages/{package}-*.dist-info"))


def version(name: str) -> str:
    """The installed version of peer *name* (``?`` when unknown), for the environment record."""
    if name == "varnish":
        done = subprocess.run(["varnishd", "-V"], capture_output=True, text=True, timeout=10)
        match = re.search(r"varnish-([0-9.]+)", done.stdout + done.stderr)
        return match[1] if match else "?"
    found = _site_packages(name)
    return found[-1].name.removeprefix(f"{name}-").removesuffix(".dist-info") if found else "?"


def missing(name: str) -> str | None:
    """Why peer *name* cannot run here, with the command that installs it; None when it can."""
    if name == "varnish":
        if shutil.which("varnishd") is None or not list(Path("/").glob(VMODS.lstrip("/"))):
            return f"varnishd or vmod bodyaccess not installed; install with: {VARNISH_INSTALL}"
        return None
    if not _site_packages(name):
        return f"{name} is not installed in {_VENV}; install with: {VENV_INSTALL}"
    return None


def _scratch_dir(bench: Bench, name: str, mode: int = 0o700) -> Path:
    root = bench.tmp / name
    root.mkdir(mode=mode)
    return root


def start_varnish(bench: Bench, name: str, upstream_port: int) -> Running:
    """varnishd with the body-keyed VCL in front of *upstream_port*, ready once ``/healthz`` answers 200."""
    # Its worker runs as the unprivileged vcache user, which must reach the VCL through the 0700 scratch dir.
    bench.tmp.chmod(0o711)
    root = _scratch_dir(bench, name, 0o755)
    (root / "default.vcl").write_text(varnish.vcl(upstream_port))
    port = processes.free_port()
    service = bench.start(name, varnish.argv(root, port), str(SERVER_CORE))
    return Running(service, port, processes.wait_ready(service, port, HEALTHZ, OK, START_TIMEOUT_S))


def tensorzero_toml(upstream_port: int) -> str:
    """A gateway with one chat and one embedding model, both at the fake upstream, and nothing else to reach."""
    provider = f'type = "openai"\napi_base = "http://127.0.0.1:{upstream_port}/v1/"\napi_key_location = "none"\n'
    return (
        "[gateway]\n"
        "observability.enabled = false\n\n"
        '[models.mock]\nrouting = ["local"]\n\n'
        f'[models.mock.providers.local]\nmodel_name = "gpt-4o-mini"\n{provider}\n'
        '[embedding_models.embed]\nrouting = ["local"]\n\n'
        f'[embedding_models.embed.providers.local]\nmodel_name = "text-embedding-3-small"\n{provider}'
    )


def _port_from(service: Service, port_file: Path, timeout_s: float) -> int:
    """The port a process that picks its own writes to *port_file*; BenchmarkError if it exits or takes too long."""
    for _ in range(int(timeout_s * 100)):
        if port_file.exists():
            return int(port_file.read_text())
        if service.popen.poll() is not None:
            break
        time.sleep(0.01)
    raise BenchmarkError(f"{service.name} wrote no port to {port_file}:\n{service.log_tail()}")


def start_tensorzero(bench: Bench, name: str, upstream_port: int) -> Running:
    """TensorZero's gateway, in a Python process of the peers' virtualenv, with its exact cache in the run's Redis."""
    root = _scratch_dir(bench, name)
    config, port_file = root / "tensorzero.toml", root / "port"
    config.write_text(tensorzero_toml(upstream_port))
    redis = f"redis://127.0.0.1:{bench.ports['redis']}/0"
    argv = [str(PEERS_VENV / "bin" / "python"), "-m", f"{__package__}.tensorzero_gateway", "--config", str(config)]
    argv += ["--redis", redis, "--port-file", str(port_file)]
    service = bench.start(name, argv, str(SERVER_CORE), env=python_env(RUST_LOG="warn", NO_COLOR="1"))
    port = _port_from(service, port_file, START_TIMEOUT_S)
    # The embedded gateway has no health route; any HTTP answer (a 404) means it is serving.
    probe = processes.http_probe("/")
    return Running(service, port, processes.wait_ready(service, port, probe, b"HTTP/1.1 ", START_TIMEOUT_S))


def litellm_yaml(upstream_port: int, redis_port: int, namespace: str) -> str:
    """LiteLLM's proxy with the benchmark's two models at the fake upstream and its response cache in Redis."""
    models = "".join(
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: sk-bench\n"
        for model in ("gpt-4o-mini", "text-embedding-3-small")
    )
    return (
        f"model_list:\n{models}"
        "litellm_settings:\n"
        "  cache: true\n"
        "  cache_params:\n"
        "    type: redis\n"
        "    host: 127.0.0.1\n"
        f"    port: {redis_port}\n"
        f"    namespace: {namespace}\n"
        "    ttl: 3600\n"
        # It refuses to start without a key; the benchmark's clients all send this one.
        "general_settings:\n"
        "  master_key: sk-bench\n"
    )


def start_litellm(bench: Bench, name: str, upstream_port: int) -> Running:
    """LiteLLM's proxy (one uvicorn worker) in front of *upstream_port*, ready once its liveness route answers."""
    root = _scratch_dir(bench, name)
    config, port = root / "litellm.yaml", processes.free_port()
    config.write_text(litellm_yaml(upstream_port, bench.ports["redis"], f"bench-{bench.run_id}-{name}"))
    argv = [str(PEERS_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")} | LITELLM_ENV
    service = bench.start(name, [*argv, "--num_workers", "1"], str(SERVER_CORE), env=env)
    probe = processes.http_probe("/health/liveliness")
    return Running(service, port, processes.wait_ready(service, port, probe, OK, START_TIMEOUT_S))


PEERS: dict[str, ServerUnderTest] = {
    "varnish": ServerUnderTest("varnish", start_varnish),
    # Neither says HIT or MISS in a header: their hits are told by the fake upstream's request counter.
    "tensorzero": ServerUnderTest(
        "tensorzero", start_tensorzero, prefix="/openai", bodies="tensorzero", marks_hits=False
    ),
    # About a hundred hits a second, a dozen streamed ones: 64 connections would queue streams past wrk's 5 s
    # timeout, and 8 keep its one core as busy.
    "litellm": ServerUnderTest("litellm", start_litellm, marks_hits=False, run_s=3, max_connections=8),
}


def select(names: Sequence[str], say: Callable[[str], None] = print) -> tuple[list[ServerUnderTest], dict[str, str]]:
    """The peers among *names* that can run here, and for each one that cannot, why (said through *say* too)."""
    chosen, skipped = [], {}
    for name in names:
        reason = missing(name)
        if reason is None:
            chosen.append(PEERS[name])
        else:
            skipped[name] = reason
            say(f"skipping peer {name}: {reason}")
    return chosen, skipped
