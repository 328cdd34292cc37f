"""An upstream failing in every way a network can: refused, reset, unknown host, silent, stalling mid-stream, cut
before ``[DONE]``. A client that got nothing gets OpenAI's error JSON with 502 or 504; one mid-stream sees the
connection end unfinished; nothing partial is ever stored."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.config import Upstream
from proxy.memory import TieredStore
from proxy.state import STORE
from tests.support import UPSTREAM_KEY, chat_body, free_port

# A behaviour gets the connection and an event set when the test is over (until then, "forever").
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event], Awaitable[None]]
ProxyFor = Callable[..., Awaitable[TestClient[Any, Any]]]

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"x-request-id: req_fault\r\n\r\n"
)
_EVENT = (
    b'data: {"id":"chatcmpl-f","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"half"},"logprobs":null,"finish_reason":null}]}\n\n'
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    await reader.readexactly(length)


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, over: asyncio.Event) -> None:
    await _read_request(reader)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    writer.transport.abort()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, over: asyncio.Event) -> None:
    await _read_request(reader)
    await over.wait()


async def stall_mid_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, over: asyncio.Event) -> None:
    await _read_request(reader)
    writer.write(_SSE_HEAD + _chunk(_EVENT) + _chunk(_EVENT))
    await writer.drain()
    await over.wait()


async def cut_before_done(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, over: asyncio.Event) -> None:
    await _read_request(reader)
    writer.write(_SSE_HEAD + _chunk(_EVENT) + _chunk(_EVENT))
    await writer.drain()
    writer.close()


@pytest.fixture
async def faulty_upstream() -> AsyncIterator[Callable[[Behaviour], Awaitable[str]]]:
    """``await faulty_upstream(behaviour)``: the base URL of a raw TCP server acting out *behaviour*."""
    servers: list[asyncio.Server] = []
    over = asyncio.Event()

    async def start(behaviour: Behaviour) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await behaviour(reader, writer, over)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    yield start
    over.set()
    for server in servers:
        server.close()
        await server.wait_closed()


async def proxy_in_front_of(proxy_for: ProxyFor, fake_upstream: Any, base_url: str) -> TestClient[Any, Any]:
    upstream = Upstream(name="default", base_url=base_url, api_key=UPSTREAM_KEY, timeout_s=0.3, connect_timeout_s=1)
    return await proxy_for(fake_upstream, upstreams=(upstream,))


async def nothing_stored(client: TestClient[Any, Any]) -> bool:
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    await store.remote.drain()
    return len(store.memory) == 0 and not await store.remote.client.keys("test:*")


@pytest.mark.parametrize(
    ("where", "status", "code"),
    [
        ("refused", 502, "upstream_unreachable"),
        ("reset", 502, "upstream_unreachable"),
        ("unknown host", 502, "upstream_unreachable"),
        ("silent", 504, "upstream_timeout"),
    ],
)
async def test_client_gets_openai_error_when_upstream_fails_before_answering(
    proxy_for: ProxyFor, fake_upstream: Any, faulty_upstream: Any, where: str, status: int, code: str
) -> None:
    base_url = {
        "refused": f"http://127.0.0.1:{free_port()}/v1",
        "unknown host": "http://upstream.invalid/v1",
    }.get(where) or await faulty_upstream({"reset": reset, "silent": silent}[where])
    client = await proxy_in_front_of(proxy_for, fake_upstream, base_url)
    for stream in (False, True):
        response = await client.post("/v1/chat/completions", json=chat_body(where, stream=stream))
        body = await response.json()
        assert response.status == status and response.content_type == "application/json"
        assert body["error"]["code"] == code and body["error"]["type"] and body["error"]["message"]
        assert UPSTREAM_KEY not in str(body)
    assert await nothing_stored(client)


@pytest.mark.parametrize("behaviour", [stall_mid_stream, cut_before_done], ids=["stall", "cut"])
async def test_stream_ends_unfinished_and_nothing_is_stored_when_upstream_breaks_mid_stream(
    proxy_for: ProxyFor, fake_upstream: Any, faulty_upstream: Any, behaviour: Behaviour
) -> None:
    client = await proxy_in_front_of(proxy_for, fake_upstream, await faulty_upstream(behaviour))
    response = await client.post("/v1/chat/completions", json=chat_body("half", stream=True))
    assert response.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            received += chunk
    assert received == _EVENT * 2  # what arrived was relayed, then the connection ended without [DONE]
    assert await nothing_stored(client)
    again = await client.post("/v1/chat/completions", json=chat_body("half", stream=True))
    assert again.headers["X-Cache"] == "MISS"
    again.close()
