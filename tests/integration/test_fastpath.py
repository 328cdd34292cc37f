"""The fast path over real sockets: which requests it answers itself, when it hands the connection to the
application, and how it treats slow, idle and pipelining clients."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.fastpath import BODY_GRACE_S, MAX_BUFFER_BYTES, FastConnection, FastSite
from proxy.memory import TieredStore
from proxy.serving import runner_for
from proxy.state import METRICS, STORE
from tests.support import chat_body, free_port, received

pytestmark = pytest.mark.integration

Started = tuple[FastSite, web.AppRunner]


def _post(content: str, *fields: str, version: str = "1.1") -> bytes:
    body = orjson.dumps(chat_body(content))
    head = [f"POST /v1/chat/completions HTTP/{version}", "Host: localhost", *fields, f"Content-Length: {len(body)}"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readuntil(b"\r\n")
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


@pytest.fixture
async def start(fake_upstream: Any, settings_for: Any) -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> Started:
        settings = settings_for(fake_upstream, port=free_port(), **{"backend": "memory", **overrides})
        runner = runner_for(create_app(settings, log_stream=io.StringIO()), settings)
        await runner.setup()
        runners.append(runner)
        site = FastSite(runner, "127.0.0.1", settings.server.port)
        await site.start()
        return site, runner

    yield start
    for runner in runners:
        await runner.cleanup()


async def _connect(site: FastSite) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", site.port)


async def _warm(site: FastSite, content: str) -> bytes:
    """Store the answer to *content* (a miss hands its connection over, so it has one of its own)."""
    reader, writer = await _connect(site)
    writer.write(_post(content))
    _, _, body = await _read_answer(reader)
    writer.close()
    return body


def _fast(site: FastSite) -> set[FastConnection]:
    assert site._front is not None
    return site._front.connections


async def test_hits_are_answered_on_the_fast_path_and_a_miss_by_the_application_when_mixed(
    start: Callable[..., Awaitable[Started]], fake_upstream: Any
) -> None:
    site, runner = await start()
    reader, writer = await _connect(site)
    writer.write(_post("warm"))
    assert (await _read_answer(reader))[1]["x-cache"] == "MISS"
    writer.close()
    reader, writer = await _connect(site)
    writer.write(_post("warm"))
    status, headers, _ = await _read_answer(reader)
    assert (status, headers["x-cache"]) == (200, "HIT")
    assert len(_fast(site)) == 1
    # Pipelined: a hit, a miss, a hit; answered in order, the miss by the application, which then gives the
    # connection back.
    writer.write(_post("warm") + _post("cold") + _post("warm"))
    outcomes = [(await _read_answer(reader))[1]["x-cache"] for _ in range(3)]
    assert outcomes == ["HIT", "MISS", "HIT"]
    assert len(_fast(site)) == 1
    assert len(received(fake_upstream)) == 2
    writer.close()
    metrics = runner.app[METRICS]
    assert sum(sum(c[:-1]) for labels, c in metrics.requests.series.items() if labels[-1] == "HIT") == 3


async def test_body_arriving_after_its_head_is_answered_on_the_fast_path_when_within_the_grace(
    start: Callable[..., Awaitable[Started]],
) -> None:
    site, _ = await start()
    await _warm(site, "split")
    reader, writer = await _connect(site)
    request = _post("split")
    writer.write(request[:-5])
    await asyncio.sleep(BODY_GRACE_S / 5)
    writer.write(request[-5:])
    assert (await _read_answer(reader))[1]["x-cache"] == "HIT"
    assert len(_fast(site)) == 1
    writer.write(request[:-5])
    await asyncio.sleep(BODY_GRACE_S * 2)
    assert len(_fast(site)) == 0
    writer.write(request[-5:])
    assert (await _read_answer(reader))[1]["x-cache"] == "HIT"
    writer.close()


async def test_connection_is_closed_when_idle_past_the_client_timeout(
    start: Callable[..., Awaitable[Started]],
) -> None:
    site, _ = await start(client_timeout_s=0.3)
    await _warm(site, "idle")
    reader, writer = await _connect(site)
    writer.write(_post("idle"))
    await _read_answer(reader)
    assert len(_fast(site)) == 1
    writer.write(b"POST /v1/chat/com")
    assert await asyncio.wait_for(reader.read(), 2) == b""
    assert len(_fast(site)) == 0
    writer.close()


async def test_reading_pauses_while_the_client_reads_nothing_and_every_answer_arrives_after(
    start: Callable[..., Awaitable[Started]],
) -> None:
    site, _ = await start()
    body = await _warm(site, "slow reader")
    reader, writer = await _connect(site)
    count = 20_000
    request = _post("slow reader")

    async def send() -> None:
        for _ in range(count):
            writer.write(request)
            await writer.drain()

    sending = asyncio.ensure_future(send())
    (connection,) = _fast(site)
    for _ in range(1000):
        if not connection.reading:
            break
        await asyncio.sleep(0.01)
    assert not connection.reading
    # What the server holds is bounded: the rest waits in the sockets' buffers.
    assert connection.buffered_bytes <= MAX_BUFFER_BYTES + 256 * 1024
    answers = [await _read_answer(reader) for _ in range(count)]
    await sending
    assert all(headers["x-cache"] == "HIT" and answer == body for _, headers, answer in answers)
    assert len(_fast(site)) == 1
    writer.close()


async def test_hit_found_in_redis_is_answered_on_the_fast_path_when_the_memory_tier_is_cold(
    start: Callable[..., Awaitable[Started]], redis_url: str
) -> None:
    site, runner = await start(backend="redis", url=redis_url)
    store = runner.app[STORE]
    assert isinstance(store, TieredStore)
    reader, writer = await _connect(site)
    writer.write(_post("redis"))
    await _read_answer(reader)
    await store.remote.drain()
    store.memory.clear()
    writer.close()
    reader, writer = await _connect(site)
    writer.write(_post("redis") + _post("redis"))
    assert [(await _read_answer(reader))[1]["x-cache"] for _ in range(2)] == ["HIT", "HIT"]
    assert len(_fast(site)) == 1
    writer.close()


async def test_idle_connections_close_and_a_lookup_in_progress_finishes_when_the_server_stops(
    start: Callable[..., Awaitable[Started]],
) -> None:
    site, runner = await start()
    await _warm(site, "stop")
    reader, writer = await _connect(site)
    writer.write(_post("stop"))
    await _read_answer(reader)
    assert len(_fast(site)) == 1
    await runner.cleanup()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_pipelined_misses_past_the_buffer_bound_are_all_answered_when_the_client_reads_late(
    start: Callable[..., Awaitable[Started]], fake_upstream: Any
) -> None:
    site, _ = await start()
    reader, writer = await _connect(site)
    count = 60
    writer.write(b"".join(_post(f"{i} " + "x" * 100_000) for i in range(count)))
    await asyncio.sleep(0.3)
    async with asyncio.timeout(20):
        answers = [await _read_answer(reader) for _ in range(count)]
    assert [headers["x-cache"] for _, headers, _ in answers] == ["MISS"] * count
    assert len(received(fake_upstream)) == count
    assert len(_fast(site)) == 1
    writer.close()


async def test_miss_costs_one_redis_read_when_the_fast_path_lends_it_to_the_application(
    start: Callable[..., Awaitable[Started]], redis_url: str
) -> None:
    site, runner = await start(backend="redis", url=redis_url, replica_single_flight=False)
    reads = runner.app[METRICS].redis_durations.series
    reader, writer = await _connect(site)
    before = sum(reads.get(("read",), [0.0])[:-1])
    writer.write(_post("one read"))
    assert (await _read_answer(reader))[1]["x-cache"] == "MISS"
    assert sum(reads[("read",)][:-1]) - before == 1
    assert len(_fast(site)) == 1
    writer.close()


async def test_application_answers_when_the_fast_path_fails_unexpectedly(
    start: Callable[..., Awaitable[Started]], monkeypatch: pytest.MonkeyPatch
) -> None:
    site, _ = await start()
    await _warm(site, "bug")
    assert site._front is not None

    def broken(raw: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(site._front, "admission", broken)
    reader, writer = await _connect(site)
    writer.write(_post("bug"))
    status, headers, _ = await _read_answer(reader)
    assert (status, headers["x-cache"]) == (200, "HIT")
    assert len(_fast(site)) == 0
    writer.close()


async def test_request_is_not_lent_when_its_client_left_during_the_lookup(
    start: Callable[..., Awaitable[Started]], monkeypatch: pytest.MonkeyPatch
) -> None:
    site, _ = await start()
    assert site._front is not None
    front = site._front
    started: list[object] = []
    monkeypatch.setattr(front, "handover", lambda: started.append(1))

    class Closing(asyncio.Transport):
        def is_closing(self) -> bool:
            return True

    connection = FastConnection(front)
    connection.connection_made(Closing())
    connection.data_received(_post("left"))
    await asyncio.sleep(0.05)
    assert started == []
    connection.connection_lost(None)
