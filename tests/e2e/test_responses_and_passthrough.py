"""The Responses API (cached like chat) and routes the proxy only passes through, driven by the official SDK."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai._legacy_response import LegacyAPIResponse

from tests.e2e.support import MODEL, ProxyProcess

pytestmark = pytest.mark.e2e


def _events(raw: LegacyAPIResponse[Any]) -> list[dict[str, Any]]:
    with raw.parse() as stream:
        return [event.model_dump() for event in stream]


async def _aevents(raw: LegacyAPIResponse[Any]) -> list[dict[str, Any]]:
    async with raw.parse() as stream:
        return [event.model_dump() async for event in stream]


def test_models_list_passes_through_when_called(proxy: ProxyProcess, client: openai.OpenAI) -> None:
    before = proxy.upstream_responses()
    raws = [client.models.with_raw_response.list() for _ in range(2)]
    assert [raw.headers["X-Cache"] for raw in raws] == ["BYPASS", "BYPASS"]
    assert [model.id for model in raws[1].parse().data] == ["gpt-4o-mini"]
    assert proxy.upstream_responses() - before == 2


def test_response_repeat_is_a_hit_when_sync_client(proxy: ProxyProcess, client: openai.OpenAI) -> None:
    before = proxy.upstream_responses()
    first = client.responses.with_raw_response.create(model=MODEL, input="sync responses question")
    second = client.responses.with_raw_response.create(model=MODEL, input="sync responses question")
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    miss, hit = first.parse(), second.parse()
    assert hit.id == miss.id
    assert hit.output_text == miss.output_text == "echo: sync responses question"
    assert proxy.upstream_responses() - before == 1


async def test_response_repeat_is_a_hit_when_async_client(proxy: ProxyProcess, aclient: openai.AsyncOpenAI) -> None:
    before = proxy.upstream_responses()
    first = await aclient.responses.with_raw_response.create(model=MODEL, input="async responses question")
    second = await aclient.responses.with_raw_response.create(model=MODEL, input="async responses question")
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert second.parse().model_dump() == first.parse().model_dump()
    assert proxy.upstream_responses() - before == 1


def test_response_stream_hit_yields_the_same_events_when_sync_client(
    proxy: ProxyProcess, client: openai.OpenAI
) -> None:
    before = proxy.upstream_responses()
    first = client.responses.with_raw_response.create(model=MODEL, input="sync responses stream", stream=True)
    miss = _events(first)
    second = client.responses.with_raw_response.create(model=MODEL, input="sync responses stream", stream=True)
    hit = _events(second)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert hit == miss
    assert [event["type"] for event in hit][-1] == "response.completed"
    assert (
        "".join(e["delta"] for e in hit if e["type"] == "response.output_text.delta") == "echo: sync responses stream"
    )
    assert proxy.upstream_responses() - before == 1


async def test_response_stream_hit_yields_the_same_events_when_async_client(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    before = proxy.upstream_responses()
    kwargs: dict[str, Any] = {"model": MODEL, "input": "async responses stream", "stream": True}
    first = await aclient.responses.with_raw_response.create(**kwargs)
    miss = await _aevents(first)
    second = await aclient.responses.with_raw_response.create(**kwargs)
    hit = await _aevents(second)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert hit == miss
    assert hit[-1]["response"]["id"] == miss[0]["response"]["id"]
    assert proxy.upstream_responses() - before == 1


def test_response_stream_is_not_stored_when_upstream_drops_before_completion(
    proxy: ProxyProcess, client: openai.OpenAI
) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "input": "responses stream drop", "stream": True}
    outcomes = []
    for _ in range(2):
        raw = client.responses.with_raw_response.create(**kwargs)
        outcomes.append(raw.headers["X-Cache"])
        with pytest.raises(openai.APIConnectionError):
            _events(raw)
    assert outcomes == ["MISS", "MISS"]
