"""What operators see of a real proxy process: /metrics after scripted traffic, one JSON log line per request,
X-Request-ID, and /readyz while Redis is away."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.pricing import DEFAULT_PRICES
from tests.e2e.support import CLIENT_KEY, MODEL, UPSTREAM_KEY, ProxyProcess, chat_kwargs, start_proxy
from tests.support import RedisServer, eventually

pytestmark = pytest.mark.e2e

# The price of the model the tests use is overridden; a dated snapshot of gpt-4o takes the shipped gpt-4o price.
PRICED = {MODEL: (1.5, 6.0)}
CONFIG = f"pricing:\n  {MODEL}: {{input: 1.5, output: 6.0}}\nredis:\n  retry_after_s: 30\n  timeout_ms: 200\n"
SNAPSHOT_MODEL = "gpt-4o-2024-08-06"
GPT_4O = next(price for price in DEFAULT_PRICES if price.model == "gpt-4o")
CHAT = {"upstream": "default", "route": "chat/completions"}
Samples = Counter[tuple[str, frozenset[tuple[str, str]]]]


@pytest.fixture(scope="module")
def observed(
    upstream_url: str, module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy logging JSON request lines at INFO, with a price of its own for the tests' model."""
    process = start_proxy(
        tmp_path_factory.mktemp("observed"),
        upstream_url,
        module_redis.url,
        config=CONFIG,
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    )
    yield process
    process.stop()


def scrape(proxy: ProxyProcess) -> Samples:
    with urllib.request.urlopen(f"{proxy.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] += sample.value
    return samples


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much the samples called *name* whose labels include *labels* moved between two scrapes."""
    wanted = labels.items()
    return sum(after[key] - before.get(key, 0) for key in after if key[0] == name and wanted <= dict(key[1]).items())


def access_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in proxy.log.read_text().splitlines() if line.startswith("{")]
    return [record for record in records if record["logger"] == "proxy.access"]


def _sized(sdk: openai.OpenAI, **kwargs: Any) -> tuple[str, int]:
    """The X-Cache of one call and the bytes of its body, as the client received them."""
    raw = sdk.chat.completions.with_raw_response.create(**kwargs)
    return raw.headers["X-Cache"], len(raw.http_response.read())


async def _coalesced_pair(proxy: ProxyProcess) -> list[tuple[str, int]]:
    """Two identical calls at once (the fake answers "slow" prompts late): one calls upstream, one joins it."""
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        kwargs = chat_kwargs("slow observed coalesced pair")
        raws = await asyncio.gather(*(sdk.chat.completions.with_raw_response.create(**kwargs) for _ in range(2)))
        return sorted([(raw.headers["X-Cache"], len(await raw.http_response.aread())) for raw in raws])


def test_counters_move_by_exactly_the_scripted_traffic_when_scraped(observed: ProxyProcess) -> None:
    before = scrape(observed)
    stored_bytes = 0
    with openai.OpenAI(base_url=observed.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        plain = chat_kwargs("observed plain question")  # 3 prompt tokens, 5 completion tokens at the fake
        outcomes = [_sized(sdk, **plain) for _ in range(3)]
        assert [cache for cache, _ in outcomes] == ["MISS", "HIT", "HIT"]
        stored_bytes += outcomes[0][1]
        snapshot = {**chat_kwargs("observed snapshot pricing"), "model": SNAPSHOT_MODEL}
        outcomes = [_sized(sdk, **snapshot) for _ in range(2)]
        assert [cache for cache, _ in outcomes] == ["MISS", "HIT"]
        stored_bytes += outcomes[0][1]
        stream = chat_kwargs("observed streamed answer", stream=True, stream_options={"include_usage": True})
        outcomes = [_sized(sdk, **stream) for _ in range(2)]
        assert [cache for cache, _ in outcomes] == ["MISS", "HIT"]
        stored_bytes += outcomes[0][1]
        with pytest.raises(openai.InternalServerError):
            sdk.chat.completions.create(**chat_kwargs("observed fail:500 error"))
    pair = asyncio.run(_coalesced_pair(observed))
    assert [cache for cache, _ in pair] == ["COALESCED", "MISS"]
    stored_bytes += pair[1][1]
    after = scrape(observed)

    def delta(name: str, **labels: str) -> float:
        return moved(before, after, name, **labels)

    mini = {**CHAT, "model": MODEL}
    assert delta("llm_cache_requests_total", outcome="MISS", **mini) == 4  # plain, stream, error, coalesced pair
    assert delta("llm_cache_requests_total", outcome="HIT", **mini) == 3
    assert delta("llm_cache_requests_total", outcome="COALESCED", **mini) == 1
    assert delta("llm_cache_requests_total", model=SNAPSHOT_MODEL) == 2
    assert delta("llm_cache_coalesced_requests_total") == 1
    assert delta("llm_cache_upstream_responses_total", upstream="default", status="200") == 4
    assert delta("llm_cache_upstream_responses_total", upstream="default", status="500") == 1
    assert delta("llm_cache_upstream_first_byte_seconds_count", upstream="default") == 5
    assert delta("llm_cache_stores_total") == 4
    assert delta("llm_cache_stored_bytes_total") == stored_bytes
    assert delta("llm_cache_request_duration_seconds_count", route="chat/completions", outcome="HIT") == 4
    assert delta("llm_cache_request_duration_seconds_count", route="chat/completions") == 10
    assert delta("llm_cache_first_byte_seconds_count", outcome="MISS") == 1
    assert delta("llm_cache_first_byte_seconds_count", outcome="HIT") == 1
    assert delta("llm_cache_tokens_saved_total", model=MODEL, kind="input") == 2 * 3 + 3
    assert delta("llm_cache_tokens_saved_total", model=MODEL, kind="output") == 2 * 5 + 5
    assert delta("llm_cache_tokens_saved_total", model=SNAPSHOT_MODEL) == 3 + 5
    price_in, price_out = PRICED[MODEL]
    expected = (9 * price_in + 15 * price_out) / 1e6
    assert delta("llm_cache_cost_saved_usd_total", model=MODEL) == pytest.approx(expected, rel=1e-9)
    expected = (3 * GPT_4O.input_usd_per_mtok + 5 * GPT_4O.output_usd_per_mtok) / 1e6
    assert delta("llm_cache_cost_saved_usd_total", model=SNAPSHOT_MODEL) == pytest.approx(expected, rel=1e-9)
    assert delta("llm_cache_redis_operation_duration_seconds_count", operation="read") >= 1
    assert delta("llm_cache_redis_errors_total") == 0
    assert after[("llm_cache_redis_up", frozenset())] == 1


def test_each_request_leaves_one_json_line_when_logged(observed: ProxyProcess) -> None:
    with openai.OpenAI(base_url=observed.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        kwargs = chat_kwargs("observed logged question", stream=True, stream_options={"include_usage": True})
        miss = sdk.chat.completions.with_raw_response.create(**kwargs, extra_headers={"X-Request-ID": "trace-7"})
        miss.http_response.read()
        hit = sdk.chat.completions.with_raw_response.create(**kwargs)
        hit.http_response.read()
    assert miss.headers["X-Request-ID"] == "trace-7"
    generated = hit.headers["X-Request-ID"]
    assert generated and generated != "trace-7"
    assert eventually(lambda: generated in {line["request_id"] for line in access_lines(observed)})
    lines = {line["request_id"]: line for line in access_lines(observed)}
    first, second = lines["trace-7"], lines[generated]
    common = {
        "level": "INFO",
        "message": "request",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "model": MODEL,
        "upstream": "default",
        "input_tokens": 3,
        "output_tokens": 5,
        "key": miss.headers["X-Cache-Key"],
        "client": None,
    }
    assert {name: first[name] for name in common} == common
    assert {name: second[name] for name in common} == common
    assert (first["outcome"], first["upstream_status"]) == ("MISS", 200)
    assert (second["outcome"], second["upstream_status"]) == ("HIT", None)
    for line in (first, second):
        assert 0 < line["first_byte_ms"] <= line["duration_ms"]
    text = observed.log.read_text()
    assert UPSTREAM_KEY not in text and f"Bearer {CLIENT_KEY}" not in text and "logged question" not in text


def test_invalid_request_id_is_replaced_when_sent(observed: ProxyProcess) -> None:
    with openai.OpenAI(base_url=observed.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            **chat_kwargs("observed odd request id"), extra_headers={"X-Request-ID": "a b;c"}
        )
    assert raw.headers["X-Request-ID"] not in ("", "a b;c")


def test_readyz_stays_ready_and_names_redis_down_when_redis_stops(
    upstream_url: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path, upstream_url, own_redis.url, config=CONFIG)
    try:
        with openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
            sdk.chat.completions.create(**chat_kwargs("observed before the outage"))
            before = scrape(proxy)
            own_redis.stop()
            raw = sdk.chat.completions.with_raw_response.create(**chat_kwargs("observed during the outage"))
            assert raw.headers["X-Cache"] == "MISS"
        with urllib.request.urlopen(f"{proxy.url}/readyz", timeout=5) as response:
            status, body = response.status, json.loads(response.read())
        after = scrape(proxy)
    finally:
        proxy.stop()
    assert status == 200
    assert body["status"] == "ready" and body["cache"] == "degraded" and body["redis"] == "down"
    assert after[("llm_cache_redis_up", frozenset())] == 0
    assert moved(before, after, "llm_cache_redis_errors_total", operation="read") == 1
    assert moved(before, after, "llm_cache_requests_total", outcome="MISS") == 1
