"""Metrics: histograms, bounded labels, prices, the sum of workers' snapshots and its Prometheus text."""

from __future__ import annotations

import io
import json
from typing import Any

import orjson
import pytest

from proxy.exposition import merge, render
from proxy.logs import Exchange, tokens
from proxy.metrics import MAX_LABEL_VALUES, MAX_SAVED_GROUPS, MIN, OTHER, Bounded, Histogram, Metrics
from proxy.pricing import DEFAULT_PRICES, ModelPrice, PriceList
from tests.support import chat_body, metric


def test_observation_lands_in_the_first_bucket_at_or_above_it_when_observed() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(("x",), value)
    assert histogram.series[("x",)] == [2, 2, 1, pytest.approx(8.65)]


def test_values_past_the_limit_fold_into_other_when_too_many_or_too_long() -> None:
    labels = Bounded(limit=2, max_chars=10)
    assert [labels("a"), labels("b"), labels("c"), labels("a")] == ["a", "b", OTHER, "a"]
    assert Bounded()("x" * 200) == OTHER and Bounded()(None) == "none"


def test_model_labels_stay_bounded_when_clients_send_many_names() -> None:
    metrics = Metrics()
    for i in range(MAX_LABEL_VALUES + 50):
        ex = Exchange("id", 0.0)
        ex.route, ex.upstream, ex.model, ex.outcome = "chat/completions", "u", f"model-{i}", "MISS"
        metrics.record(ex, 0.001)
    models = {labels[2] for labels in metrics.requests.series}
    assert len(models) == MAX_LABEL_VALUES + 1 and OTHER in models
    assert sum(metrics.requests.series[("u", "chat/completions", OTHER, "MISS")][:-1]) == 50


def test_dated_snapshot_takes_its_base_price_when_it_has_none_of_its_own() -> None:
    prices = PriceList(DEFAULT_PRICES)
    mini = prices.price("gpt-4o-mini-2024-07-18")
    assert mini is not None and mini.model == "gpt-4o-mini"
    assert prices.price("gpt-4o-2024-08-06") == prices.price("gpt-4o")
    assert prices.price("gpt-4o-minimal") is None and prices.price("my-own-model") is None


def test_configured_price_wins_over_the_shipped_one_when_both_name_a_model() -> None:
    metrics = Metrics((*DEFAULT_PRICES, ModelPrice("gpt-4o", 1.0, 2.0)))
    metrics.count_saved("gpt-4o", tokens({"prompt_tokens": 1000, "completion_tokens": 500}))
    metrics.add_up_saved()
    assert metrics.cost_usd[("gpt-4o",)] == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)


def test_unpriced_model_counts_tokens_not_money_when_served_from_cache() -> None:
    metrics = Metrics(DEFAULT_PRICES)
    metrics.count_saved("local-llama", tokens({"input_tokens": 7, "output_tokens": 3}))
    metrics.add_up_saved()
    assert metrics.tokens[("local-llama", "input")] == 7 and metrics.tokens[("local-llama", "output")] == 3
    assert ("local-llama",) not in metrics.cost_usd


def test_repeated_hits_on_one_entry_count_every_time_when_its_usage_is_shared() -> None:
    metrics = Metrics(DEFAULT_PRICES)
    entry_tokens = tokens({"prompt_tokens": 4, "completion_tokens": 2})
    for _ in range(3):
        metrics.count_saved("gpt-4o-mini", entry_tokens)
    metrics.count_saved("gpt-4o", entry_tokens)
    metrics.count_saved("gpt-4o-mini", tokens({"prompt_tokens": 1}))
    metrics.add_up_saved()
    assert metrics.tokens[("gpt-4o-mini", "input")] == 13 and metrics.tokens[("gpt-4o-mini", "output")] == 6
    assert metrics.tokens[("gpt-4o", "input")] == 4
    assert metrics.cost_usd[("gpt-4o",)] == pytest.approx((4 * 2.5 + 2 * 10) / 1e6)


def test_model_past_the_label_limit_keeps_its_price_when_its_hits_are_counted() -> None:
    metrics = Metrics(DEFAULT_PRICES)
    for i in range(MAX_LABEL_VALUES):
        metrics.models(f"model-{i}")
    metrics.count_saved("gpt-4o", (1000, 0))
    metrics.count_saved("my-own-model", (1000, 0))
    metrics.add_up_saved()
    assert metrics.tokens[(OTHER, "input")] == 2000
    assert metrics.cost_usd[(OTHER,)] == pytest.approx(1000 * 2.5 / 1e6)


def test_saved_groups_stay_bounded_and_counted_when_hits_bring_many_token_counts() -> None:
    metrics = Metrics(DEFAULT_PRICES)
    for i in range(3 * MAX_SAVED_GROUPS):
        metrics.count_saved("gpt-4o-mini", (i % (2 * MAX_SAVED_GROUPS), 1))
        assert len(metrics.saved) < MAX_SAVED_GROUPS
    metrics.add_up_saved()
    assert metrics.tokens[("gpt-4o-mini", "output")] == 3 * MAX_SAVED_GROUPS


def _busy(requests: int, hits: int, redis_up: int) -> dict[str, Any]:
    metrics = Metrics(DEFAULT_PRICES)
    for i in range(requests):
        ex = Exchange("id", 0.0)
        ex.route, ex.upstream, ex.model = "chat/completions", "openai", "gpt-4o-mini"
        ex.outcome = "HIT" if i < hits else "MISS"
        ex.first_byte_s = 0.0002
        metrics.record(ex, 0.0003)
    metrics.count_saved("gpt-4o-mini", tokens({"prompt_tokens": 10 * hits, "completion_tokens": 0}))
    metrics.count_upstream("openai", "200", 0.2)
    metrics.stores += 1
    metrics.gauge("llm_cache_memory_entries", "entries", lambda: 5)
    metrics.gauge("llm_cache_redis_up", "up", lambda: redis_up, MIN)
    # Through JSON, as a worker's snapshot travels.
    return dict(orjson.loads(orjson.dumps(metrics.snapshot())))


def test_workers_snapshots_add_up_when_merged_and_rendered() -> None:
    text = render(merge([_busy(3, 2, 1), _busy(4, 1, 0)])).decode()
    chat = {"upstream": "openai", "route": "chat/completions", "model": "gpt-4o-mini"}
    assert metric(text, "llm_cache_requests_total", outcome="HIT", **chat) == 3
    assert metric(text, "llm_cache_requests_total", outcome="MISS", **chat) == 4
    assert metric(text, "llm_cache_request_duration_seconds_count", outcome="HIT") == 3
    assert metric(text, "llm_cache_request_duration_seconds_bucket", outcome="MISS", le="0.0005") == 4
    assert metric(text, "llm_cache_first_byte_seconds_bucket", outcome="MISS", le="0.0001") == 0
    assert metric(text, "llm_cache_upstream_responses_total", status="200") == 2
    assert metric(text, "llm_cache_upstream_first_byte_seconds_sum") == pytest.approx(0.4)
    assert metric(text, "llm_cache_tokens_saved_total", kind="input") == 30
    assert metric(text, "llm_cache_cost_saved_usd_total", model="gpt-4o-mini") == pytest.approx(30 * 0.15 / 1e6)
    assert metric(text, "llm_cache_stores_total") == 2
    assert metric(text, "llm_cache_memory_entries") == 10
    assert metric(text, "llm_cache_redis_up") == 0


def test_label_values_from_clients_are_escaped_when_rendered() -> None:
    metrics = Metrics()
    ex = Exchange("id", 0.0)
    ex.route, ex.upstream, ex.model, ex.outcome = "chat/completions", "u", 'a"b\\c\nd', "MISS"
    metrics.record(ex, 0.001)
    text = render(merge([metrics.snapshot()])).decode()
    assert metric(text, "llm_cache_requests_total", model='a"b\\c\nd') == 1


async def test_request_id_round_trips_when_the_client_sends_one(fake_upstream: Any, proxy_for: Any) -> None:
    lines = io.StringIO()
    client = await proxy_for(fake_upstream, log_stream=lines)
    sent = await client.post("/v1/chat/completions", json=chat_body("ids"), headers={"X-Request-ID": "req-42"})
    fresh = [await client.post("/v1/chat/completions", json=chat_body("ids")) for _ in range(2)]
    assert sent.headers["X-Request-ID"] == "req-42"
    ids = [response.headers["X-Request-ID"] for response in fresh]
    assert len(set(ids)) == 2 and "req-42" not in ids
    passthrough = await client.get("/v1/models", headers={"X-Request-ID": "req-43"})
    assert passthrough.headers["X-Request-ID"] == "req-43"


async def test_request_line_is_written_when_access_logging_is_on(
    fake_upstream: Any, proxy_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="proxy.access")
    lines = io.StringIO()
    client = await proxy_for(fake_upstream, log_stream=lines, log_format="json")
    await client.post("/v1/chat/completions", json=chat_body("logged"), headers={"X-Request-ID": "r1"})
    await client.post("/v1/chat/completions", json=chat_body("slow fail:503"), headers={"X-Request-ID": "r2"})
    await client.get("/v1/models", headers={"X-Request-ID": "r3"})
    records = {r["request_id"]: r for r in map(json.loads, lines.getvalue().splitlines())}
    assert (records["r1"]["outcome"], records["r1"]["status"], records["r1"]["upstream_status"]) == ("MISS", 200, 200)
    assert (records["r1"]["input_tokens"], records["r1"]["output_tokens"]) == (1, 5)
    assert (records["r2"]["outcome"], records["r2"]["status"], records["r2"]["upstream_status"]) == ("MISS", 503, 503)
    assert (records["r2"]["input_tokens"], records["r2"]["output_tokens"]) == (0, 0)
    assert (records["r3"]["outcome"], records["r3"]["path"], records["r3"]["model"]) == ("BYPASS", "/v1/models", None)


async def test_no_request_line_is_written_when_level_is_warning(
    fake_upstream: Any, proxy_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="proxy.access")
    lines = io.StringIO()
    client = await proxy_for(fake_upstream, log_stream=lines)
    await client.post("/v1/chat/completions", json=chat_body("quiet"))
    assert lines.getvalue() == ""


async def test_request_line_reads_as_key_value_pairs_when_format_is_text(
    fake_upstream: Any, proxy_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="proxy.access")
    lines = io.StringIO()
    client = await proxy_for(fake_upstream, log_stream=lines, log_format="text")
    await client.post("/v1/chat/completions", json=chat_body("texty"), headers={"X-Request-ID": "t1"})
    (line,) = lines.getvalue().splitlines()
    assert " level=INFO logger=proxy.access request request_id=t1 method=POST path=/v1/chat/completions " in line
    assert " outcome=MISS " in line and " upstream_status=200 " in line and line.endswith(" client=-")


async def test_a_model_name_cannot_add_fields_to_a_text_line_when_it_holds_spaces_and_equals(
    fake_upstream: Any, proxy_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="proxy.access")
    lines = io.StringIO()
    client = await proxy_for(fake_upstream, log_stream=lines, log_format="text")
    body = {**chat_body("forging"), "model": 'gpt-4o outcome=HIT client="admin" \\x20'}
    await client.post("/v1/chat/completions", json=body)
    (line,) = lines.getvalue().splitlines()
    fields = line.split(" ")
    assert [f for f in fields if f.startswith("outcome=")] == ["outcome=MISS"]
    assert [f for f in fields if f.startswith("client=")] == ["client=-"]
    assert "model=gpt-4o\\x20outcome\\x3dHIT\\x20client\\x3d\\x22admin\\x22\\x20\\x5cx20" in fields
