"""Flights: a client leaving mid-stream cancels the upstream call and stores nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.keys import FLIGHTS, STORE
from tests.conftest import chat_body, received


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
    await client.app[STORE].remote.drain()
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
    await client.app[STORE].remote.drain()
    replay = await client.post("/v1/chat/completions", json=body)
    assert replay.headers["X-Cache"] == "HIT" and await replay.read() == full
    assert len(received(fake_upstream)) == 1
