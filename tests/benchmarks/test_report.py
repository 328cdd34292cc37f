"""The report's hit tables and the aiohttp floor comparison, on made-up results."""

from __future__ import annotations

from typing import Any

import pytest
from probes import differing_headers
from report import HIT_WORKLOADS, gap_split, markdown

ENVIRONMENT = {"commit": "abc1234", "cpu": "Test CPU", "cores": 2, "python": "3.11.7", "nginx": "nginx/1.22.1",
               "wrk": "wrk 4.1.0", "redis": "Redis 7.0.15", "duration_s": 10, "server_core": 0, "load_core": 1,
               "calibrate": False}
# name -> (req/s, p50 ms, p99 ms, CPU µs per request)
SERVERS = {"proxy": (10_000.0, 6.0, 9.0, 100.0), "nginx": (30_000.0, 2.0, 3.0, 30.0),
           "floor": (10_500.0, 5.5, 8.0, 94.0)}


def _run(name: str) -> dict[str, Any]:
    rps, p50, p99, cpu_us = SERVERS[name]
    return {"wrk": {"requests_per_s": rps, "p50_ms": p50, "p99_ms": p99}, "cpu_us_per_request": {name: cpu_us},
            "core_busy": {name: 1.0}, "server_core_other": 0.0, "upstream_requests": 0,
            "body_identical_to_upstream": True}


def _results(servers: tuple[str, ...] = ("proxy", "nginx", "floor")) -> dict[str, Any]:
    hits = {f"{workload}/{conns}/{name}": _run(name)
            for workload in HIT_WORKLOADS for conns in (64, 1) for name in servers}
    return {"environment": ENVIRONMENT, "hits": hits}


def test_floor_columns_and_ratio_show_when_the_floor_was_measured() -> None:
    text = markdown(_results())
    assert "| hit | 64 | 10000 | 30000 | 10500 | 0.33 | 0.95 | 6.000 | 9.000 | 2.000 | 3.000 | 5.500 | 8.000 |" in text
    assert "| hit | 64 | 100.0 | 30.0 | 94.0 | 100% | 100% | 100% |" in text


def test_gap_to_nginx_is_split_at_the_floor_when_all_three_ran() -> None:
    split = gap_split(_results())
    assert set(split) == set(HIT_WORKLOADS)
    assert split["hit"]["gap_us"] == pytest.approx(70.0)
    assert split["hit"]["aiohttp_us"] == pytest.approx(64.0)
    assert split["hit"]["proxy_us"] == pytest.approx(6.0)
    assert split["hit"]["aiohttp_share"] == pytest.approx(64.0 / 70.0)
    assert "- hit: 70.0 µs, of which aiohttp's floor 64.0 µs (91%) and the proxy's own work 6.0 µs" in markdown(
        _results())


def test_hit_tables_render_without_floor_when_the_results_predate_it() -> None:
    results = _results(("proxy", "nginx"))
    text = markdown(results)
    assert "| hit | 64 | 10000 | 30000 | - | 0.33 | - | 6.000 | 9.000 | 2.000 | 3.000 | - | - |" in text
    assert gap_split(results) == {}


def test_floor_header_mismatch_is_noted_when_a_header_differs() -> None:
    results = _results()
    results["hits"]["stream/64/floor"]["headers_differing_from_proxy"] = ["content-type"]
    assert "- stream/floor: headers unlike the proxy's hit: content-type" in markdown(results)


def test_varying_header_values_are_ignored_when_comparing_hits() -> None:
    proxy = {"content-type": "application/json", "x-cache": "HIT", "x-cache-key": "0123456789abcdef", "age": "3",
             "date": "Thu, 26 Nov 2026 08:00:00 GMT", "openai-version": "2020-10-01"}
    floor = {**proxy, "x-cache-key": "0000000000000000", "age": "0", "date": "Thu, 26 Nov 2026 08:00:09 GMT"}
    assert differing_headers(proxy, floor) == []
    del floor["age"]
    floor["content-type"] = "text/plain"
    floor["x-extra"] = "1"
    assert differing_headers(proxy, floor) == ["age", "content-type", "x-extra"]
