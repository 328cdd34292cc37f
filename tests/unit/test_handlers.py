"""The OpenAI endpoint through a real aiohttp test client, with fakeredis as the cache."""

from __future__ import annotations

from typing import Any

from tests.conftest import chat_body, received


async def test_second_identical_request_is_a_hit_when_cache_is_warm(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    first = await client.post("/v1/chat/completions", json=chat_body())
    first_body = await first.read()
    second = await client.post("/v1/chat/completions", json=chat_body())
    assert [first.status, second.status] == [200, 200]
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert await second.read() == first_body
    assert len(received(fake_upstream)) == 1
