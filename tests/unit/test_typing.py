"""The package passes ``mypy --strict`` (settings in setup.cfg)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_package_type_checks_when_mypy_runs_strict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "proxy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
