"""What the image runs, without Docker: the package built from the build context, started with the image's CMD
and ENV, checked with its HEALTHCHECK, and stopped with SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port

from .support import ROOT, Dockerfile, dockerignore_excludes, read_dockerignore

pytestmark = pytest.mark.deploy

STARTUP_S = 30.0
SHUTDOWN_S = 10.0


def copy_build_context(destination: Path) -> None:
    """Copy what `docker build .` would send: the work tree minus .dockerignore."""
    patterns = read_dockerignore()
    for directory, subdirs, files in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT)
        subdirs[:] = [d for d in subdirs if not dockerignore_excludes(patterns, (relative / d).as_posix())]
        for name in files:
            path = (relative / name).as_posix()
            if not dockerignore_excludes(patterns, path):
                (destination / relative).mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, destination / path)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the project's wheel and its dependencies, as the image's builder stage makes."""
    work = tmp_path_factory.mktemp("wheel")
    context = work / "context"
    copy_build_context(context)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(work / "dist"), str(context)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("llm_cache_proxy-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "venv")], check=True, timeout=120)
    subprocess.run(
        [*pip, "--python", str(work / "venv" / "bin" / "python"), "install", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return work / "venv"


def image_environment(dockerfile: Dockerfile, venv: Path, port: int) -> dict[str, str]:
    """The image's ENV with /opt/venv mapped onto *venv*, a free port, and the in-process cache."""
    env = {"PATH": os.environ["PATH"], "HOME": str(venv.parent)}
    for key, value in dockerfile.env().items():
        env[key] = value.replace("/opt/venv", str(venv)).replace("$PATH", os.environ["PATH"])
    env["PROXY_PORT"] = str(port)
    env["CACHE_BACKEND"] = "memory"
    return env


def wait_until_ready(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the proxy exited with {process.returncode} while starting"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    pytest.fail(f"the proxy was not ready on port {port} within {STARTUP_S} s")


RunningImage = tuple[subprocess.Popen[bytes], dict[str, str], Path]


@pytest.fixture
def running_image(dockerfile: Dockerfile, venv: Path, tmp_path: Path) -> Iterator[RunningImage]:
    """The image's CMD, started as the image would start it; yields the process, its environment and log."""
    port = free_port()
    env = image_environment(dockerfile, venv, port)
    workdir = tmp_path / "app"  # like the image's empty WORKDIR: no proxy.yaml, no .env
    workdir.mkdir()
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(dockerfile.cmd(), env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(process, port)
        yield process, env, log_path
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=SHUTDOWN_S)


def test_healthcheck_passes_and_sigterm_stops_cleanly_when_running_the_image_command(
    running_image: RunningImage, dockerfile: Dockerfile
) -> None:
    process, env, log_path = running_image
    healthcheck = subprocess.run(dockerfile.healthcheck(), env=env, capture_output=True, timeout=10, check=False)
    assert healthcheck.returncode == 0, healthcheck.stderr.decode()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=SHUTDOWN_S) == 0
    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log, log

    # The same check fails once nothing listens, so a passing check means something.
    after = subprocess.run(dockerfile.healthcheck(), env=env, capture_output=True, timeout=10, check=False)
    assert after.returncode != 0


def test_console_script_is_installed_when_installing_the_wheel(venv: Path) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "llm-cache-proxy"), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.startswith("llm-cache-proxy ")
