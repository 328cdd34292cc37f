"""Single-flight across replicas on a shared fake Redis: one upstream call, followers relayed live, holders that
vanish, errors not shared with later requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import pytest
from fakeredis import FakeAsyncRedis, FakeServer

from proxy.fleet import Claim, lease_key, stream_key
from proxy.flight import Start
from proxy.state import FLEET, KEYER, STORE
from tests.support import chat_body, received


async def replicas(proxy_for: Any, fake_upstream: Any, count: int = 2, **overrides: Any) -> list[Any]:
    """*count* proxies sharing one fake Redis server."""
    server = FakeServer()
    return [
        await proxy_for(fake_upstream, redis_client=FakeAsyncRedis(server=server), **overrides) for _ in range(count)
    ]


async def drain(*clients: Any) -> None:
    for client in clients:
        await client.app[FLEET].drain()
        await client.app[STORE].remote.drain()


async def test_identical_requests_on_two_replicas_make_one_upstream_call_when_concurrent(
    fake_upstream: Any, proxy_for: Any
) -> None:
    one, two = await replicas(proxy_for, fake_upstream)
    body = chat_body("slow across replicas")
    responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for client in (one, two, two)))
    bodies = [await r.read() for r in responses]
    assert len(received(fake_upstream)) == 1
    assert len(set(bodies)) == 1
    assert sorted(r.headers["X-Cache"] for r in responses) == ["COALESCED", "COALESCED", "MISS"]
    await drain(one, two)
    assert (await two.post("/v1/chat/completions", json=body)).headers["X-Cache"] == "HIT"


async def test_one_call_without_waiting_out_the_lease_when_a_local_follower_reads_its_claim_first(
    fake_upstream: Any, proxy_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (one,) = await replicas(proxy_for, fake_upstream, count=1, flight_lease_s=3.0, flight_wait_s=3.0)
    fleet = one.app[FLEET]
    claim = fleet.claim
    leading, followed = asyncio.Event(), asyncio.Event()

    async def answered_out_of_order(key: str) -> tuple[Claim, str]:
        # The first request's claim is granted first in Redis, but its answer is read after the second's: as
        # when the two claims travel in different pipelines.
        if not leading.is_set():
            result = await claim(key)
            leading.set()
            await followed.wait()
            for _ in range(5):
                await asyncio.sleep(0)  # the second request starts following meanwhile
            return result
        result = await claim(key)
        followed.set()
        return result

    monkeypatch.setattr(fleet, "claim", answered_out_of_order)
    body = chat_body("claims answered out of order")
    started = time.monotonic()
    first = asyncio.ensure_future(one.post("/v1/chat/completions", json=body))
    await leading.wait()
    second = await one.post("/v1/chat/completions", json=body)
    responses = [await first, second]
    bodies = [await r.read() for r in responses]
    assert time.monotonic() - started < 1.5  # the lease (3 s) did not have to run out
    assert [r.status for r in responses] == [200, 200] and len(set(bodies)) == 1
    assert len(received(fake_upstream)) == 1
    assert sorted(r.headers["X-Cache"] for r in responses) == ["COALESCED", "MISS"]


async def test_follower_receives_a_stream_live_when_another_replica_calls(fake_upstream: Any, proxy_for: Any) -> None:
    one, two = await replicas(proxy_for, fake_upstream)
    body = chat_body("slow " * 15 + "streamed across replicas", stream=True)
    leader = await one.post("/v1/chat/completions", json=body)
    first = await leader.content.readany()
    follower = await two.post("/v1/chat/completions", json=body)
    follower_first = await follower.content.readany()
    assert b"[DONE]" not in first + follower_first  # both still receiving while the upstream writes
    rest_leader, rest_follower = await asyncio.gather(leader.read(), follower.read())
    assert first + rest_leader == follower_first + rest_follower
    assert (first + rest_leader).endswith(b"data: [DONE]\n\n")
    assert follower.headers["X-Cache"] == "COALESCED"
    assert len(received(fake_upstream)) == 1


async def test_follower_calls_the_upstream_itself_when_the_holder_vanished(fake_upstream: Any, proxy_for: Any) -> None:
    one, two = await replicas(proxy_for, fake_upstream, flight_lease_s=0.3)
    keyed = one.app[KEYER].key("chat/completions", b'{"model":"m","messages":[]}', "", {})
    # A lease left by a replica that died before publishing anything.
    await one.app[STORE].remote.client.set(lease_key(keyed.key), "dead-replica", px=300)
    response = await two.post("/v1/chat/completions", data=b'{"model":"m","messages":[]}')
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"
    assert len(received(fake_upstream)) == 1


async def test_an_error_is_not_shared_with_later_requests_when_the_call_ended(
    fake_upstream: Any, proxy_for: Any
) -> None:
    one, two = await replicas(proxy_for, fake_upstream)
    body = chat_body("fail:429")
    first = await one.post("/v1/chat/completions", json=body)
    second = await two.post("/v1/chat/completions", json=body)
    assert [first.status, second.status] == [429, 429]
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "MISS"]
    assert len(received(fake_upstream)) == 2


async def test_replicas_call_alone_when_coordination_is_off(fake_upstream: Any, proxy_for: Any) -> None:
    one, two = await replicas(proxy_for, fake_upstream, replica_single_flight=False)
    body = chat_body("slow uncoordinated")
    await asyncio.gather(one.post("/v1/chat/completions", json=body), two.post("/v1/chat/completions", json=body))
    assert len(received(fake_upstream)) == 2 and FLEET not in one.app


async def test_a_retry_calls_afresh_on_another_replica_when_the_stream_it_retries_broke_off(
    fake_upstream: Any, proxy_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = await replicas(proxy_for, fake_upstream)
    fleet = one.app[FLEET]
    append = fleet._append

    async def slow_append(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.05)  # a Redis a little slower than the retry
        await append(*args, **kwargs)

    monkeypatch.setattr(fleet, "_append", slow_append)
    body = chat_body("a stream that will drop off", stream=True)
    broken = await one.post("/v1/chat/completions", json=body)
    with pytest.raises(aiohttp.ClientPayloadError):
        await broken.read()
    # Sent the moment the first client saw the cut: the holder has told the fleet by then.
    retry = await two.post("/v1/chat/completions", json=body)
    assert retry.headers["X-Cache"] == "MISS"
    with pytest.raises(aiohttp.ClientPayloadError):
        await retry.read()
    assert len(received(fake_upstream)) == 2


async def test_follower_calls_the_upstream_itself_when_the_holder_broke_off_before_it_read(
    fake_upstream: Any, proxy_for: Any
) -> None:
    (one,) = await replicas(proxy_for, fake_upstream, count=1)
    key = "ns:broken-before-read"
    client = one.app[STORE].remote.client
    # What a holder whose upstream broke off mid-stream leaves, read by a follower that claimed before the end.
    for event in (b'S{"status":200,"headers":[],"stream":true}', b"Cdata: {}\n\n", b"Ebroken"):
        await client.xadd(stream_key(key), {"e": event})

    async def own_call() -> AsyncGenerator[Start | bytes, None]:
        yield Start(200, (), True)
        yield b"data: [DONE]\n\n"

    items = [item async for item in one.app[FLEET].follow(key, own_call)]
    assert items == [Start(200, (), True), b"data: [DONE]\n\n"]


async def test_a_release_that_fails_is_not_reported_later_as_an_unretrieved_error_when_redis_is_down(
    fake_upstream: Any, proxy_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeServer()
    one = await proxy_for(fake_upstream, redis_client=FakeAsyncRedis(server=server))
    store = one.app[STORE].remote
    sent: list[asyncio.Future[Any]] = []
    send = store.send
    monkeypatch.setattr(store, "send", lambda commands: sent.append(send(commands)) or sent[-1])
    server.connected = False
    one.app[FLEET]._abandon("ns:v2:chat/completions:{digest}", "token")  # a call given up while Redis is away
    await store.drain()
    # asyncio reports a failed future as "exception was never retrieved" when it is collected, at any later
    # moment, unless someone retrieved it; this flag says whether it would. Read it before anything here does.
    unretrieved = [future for future in sent if future._log_traceback]
    assert sent and all(future.exception() is not None for future in sent)
    assert unretrieved == []
