"""How the serving process sets itself up."""

from __future__ import annotations

import ctypes
import platform

import pytest

from proxy import serving


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_heap_sets_the_trim_threshold_with_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    calls: list[tuple[int, int]] = []
    real = ctypes.CDLL(None).mallopt

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return int(real(param, value))

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    assert serving.keep_heap() is True
    assert calls == [(-1, serving.TRIM_THRESHOLD_BYTES)]


def test_keep_heap_leaves_an_operators_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: pytest.fail("mallopt called"))
    assert serving.keep_heap() is False


def test_keep_heap_does_without_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)

    class Musl:
        pass

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Musl())
    assert serving.keep_heap() is False
