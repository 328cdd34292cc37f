"""The package's layering: each module imports only modules listed above it, so the pure ones stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"
ORDER = [
    "pricing",
    "kinds",
    "config",
    "loader",
    "logs",
    "errors",
    "entry",
    "seal",
    "cache_key",
    "sse",
    "policy",
    "wire",
    "keying",
    "metrics",
    "exposition",
    "redis_client",
    "store",
    "memory",
    "upstream",
    "lending",
    "flight",
    "fleet",
    "coherence",
    "generation",
    "peers",
    "state",
    "handlers",
    "probes",
    "guards",
    "access",
    "fastpath",
    "app",
    "serving",
    "keyspace",
    "survey",
    "commands",
    "stats",
    "__main__",
]
PURE = ORDER[: ORDER.index("metrics") + 1]


def imported_siblings(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module or "__init__")  # `from . import __version__` reads the package itself
    return names - {"__init__"}


def test_every_module_is_placed_when_layout_is_checked() -> None:
    assert sorted(ORDER) == sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_modules_import_only_modules_above_them_when_imported() -> None:
    for index, module in enumerate(ORDER):
        assert imported_siblings(module) <= set(ORDER[:index]), module


def test_pure_modules_do_no_io_when_imported() -> None:
    for module in PURE:
        source = (PACKAGE / f"{module}.py").read_text()
        for io_module in ("asyncio", "aiohttp", "redis", "socket"):
            assert f"import {io_module}" not in source, (module, io_module)
