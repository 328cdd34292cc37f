"""Stale-if-error: an answer kept past its TTL is served, marked STALE, only when the upstream fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import Upstream
from proxy.state import METRICS
from tests.fakes.upstream import HANG, OUTAGE
from tests.support import UPSTREAM_KEY, chat_body, received

CHAT = ("default", "chat/completions", "gpt-4o-mini")

ProxyFor = Callable[..., Any]


async def ask(client: TestClient[Any, Any], prompt: str, **headers: str) -> tuple[int, str, dict[str, Any]]:
    response = await client.post("/v1/chat/completions", json=chat_body(prompt), headers=headers)
    return response.status, response.headers.get("X-Cache", ""), await response.json()


def upstream_of(server: TestServer, timeout_s: float = 5.0) -> Upstream:
    return Upstream(name="default", base_url=str(server.make_url("/v1")), api_key=UPSTREAM_KEY, timeout_s=timeout_s)


async def stored_then_expired(client: TestClient[Any, Any], prompt: str) -> dict[str, Any]:
    """Store an answer for *prompt* with a one-second TTL and let it expire."""
    status, label, body = await ask(client, prompt, **{"X-Cache-TTL": "1"})
    assert (status, label) == (200, "MISS")
    await asyncio.sleep(1.05)
    return body


@pytest.mark.parametrize("outage", [500, 502, 503, 429])
async def test_expired_answer_is_served_stale_when_upstream_answers_an_error(
    proxy_for: ProxyFor, fake_upstream: TestServer, outage: int
) -> None:
    client = await proxy_for(fake_upstream, stale_if_error_s=60)
    stored = await stored_then_expired(client, "kept")
    fake_upstream.app[OUTAGE].status = outage
    response = await client.post("/v1/chat/completions", json=chat_body("kept"))
    assert response.status == 200 and response.headers["X-Cache"] == "STALE"
    assert int(response.headers["Age"]) >= 1
    assert await response.json() == stored
    requests = client.app[METRICS].snapshot()["llm_cache_requests"]
    assert [*CHAT, "STALE", 1] in requests and [*CHAT, "MISS", 1] in requests


async def test_expired_answer_is_served_stale_when_upstream_is_unreachable(
    proxy_for: ProxyFor, fake_upstream: TestServer
) -> None:
    client = await proxy_for(fake_upstream, stale_if_error_s=60)
    stored = await stored_then_expired(client, "kept")
    await fake_upstream.close()  # its port now refuses connections
    status, label, body = await ask(client, "kept")
    assert (status, label, body) == (200, "STALE", stored)


async def test_expired_answer_is_served_stale_when_upstream_times_out(
    proxy_for: ProxyFor, fake_upstream: TestServer
) -> None:
    client = await proxy_for(fake_upstream, stale_if_error_s=60, upstreams=(upstream_of(fake_upstream, 0.3),))
    stored = await stored_then_expired(client, "kept")
    fake_upstream.app[OUTAGE].status = HANG
    assert await ask(client, "kept") == (200, "STALE", stored)


async def test_expired_answer_is_never_served_when_upstream_answers(
    proxy_for: ProxyFor, fake_upstream: TestServer
) -> None:
    client = await proxy_for(fake_upstream, stale_if_error_s=60)
    stored = await stored_then_expired(client, "kept")
    status, label, fresh = await ask(client, "kept")
    assert (status, label) == (200, "MISS") and fresh["id"] != stored["id"]
    assert len(received(fake_upstream)) == 2


async def test_client_errors_pass_through_when_an_answer_is_kept(
    proxy_for: ProxyFor, fake_upstream: TestServer
) -> None:
    client = await proxy_for(fake_upstream, stale_if_error_s=60)
    await stored_then_expired(client, "kept")
    fake_upstream.app[OUTAGE].status = 400
    status, label, body = await ask(client, "kept")
    assert (status, label) == (400, "MISS") and "error" in body


async def test_upstream_error_passes_through_when_stale_if_error_is_off(
    proxy_for: ProxyFor, fake_upstream: TestServer
) -> None:
    client = await proxy_for(fake_upstream)
    await stored_then_expired(client, "kept")
    fake_upstream.app[OUTAGE].status = 503
    status, label, body = await ask(client, "kept")
    assert (status, label) == (503, "MISS") and body["error"]["type"] == "server_error"


async def test_request_gets_stale_answer_when_it_asks_with_stale_if_error(
    proxy_for: ProxyFor, fake_upstream: TestServer
) -> None:
    client = await proxy_for(fake_upstream)  # the proxy's own setting is off
    assert (await ask(client, "fresh but too old for the request"))[1] == "MISS"
    stored = (await ask(client, "fresh but too old for the request"))[2]
    fake_upstream.app[OUTAGE].status = 503
    strict = {"Cache-Control": "max-age=0"}
    assert (await ask(client, "fresh but too old for the request", **strict))[0] == 503
    lenient = {"Cache-Control": "max-age=0, stale-if-error=600"}
    assert await ask(client, "fresh but too old for the request", **lenient) == (200, "STALE", stored)


async def test_stale_answer_is_refused_when_older_than_the_request_accepts(
    proxy_for: ProxyFor, fake_upstream: TestServer
) -> None:
    client = await proxy_for(fake_upstream, stale_if_error_s=60)
    await stored_then_expired(client, "kept")
    fake_upstream.app[OUTAGE].status = 503
    status, label, _ = await ask(client, "kept", **{"Cache-Control": "stale-if-error=0"})
    assert (status, label) == (503, "MISS")
