"""Single-flight: identical concurrent requests share one upstream call; leaving clients cancel it or not."""

from __future__ import annotations

import asyncio
from typing import Any

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
    assert sorted(r.headers["X-Cache"] for r in responses) == ["HIT"] * 7 + ["MISS"]
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
    assert follower.headers["X-Cache"] == "HIT"
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
