"""Embeddings through the official SDK, which asks for base64 unless told otherwise."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from openai._legacy_response import LegacyAPIResponse

from tests.e2e.support import ProxyProcess

pytestmark = pytest.mark.e2e

EMBEDDING_MODEL = "text-embedding-3-small"
FORMATS: list[dict[str, Any]] = [{}, {"encoding_format": "float"}]
FORMAT_IDS = ["default-base64", "float"]


def _sent_format(raw: LegacyAPIResponse[Any]) -> Any:
    return orjson.loads(raw.http_request.content).get("encoding_format")


@pytest.mark.parametrize("extra", FORMATS, ids=FORMAT_IDS)
def test_repeat_is_a_hit_with_equal_vectors_when_sync_client(
    proxy: ProxyProcess, client: openai.OpenAI, extra: dict[str, Any]
) -> None:
    before = proxy.upstream_responses()
    text = f"sync embedding {extra}"
    first = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=text, **extra)
    second = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=text, **extra)
    assert _sent_format(first) == extra.get("encoding_format", "base64")
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    miss, hit = first.parse().data[0].embedding, second.parse().data[0].embedding
    assert len(miss) == 8 and all(isinstance(x, float) for x in miss)
    assert hit == miss
    assert proxy.upstream_responses() - before == 1


@pytest.mark.parametrize("extra", FORMATS, ids=FORMAT_IDS)
async def test_repeat_is_a_hit_with_equal_vectors_when_async_client(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI, extra: dict[str, Any]
) -> None:
    before = proxy.upstream_responses()
    texts = [f"async embedding {extra}", "second input"]
    first = await aclient.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=texts, **extra)
    second = await aclient.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=texts, **extra)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    miss = [item.embedding for item in first.parse().data]
    hit = [item.embedding for item in second.parse().data]
    assert len(miss) == 2
    assert hit == miss
    assert proxy.upstream_responses() - before == 1


def test_base64_and_float_are_separate_entries_when_same_input(proxy: ProxyProcess, client: openai.OpenAI) -> None:
    before = proxy.upstream_responses()
    text = "one input two formats"
    calls = FORMATS * 2
    raws = [client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=text, **extra) for extra in calls]
    assert [raw.headers["X-Cache"] for raw in raws] == ["MISS", "MISS", "HIT", "HIT"]
    wire = [orjson.loads(raw.content)["data"][0]["embedding"] for raw in raws]
    # Each caller gets the encoding it asked for, from the cache too.
    assert [type(item) for item in wire] == [str, list, str, list]
    assert wire[2] == wire[0] and wire[3] == wire[1]
    assert proxy.upstream_responses() - before == 2
