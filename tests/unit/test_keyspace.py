"""What the operator commands compute without Redis: glob escaping, progress lines, spreads."""

from __future__ import annotations

import io
import random

from proxy.keyspace import Progress, glob_escape
from proxy.survey import SAMPLES, Spread


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_namespace_is_matched_literally_when_it_holds_glob_characters() -> None:
    assert glob_escape("team[1]*?\\x") == "team\\[1\\]\\*\\?\\\\x"
    assert glob_escape("llm-cache") == "llm-cache"


def test_progress_is_shown_only_when_stream_is_a_terminal() -> None:
    piped, terminal = io.StringIO(), Terminal()
    for stream in (piped, terminal):
        progress = Progress(stream)
        progress.update("stats: 1000 keys read")
        progress.done()
    assert piped.getvalue() == ""
    assert "stats: 1000 keys read" in terminal.getvalue() and terminal.getvalue().endswith("\r\x1b[K")


def test_spread_keeps_exact_bounds_and_a_close_median_when_values_outnumber_samples() -> None:
    spread = Spread(random.Random(7))
    values = list(range(5 * SAMPLES))
    random.Random(1).shuffle(values)
    for value in values:
        spread.add(value)
    summary = spread.summary()
    assert summary is not None and (summary["min"], summary["max"]) == (0, 5 * SAMPLES - 1)
    assert abs(summary["median"] - 2.5 * SAMPLES) < 0.05 * SAMPLES
    assert Spread(random.Random()).summary() is None
