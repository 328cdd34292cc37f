"""Limits: body size (chunked too), slow clients, upstream calls in flight, and hostile JSON bodies."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import orjson

from tests.support import chat_body, raw_request, received


async def test_chunked_body_over_the_limit_gets_413_when_nothing_is_forwarded(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream, max_body_bytes=4096)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1024

    for path in ("/v1/chat/completions", "/v1/files"):
        response = await client.post(path, data=chunks())
        assert response.status == 413, path
        assert (await response.json())["error"]["code"] == "request_too_large"
    declared = await client.post("/v1/files", data=b"y" * 5000)
    assert declared.status == 413
    assert received(fake_upstream) == []


async def test_slow_client_gets_408_when_its_body_does_not_arrive_in_time(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, client_timeout_s=0.3)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head + b"Content-Length: 100\r\n\r\n{")  # then nothing: a slow-drip client
    async with asyncio.timeout(5):
        status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"408"
    assert received(fake_upstream) == []


async def test_upstream_calls_beyond_the_cap_get_503_with_retry_after_when_busy(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream, max_upstream_calls=2)
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat_body(f"slow call {i}")) for i in range(4))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 503, 503]
    refused = next(r for r in responses if r.status == 503)
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"]["code"] == "proxy_overloaded"
    # Identical requests join the call in flight and take no slot of their own.
    joined = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat_body("slow same")) for _ in range(5)))
    assert [r.status for r in joined] == [200] * 5


async def test_deeply_nested_json_is_forwarded_uncached_when_parsers_give_up(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    nested = b'{"model":"m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for _ in range(2):
        response = await client.post("/v1/chat/completions", data=nested, headers={"Content-Type": "application/json"})
        assert response.headers["X-Cache"] == "BYPASS" and response.status == 400  # the fake cannot parse it either
    assert (await client.get("/healthz")).status == 200


async def test_enormous_json_is_cached_when_it_parses(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    raw = orjson.dumps({"model": "text-embedding-3-small", "input": ["word " * 200] * 4000})  # about 4 MB
    outcomes = []
    for _ in range(2):
        response = await client.post(
            "/v1/embeddings", data=io.BytesIO(raw), headers={"Content-Type": "application/json"}
        )
        outcomes.append(response.headers["X-Cache"])
    assert outcomes == ["MISS", "HIT"]


async def test_ambiguous_body_is_forwarded_but_never_cached_when_a_key_repeats(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    clean = orjson.dumps(chat_body("which model?"))
    twice = clean[:-1] + b',"model":"gpt-4o"}'
    outcomes = []
    for raw in (twice, twice, clean):
        response = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
        outcomes.append(response.headers["X-Cache"])
    # The duplicate could not plant its answer under the clean request's key.
    assert outcomes == ["BYPASS", "BYPASS", "MISS"]
    assert len(received(fake_upstream)) == 3


async def test_header_flood_is_refused_when_a_line_is_too_long(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    status, _ = await raw_request(
        client.server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000
    )
    assert status in (400, 431)
    assert received(fake_upstream) == [] and (await client.get("/healthz")).status == 200
