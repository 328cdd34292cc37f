"""Fixtures for the deployment tests: the chart rendered once per values file, and the parsed Dockerfile."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from .support import CI_VALUES, ROOT, Dockerfile, Render, load_values, parse_dockerfile, render_chart


@pytest.fixture(scope="session")
def rendered() -> dict[str, Render]:
    """Every helm/ci/*-values.yaml rendered once, keyed by file name without `-values.yaml`."""
    assert CI_VALUES, "helm/ci/*-values.yaml is missing"
    return {path.name.removesuffix("-values.yaml"): render_chart(load_values(path)) for path in CI_VALUES}


@pytest.fixture(scope="session")
def render() -> Callable[[Mapping[str, Any]], Render]:
    """Render the chart with ad-hoc values (for variations the ci files do not cover)."""
    return render_chart


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))
