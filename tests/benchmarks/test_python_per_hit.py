"""The measure of the fast path's Python work per hit."""

from __future__ import annotations

from tests.benchmarks.python_per_hit import measure


async def test_measure_answers_every_request_as_a_hit_when_fed_the_benchmark_chat_request() -> None:
    # measure() raises unless every request it feeds was answered by the fast path from the in-process tier.
    assert await measure(200) > 0
