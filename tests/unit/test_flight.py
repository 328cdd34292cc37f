"""Single-flight: identical concurrent requests share one upstream call; leaving clients cancel it or not; what a
flight keeps in memory; joiners are never passed off as hits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from fakeredis import FakeAsyncRedis

from proxy.errors import InternalError
from proxy.flight import Flight, Start
from proxy.memory import TieredStore
from proxy.state import FLIGHTS, STORE
from tests.support import chat_body, received


def tiered(client: Any) -> TieredStore:
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    return store


async def test_identical_concurrent_requests_share_one_upstream_call_when_in_flight(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat_body("slow coalesce")) for _ in range(8))
    )
    bodies = [await r.json() for r in responses]
    assert len({b["id"] for b in bodies}) == 1
    assert sorted(r.headers["X-Cache"] for r in responses) == ["COALESCED"] * 7 + ["MISS"]
    assert len(received(fake_upstream)) == 1


async def test_followers_receive_stream_live_when_they_join_a_stream(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    body = chat_body("slow " * 15 + "shared stream", stream=True)
    leader = await client.post("/v1/chat/completions", json=body)
    first = await leader.content.readany()
    follower = await client.post("/v1/chat/completions", json=body)
    follower_first = await follower.content.readany()
    assert b"[DONE]" not in follower_first  # joined mid-stream and still receiving live
    rest_leader, rest_follower = await asyncio.gather(leader.read(), follower.read())
    assert first + rest_leader == follower_first + rest_follower
    assert follower.headers["X-Cache"] == "COALESCED"
    assert len(received(fake_upstream)) == 1


async def test_upstream_call_is_cancelled_and_nothing_stored_when_client_leaves(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    body = chat_body("slow " * 40 + "abandoned", stream=True)
    response = await client.post("/v1/chat/completions", json=body)
    assert await response.content.readany()
    response.close()
    for _ in range(100):
        if len(client.app[FLIGHTS]) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(client.app[FLIGHTS]) == 0
    await tiered(client).remote.drain()
    again = await client.post("/v1/chat/completions", json=body)
    assert again.headers["X-Cache"] == "MISS"
    await again.read()
    assert len(received(fake_upstream)) == 2


async def test_upstream_call_finishes_and_is_stored_when_its_client_leaves_with_finish_abandoned(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream, finish_abandoned=True)
    body = chat_body("slow " * 40 + "finished alone", stream=True)
    response = await client.post("/v1/chat/completions", json=body)
    first = await response.content.readany()
    response.close()
    for _ in range(500):
        if len(client.app[FLIGHTS]) == 0:
            break
        await asyncio.sleep(0.01)
    await tiered(client).remote.drain()
    again = await client.post("/v1/chat/completions", json=body)
    replay = await again.read()
    assert again.headers["X-Cache"] == "HIT"
    assert replay.startswith(first) and replay.endswith(b"data: [DONE]\n\n")
    assert len(received(fake_upstream)) == 1


async def test_remaining_clients_keep_the_stream_when_one_leaves(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    body = chat_body("slow " * 20 + "shared by two", stream=True)
    quitter = await client.post("/v1/chat/completions", json=body)
    stayer = await client.post("/v1/chat/completions", json=body)
    await quitter.content.readany()
    quitter.close()
    full = await stayer.read()
    assert full.endswith(b"data: [DONE]\n\n")
    await tiered(client).remote.drain()
    replay = await client.post("/v1/chat/completions", json=body)
    assert replay.headers["X-Cache"] == "HIT" and await replay.read() == full
    assert len(received(fake_upstream)) == 1


async def test_joiners_of_a_failed_call_are_coalesced_not_hits_when_upstream_errors(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat_body("slow fail:503")) for _ in range(4))
    )
    assert [r.status for r in responses] == [503] * 4
    assert sorted(r.headers["X-Cache"] for r in responses) == ["COALESCED"] * 3 + ["MISS"]
    text = await (await client.get("/metrics")).text()
    assert 'outcome="HIT"' not in text and "llm_cache_coalesced_requests_total 3.0" in text


async def test_shortest_ttl_is_stored_when_a_joiner_asks_for_less(fake_upstream: Any, proxy_for: Any) -> None:
    redis = FakeAsyncRedis()
    client = await proxy_for(fake_upstream, redis_client=redis, ttl_s=3600)
    body = chat_body("slow ttl race")
    await asyncio.gather(
        client.post("/v1/chat/completions", json=body),
        client.post("/v1/chat/completions", json=body, headers={"X-Cache-TTL": "5"}),
    )
    await tiered(client).remote.drain()
    (key,) = await redis.keys("*}")
    assert 0 < await redis.pttl(key) <= 5000


async def chunks(count: int) -> AsyncGenerator[Start | bytes, None]:
    yield Start(200, (("Content-Type", "text/event-stream"),), True)
    for i in range(count):
        yield b'data: {"n": %d}\n\n' % i
        await asyncio.sleep(0)
    yield b"data: [DONE]\n\n"


async def test_flight_keeps_only_unsent_chunks_when_nothing_will_be_stored() -> None:
    kept = []
    flight = Flight(None).fed_by(chunks(2000))

    async def watch() -> None:
        while not flight.finished:
            kept.append(flight.kept_chunks)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await flight.respond(make_mocked_request("POST", "/v1/chat/completions"), ())
    await watcher
    assert flight.complete and max(kept) < 50


async def test_flight_keeps_every_chunk_when_its_answer_may_be_stored() -> None:
    stored = []
    flight = Flight(None, ttl_s=60, on_finish=lambda recording, ttl: stored.append((recording, ttl)))
    await flight.fed_by(chunks(300)).respond(make_mocked_request("POST", "/v1/chat/completions"), ())
    await asyncio.sleep(0)
    ((recording, ttl),) = stored
    assert ttl == 60 and recording.finished and recording.body.count(b"data:") == 301


async def test_bug_in_the_background_task_answers_500_when_the_source_fails(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> AsyncGenerator[Start | bytes, None]:
        raise RuntimeError("a bug")
        yield b""

    flight = Flight("k").fed_by(broken())
    with pytest.raises(InternalError) as caught:
        await flight.respond(make_mocked_request("POST", "/v1/chat/completions"), ())
    assert caught.value.status == 500
    assert any(r.levelno == logging.ERROR and "RuntimeError: a bug" in r.exc_text for r in caplog.records if r.exc_text)
