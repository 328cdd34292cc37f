"""Upstream calls: key injection, header filtering both ways, errors, compression, timeouts and routing."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web
from fakeredis import FakeAsyncRedis
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import create_app
from proxy.config import Upstream
from proxy.upstream import forward_headers, relay_headers
from tests.fakes.upstream import create_fake_upstream
from tests.support import UPSTREAM_KEY, chat_body, free_port, received


def test_forwarded_headers_carry_the_upstream_key_in_its_header_when_configured() -> None:
    headers = {"Authorization": "Bearer sk-client", "api-key": "client", "X-Kept": "1", "Host": "proxy"}
    azure = Upstream(name="azure", base_url="http://a/v1", api_key="az-key", auth_header="api-key")
    openai = Upstream(name="openai", base_url="http://o/v1", api_key="sk-up")
    assert dict(forward_headers(headers, azure)) == {"X-Kept": "1", "api-key": "az-key"}
    assert dict(forward_headers(headers, openai)) == {"X-Kept": "1", "Authorization": "Bearer sk-up"}


def test_relayed_headers_drop_framing_and_connection_named_fields_when_upstream_sends_them() -> None:
    upstream_headers = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", "10"),
                ("Content-Encoding", "gzip"),
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("x-request-id", "req_1"),
            ]
        )
    )
    assert relay_headers(upstream_headers) == [("Content-Type", "application/json"), ("x-request-id", "req_1")]


async def test_upstream_key_replaces_client_key_when_configured(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    await client.post("/v1/chat/completions", json=chat_body("key"), headers={"Authorization": "Bearer sk-client"})
    second = await client.post(
        "/v1/chat/completions", json=chat_body("key"), headers={"Authorization": "Bearer sk-other-client"}
    )
    assert received(fake_upstream)[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    # One upstream account: every client shares its answers.
    assert second.headers["X-Cache"] == "HIT"


async def test_hop_by_hop_headers_are_not_forwarded_when_client_sends_them(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    await client.post(
        "/v1/chat/completions",
        json=chat_body("hop"),
        headers={"Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "5", "X-Custom": "kept"},
    )
    sent = received(fake_upstream)[0].headers
    assert "X-Private" not in sent and "Keep-Alive" not in sent
    assert sent["X-Custom"] == "kept"


async def test_upstream_errors_pass_through_uncached_when_upstream_fails(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for _ in range(2):
        response = await client.post("/v1/chat/completions", json=chat_body("fail:429"))
        assert response.status == 429
        assert response.headers["Retry-After"] == "7"
        assert (await response.json())["error"]["code"] == "rate_limit_exceeded"
        assert response.headers["X-Cache"] == "MISS"
    server_error = await client.post("/v1/chat/completions", json=chat_body("fail:500"))
    assert server_error.status == 500
    assert len(received(fake_upstream)) == 3


async def test_compressed_upstream_answer_is_relayed_decoded_when_upstream_gzips(
    aiohttp_server: Any, proxy_for: Any
) -> None:
    async def gzipped(request: web.Request) -> web.Response:
        response = web.json_response({"id": "chatcmpl-gz", "object": "chat.completion", "choices": []})
        response.enable_compression(web.ContentCoding.gzip)
        return response

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", gzipped)
    client = await proxy_for(await aiohttp_server(upstream_app))
    for outcome in ("MISS", "HIT"):
        response = await client.post(
            "/v1/chat/completions", json=chat_body("gzip"), headers={"Accept-Encoding": "identity"}
        )
        assert response.headers["X-Cache"] == outcome
        assert "Content-Encoding" not in response.headers
        assert (await response.json())["id"] == "chatcmpl-gz"


async def test_unreachable_upstream_gets_502_when_nothing_listens(fake_upstream: Any, proxy_for: Any) -> None:
    dead = Upstream(name="default", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=UPSTREAM_KEY)
    client = await proxy_for(fake_upstream, upstreams=(dead,))
    response = await client.post("/v1/chat/completions", json=chat_body())
    body = await response.json()
    assert response.status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    assert UPSTREAM_KEY not in orjson.dumps(body).decode()


async def test_silent_upstream_gets_504_when_timeout_passes(
    fake_upstream: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    settings = settings_for(fake_upstream)
    settings = replace(settings, upstreams=(replace(settings.upstreams[0], timeout_s=0.3),))
    client = await aiohttp_client(create_app(settings, redis_client=FakeAsyncRedis()))
    response = await client.post("/v1/chat/completions", json=chat_body("hang"))
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "upstream_timeout"


async def test_models_route_to_matching_upstream_when_several_are_configured(
    aiohttp_server: Any, proxy_for: Any, settings_for: Any
) -> None:
    main, local = await aiohttp_server(create_fake_upstream()), await aiohttp_server(create_fake_upstream())
    llama = Upstream(name="local", base_url=str(local.make_url("/v1")), models=("llama-*", "qwen*"))
    client = await proxy_for(main, upstreams=(settings_for(main).upstreams[0], llama))
    await client.post("/v1/chat/completions", json={**chat_body(), "model": "llama-3-8b"})
    await client.post("/v1/chat/completions", json=chat_body())
    assert [r.json()["model"] for r in received(local)] == ["llama-3-8b"]
    assert [r.json()["model"] for r in received(main)] == ["gpt-4o-mini"]
    assert "Authorization" not in received(local)[0].headers


async def test_escaped_path_reaches_upstream_unchanged_when_client_encodes_it(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.get("/v1/files/file%3Fabc?purpose=x%26y")
    assert response.status == 200
    sent = received(fake_upstream)[0]
    assert sent.path == "/v1/files/file?abc" and sent.query == "purpose=x%26y"
    assert (await response.json())["path"] == "/v1/files/file?abc"


async def test_per_user_and_hop_by_hop_response_headers_are_never_stored_when_upstream_sends_them(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    miss = await client.post("/v1/chat/completions", json=chat_body("cookie jar"))
    hit = await client.post("/v1/chat/completions", json=chat_body("cookie jar"))
    assert miss.headers["X-Cache"] == "MISS" and "session=per-user" in miss.headers["Set-Cookie"]
    assert hit.headers["X-Cache"] == "HIT" and "Set-Cookie" not in hit.headers
    for response in (miss, hit):
        assert "X-Hop" not in response.headers and "Keep-Alive" not in response.headers


async def test_hop_by_hop_request_headers_are_dropped_when_rfc_9110_names_them(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    hop = {
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Proxy-Connection": "keep-alive",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "websocket",
        "Connection": "X-Named",
        "X-Named": "1",
    }
    await client.get("/v1/models", headers=hop)
    sent = received(fake_upstream)[0].headers
    assert not {name.lower() for name in hop} & {name.lower() for name in sent}
