"""Chat completions through the official SDK: hits, streams, cache keys, Cache-Control and upstream errors."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai._legacy_response import LegacyAPIResponse

from tests.e2e.support import CLIENT_KEY, MODEL, ProxyProcess, chat_kwargs

pytestmark = pytest.mark.e2e


def _stream_kwargs(content: str, include_usage: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    return chat_kwargs(content, stream=True, **extra)


def _chunks(raw: LegacyAPIResponse[Any]) -> list[dict[str, Any]]:
    with raw.parse() as stream:
        return [chunk.model_dump() for chunk in stream]


async def _achunks(raw: LegacyAPIResponse[Any]) -> list[dict[str, Any]]:
    async with raw.parse() as stream:
        return [chunk.model_dump() async for chunk in stream]


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])


def _assert_same_stream(
    miss: list[dict[str, Any]], hit: list[dict[str, Any]], content: str, include_usage: bool
) -> None:
    assert hit == miss
    assert _text(hit) == f"echo: {content}"
    assert len({c["id"] for c in hit}) == 1
    assert [c["choices"][0]["finish_reason"] for c in hit if c["choices"]][-1] == "stop"
    usage = [c["usage"] for c in hit if c["usage"] is not None]
    if include_usage:
        assert len(usage) == 1 and usage[0]["total_tokens"] > 0
    else:
        assert usage == []


def test_repeat_is_a_hit_with_the_same_completion_when_sync_client(proxy: ProxyProcess, client: openai.OpenAI) -> None:
    before = proxy.upstream_responses()
    kwargs = chat_kwargs("sync plain question")
    first = client.chat.completions.with_raw_response.create(**kwargs)
    second = client.chat.completions.with_raw_response.create(**kwargs)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    miss, hit = first.parse(), second.parse()
    assert hit.id == miss.id
    assert hit.model_dump() == miss.model_dump()
    assert hit.choices[0].message.content == "echo: sync plain question"
    assert int(second.headers["Age"]) >= 0
    assert proxy.upstream_responses() - before == 1


async def test_repeat_is_a_hit_with_the_same_completion_when_async_client(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    before = proxy.upstream_responses()
    kwargs = chat_kwargs("async plain question")
    first = await aclient.chat.completions.with_raw_response.create(**kwargs)
    second = await aclient.chat.completions.with_raw_response.create(**kwargs)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    miss, hit = first.parse(), second.parse()
    assert hit.id == miss.id
    assert hit.model_dump() == miss.model_dump()
    assert hit.choices[0].message.content == "echo: async plain question"
    assert proxy.upstream_responses() - before == 1


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
def test_stream_hit_yields_the_same_chunks_when_sync_client(
    proxy: ProxyProcess, client: openai.OpenAI, include_usage: bool
) -> None:
    before = proxy.upstream_responses()
    content = f"sync stream question usage={include_usage}"
    first = client.chat.completions.with_raw_response.create(**_stream_kwargs(content, include_usage))
    miss = _chunks(first)
    second = client.chat.completions.with_raw_response.create(**_stream_kwargs(content, include_usage))
    hit = _chunks(second)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert second.headers["Content-Type"].startswith("text/event-stream")
    _assert_same_stream(miss, hit, content, include_usage)
    assert proxy.upstream_responses() - before == 1


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
async def test_stream_hit_yields_the_same_chunks_when_async_client(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI, include_usage: bool
) -> None:
    before = proxy.upstream_responses()
    content = f"async stream question usage={include_usage}"
    first = await aclient.chat.completions.with_raw_response.create(**_stream_kwargs(content, include_usage))
    miss = await _achunks(first)
    second = await aclient.chat.completions.with_raw_response.create(**_stream_kwargs(content, include_usage))
    hit = await _achunks(second)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    _assert_same_stream(miss, hit, content, include_usage)
    assert proxy.upstream_responses() - before == 1


def test_stream_and_non_stream_are_separate_entries_when_same_messages(
    proxy: ProxyProcess, client: openai.OpenAI
) -> None:
    kwargs = chat_kwargs("stream or not")
    plain = client.chat.completions.with_raw_response.create(**kwargs)
    streamed = client.chat.completions.with_raw_response.create(**kwargs, stream=True)
    chunks = _chunks(streamed)
    assert [plain.headers["X-Cache"], streamed.headers["X-Cache"]] == ["MISS", "MISS"]
    assert chunks[0]["id"] != plain.parse().id


async def test_raw_json_in_another_key_order_and_spacing_hits_when_sdk_stored_it(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    content = "key order question"
    sdk = await aclient.chat.completions.with_raw_response.create(**chat_kwargs(content, temperature=0))
    assert sdk.headers["X-Cache"] == "MISS"
    raw = (
        f'{{\n  "temperature" : 0,\n  "messages": [ {{ "content": "{content}",  "role": "user" }} ],\n'
        f'  "model":"{MODEL}"\n}}'
    ).encode()
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.base_url}/chat/completions", data=raw, headers=headers) as response:
            assert response.status == 200
            assert response.headers["X-Cache"] == "HIT"
            body = await response.json()
    assert body["id"] == sdk.parse().id


async def test_stream_in_node_key_order_hits_when_python_sdk_stored_it(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    content = "node order stream"
    first = await aclient.chat.completions.with_raw_response.create(**_stream_kwargs(content, True))
    miss = await _achunks(first)
    # The Node SDK sends "messages" before "stream"; the Python SDK sends "stream" first.
    raw = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.base_url}/chat/completions", data=raw, headers=headers) as response:
            assert response.headers["X-Cache"] == "HIT"
            body = await response.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert f'"id":"{miss[0]["id"]}"'.encode() in body


@pytest.mark.parametrize(
    "headers",
    [
        {"x-stainless-retry-count": "3"},
        {"User-Agent": "OpenAI/JS 6.49.0", "x-stainless-lang": "js", "x-stainless-runtime": "node"},
        {"Idempotency-Key": "idem-0001"},
        {"x-stainless-read-timeout": "5", "Accept-Encoding": "identity"},
    ],
    ids=["retry-count", "user-agent", "idempotency-key", "timeout"],
)
def test_repeat_is_a_hit_when_only_per_call_headers_differ(
    proxy: ProxyProcess, client: openai.OpenAI, headers: dict[str, str]
) -> None:
    kwargs = chat_kwargs(f"per-call headers {sorted(headers)}")
    first = client.chat.completions.with_raw_response.create(**kwargs)
    second = client.chat.completions.with_raw_response.create(**kwargs, extra_headers=headers)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert second.parse().id == first.parse().id


async def test_async_client_hits_when_sync_client_stored_the_entry(
    proxy: ProxyProcess, client: openai.OpenAI, aclient: openai.AsyncOpenAI
) -> None:
    kwargs = chat_kwargs("sync then async")
    first = client.chat.completions.with_raw_response.create(**kwargs)
    second = await aclient.chat.completions.with_raw_response.create(**kwargs)
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert second.parse().id == first.parse().id


@pytest.mark.parametrize("argument", ["organization", "project"])
def test_new_account_scope_is_a_miss_when_organization_or_project_differs(
    proxy: ProxyProcess, client: openai.OpenAI, argument: str
) -> None:
    kwargs = chat_kwargs(f"scoped by {argument}")
    unscoped = client.chat.completions.with_raw_response.create(**kwargs)
    ids: dict[str, set[str]] = {}
    outcomes: dict[str, list[str]] = {}
    for scope in ("a", "a", "b"):
        account: dict[str, Any] = {argument: f"{argument[:3]}-{scope}"}
        with openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0, **account) as scoped:
            raw = scoped.chat.completions.with_raw_response.create(**kwargs)
        outcomes.setdefault(scope, []).append(raw.headers["X-Cache"])
        ids.setdefault(scope, set()).add(raw.parse().id)
    assert unscoped.headers["X-Cache"] == "MISS"
    assert outcomes == {"a": ["MISS", "HIT"], "b": ["MISS"]}
    assert len(ids["a"]) == 1
    assert len({unscoped.parse().id, *ids["a"], *ids["b"]}) == 3


def test_no_cache_fetches_anew_and_replaces_the_entry_when_one_is_stored(
    proxy: ProxyProcess, client: openai.OpenAI
) -> None:
    kwargs = chat_kwargs("revalidate me")
    stored = client.chat.completions.with_raw_response.create(**kwargs)
    fresh = client.chat.completions.with_raw_response.create(**kwargs, extra_headers={"Cache-Control": "no-cache"})
    after = client.chat.completions.with_raw_response.create(**kwargs)
    assert [r.headers["X-Cache"] for r in (stored, fresh, after)] == ["MISS", "MISS", "HIT"]
    assert fresh.parse().id != stored.parse().id
    assert after.parse().id == fresh.parse().id


def test_no_store_leaves_no_entry_when_nothing_is_stored(proxy: ProxyProcess, client: openai.OpenAI) -> None:
    before = proxy.upstream_responses()
    kwargs = chat_kwargs("do not keep me")
    unkept = client.chat.completions.with_raw_response.create(**kwargs, extra_headers={"Cache-Control": "no-store"})
    first = client.chat.completions.with_raw_response.create(**kwargs)
    second = client.chat.completions.with_raw_response.create(**kwargs)
    assert [r.headers["X-Cache"] for r in (unkept, first, second)] == ["BYPASS", "MISS", "HIT"]
    assert unkept.parse().id != first.parse().id
    assert second.parse().id == first.parse().id
    assert proxy.upstream_responses() - before == 2


def test_rate_limit_reaches_the_client_with_retry_after_and_is_not_cached_when_upstream_says_429(
    proxy: ProxyProcess, client: openai.OpenAI
) -> None:
    before = proxy.upstream_responses("429")
    kwargs = chat_kwargs("fail:429 please")
    errors = []
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**kwargs)
        errors.append(caught.value)
    for exc in errors:
        assert exc.status_code == 429
        assert exc.code == "rate_limit_exceeded"
        assert exc.response.headers["Retry-After"] == "7"
        assert exc.response.headers["X-Cache"] == "MISS"
    assert proxy.upstream_responses("429") - before == 2


async def test_server_error_reaches_the_client_and_is_not_cached_when_upstream_says_500(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    before = proxy.upstream_responses("500")
    kwargs = chat_kwargs("fail:500 please")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            await aclient.chat.completions.create(**kwargs)
        assert caught.value.status_code == 500
        assert caught.value.response.headers["X-Cache"] == "MISS"
        assert caught.value.message.endswith("The fake upstream was told to fail.")
    assert proxy.upstream_responses("500") - before == 2


def test_broken_stream_is_not_stored_when_upstream_drops_mid_stream(proxy: ProxyProcess, client: openai.OpenAI) -> None:
    before = proxy.upstream_responses()
    kwargs = chat_kwargs("drop this stream halfway please", stream=True)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        assert raw.headers["X-Cache"] == "MISS"
        received: list[dict[str, Any]] = []
        with pytest.raises(openai.APIConnectionError):
            with raw.parse() as stream:
                for chunk in stream:
                    received.append(chunk.model_dump())
        assert received, "the first half of the stream reached the client"
        assert all(c["choices"][0]["finish_reason"] is None for c in received)
    assert proxy.upstream_responses() - before == 2


async def test_broken_stream_is_not_stored_when_async_client_sees_the_drop(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    kwargs = chat_kwargs("async drop this stream", stream=True)
    outcomes = []
    for _ in range(2):
        raw = await aclient.chat.completions.with_raw_response.create(**kwargs)
        outcomes.append(raw.headers["X-Cache"])
        with pytest.raises(openai.APIConnectionError):
            await _achunks(raw)
    assert outcomes == ["MISS", "MISS"]


def test_complete_stream_follows_when_an_earlier_client_left_mid_stream(
    proxy: ProxyProcess, client: openai.OpenAI
) -> None:
    # "slow" paces the fake's words, so the stream is still running when the client goes away.
    content = "slow " + " ".join(f"word{n}" for n in range(40))
    with client.chat.completions.create(**chat_kwargs(content, stream=True)) as stream:
        next(iter(stream))
    # The next caller either joins the flight still running or starts afresh; either way it gets all of it.
    again = client.chat.completions.with_raw_response.create(**chat_kwargs(content, stream=True))
    chunks = _chunks(again)
    assert _text(chunks) == f"echo: {content}"
    replay = client.chat.completions.with_raw_response.create(**chat_kwargs(content, stream=True))
    assert replay.headers["X-Cache"] == "HIT"
    assert _chunks(replay) == chunks


async def test_identical_concurrent_requests_share_one_upstream_call_when_in_flight(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    before = proxy.upstream_responses()
    kwargs = chat_kwargs("slow concurrent question")
    raws = await asyncio.gather(*(aclient.chat.completions.with_raw_response.create(**kwargs) for _ in range(10)))
    completions = [raw.parse() for raw in raws]
    assert len({c.id for c in completions}) == 1
    assert {c.choices[0].message.content for c in completions} == {"echo: slow concurrent question"}
    assert sorted(raw.headers["X-Cache"] for raw in raws) == ["COALESCED"] * 9 + ["MISS"]
    assert proxy.upstream_responses() - before == 1


async def test_identical_concurrent_streams_share_one_upstream_call_when_in_flight(
    proxy: ProxyProcess, aclient: openai.AsyncOpenAI
) -> None:
    before = proxy.upstream_responses()
    content = "slow concurrent stream"

    async def one() -> tuple[str, list[dict[str, Any]]]:
        raw = await aclient.chat.completions.with_raw_response.create(**_stream_kwargs(content, True))
        return raw.headers["X-Cache"], await _achunks(raw)

    results = await asyncio.gather(*(one() for _ in range(5)))
    outcomes = sorted(outcome for outcome, _ in results)
    streams = [chunks for _, chunks in results]
    assert outcomes == ["COALESCED"] * 4 + ["MISS"]
    for chunks in streams:
        _assert_same_stream(streams[0], chunks, content, include_usage=True)
    assert proxy.upstream_responses() - before == 1
