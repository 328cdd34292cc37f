"""The OpenAI endpoint through a real aiohttp test client, with fakeredis as the cache."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fakeredis import FakeAsyncRedis

from proxy.keys import STORE
from proxy.store import TieredStore
from tests.conftest import UPSTREAM_KEY, chat_body, received


async def drain(client: Any) -> None:
    """Wait for background cache writes of the proxy behind *client*."""
    store = client.app[STORE]
    if isinstance(store, TieredStore):
        await store.remote.drain()


async def test_second_identical_request_is_a_hit_when_cache_is_warm(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    first = await client.post("/v1/chat/completions", json=chat_body())
    first_body = await first.read()
    second = await client.post("/v1/chat/completions", json=chat_body())
    assert [first.status, second.status] == [200, 200]
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert await second.read() == first_body
    assert second.headers["Content-Type"].startswith("application/json")
    assert second.headers["X-Cache-Key"] == first.headers["X-Cache-Key"]
    assert int(second.headers["Age"]) >= 0
    assert len(received(fake_upstream)) == 1


async def test_key_order_and_whitespace_share_an_entry_when_bodies_are_equal_json(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    compact = b'{"model":"m","messages":[{"role":"user","content":"order"}],"temperature":0}'
    spaced = b'{ "temperature": 0,\n  "messages": [ {"content": "order", "role": "user"} ], "model": "m" }'
    first = await client.post("/v1/chat/completions", data=compact, headers={"Content-Type": "application/json"})
    second = await client.post("/v1/chat/completions", data=spaced, headers={"Content-Type": "application/json"})
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    # The upstream sees the client's bytes untouched, not a re-encoding.
    assert received(fake_upstream)[0].body == compact


async def test_different_bodies_get_different_entries_when_any_field_differs(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    for body in (chat_body("a"), chat_body("a", temperature=1), chat_body("a", stream=False), chat_body("b")):
        response = await client.post("/v1/chat/completions", json=body)
        assert response.headers["X-Cache"] == "MISS"
    assert len(received(fake_upstream)) == 4


async def test_per_call_sdk_headers_do_not_split_the_cache_when_retrying(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    await client.post(
        "/v1/chat/completions",
        json=chat_body("retry"),
        headers={
            "x-stainless-retry-count": "0",
            "User-Agent": "OpenAI/Python 3.57.0",
            "x-stainless-read-timeout": "600",
        },
    )
    again = await client.post(
        "/v1/chat/completions",
        json=chat_body("retry"),
        headers={
            "x-stainless-retry-count": "1",
            "User-Agent": "AsyncOpenAI/Python 3.57.0",
            "Idempotency-Key": "abc",
            "x-stainless-read-timeout": "20",
        },
    )
    assert again.headers["X-Cache"] == "HIT"


async def test_organization_and_project_split_the_cache_when_they_differ(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    outcomes = []
    for headers in (
        {},
        {"OpenAI-Organization": "org-a"},
        {"OpenAI-Organization": "org-b"},
        {"OpenAI-Project": "proj-a"},
        {"OpenAI-Organization": "org-a"},
    ):
        response = await client.post("/v1/chat/completions", json=chat_body("org"), headers=headers)
        outcomes.append(response.headers["X-Cache"])
    assert outcomes == ["MISS", "MISS", "MISS", "MISS", "HIT"]


async def test_upstream_key_replaces_client_key_when_configured(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    await client.post("/v1/chat/completions", json=chat_body("key"), headers={"Authorization": "Bearer sk-client"})
    second = await client.post(
        "/v1/chat/completions", json=chat_body("key"), headers={"Authorization": "Bearer sk-other-client"}
    )
    assert received(fake_upstream)[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    # One upstream account: every client shares its answers.
    assert second.headers["X-Cache"] == "HIT"


async def test_client_keys_partition_the_cache_when_no_upstream_key(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, api_key=None)
    outcomes = []
    for key in ("sk-a", "sk-b", "sk-a"):
        response = await client.post(
            "/v1/chat/completions", json=chat_body("own key"), headers={"Authorization": f"Bearer {key}"}
        )
        outcomes.append(response.headers["X-Cache"])
    assert outcomes == ["MISS", "MISS", "HIT"]
    assert [r.headers["Authorization"] for r in received(fake_upstream)] == ["Bearer sk-a", "Bearer sk-b"]


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


async def test_no_cache_skips_lookup_and_replaces_entry_when_requested(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    first = await (await client.post("/v1/chat/completions", json=chat_body("fresh"))).json()
    fresh = await client.post("/v1/chat/completions", json=chat_body("fresh"), headers={"Cache-Control": "no-cache"})
    fresh_body = await fresh.json()
    then = await client.post("/v1/chat/completions", json=chat_body("fresh"))
    assert fresh.headers["X-Cache"] == "MISS"
    assert fresh_body["id"] != first["id"]
    assert then.headers["X-Cache"] == "HIT"
    assert (await then.json())["id"] == fresh_body["id"]


async def test_no_store_keeps_nothing_when_requested(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    first = await client.post("/v1/chat/completions", json=chat_body("private"), headers={"Cache-Control": "no-store"})
    second = await client.post("/v1/chat/completions", json=chat_body("private"))
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["BYPASS", "MISS"]
    assert len(received(fake_upstream)) == 2


async def test_max_age_refuses_older_entries_when_requested(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    await client.post("/v1/chat/completions", json=chat_body("aged"))
    await asyncio.sleep(1.1)
    fresh_enough = await client.post(
        "/v1/chat/completions", json=chat_body("aged"), headers={"Cache-Control": "max-age=60"}
    )
    too_old = await client.post("/v1/chat/completions", json=chat_body("aged"), headers={"Cache-Control": "max-age=0"})
    assert [fresh_enough.headers["X-Cache"], too_old.headers["X-Cache"]] == ["HIT", "MISS"]


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


async def test_invalid_json_passes_through_untouched_when_body_is_not_json(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for _ in range(2):
        response = await client.post(
            "/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert response.status == 400
        assert response.headers["X-Cache"] == "BYPASS"
        assert "error" in await response.json()
    assert [r.body for r in received(fake_upstream)] == [b"{not json", b"{not json"]


async def test_stream_is_replayed_identically_when_hit(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    body = chat_body("stream me please", stream=True, stream_options={"include_usage": True})
    first = await client.post("/v1/chat/completions", json=body)
    first_bytes = await first.read()
    second = await client.post("/v1/chat/completions", json=body)
    second_bytes = await second.read()
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert second.headers["Content-Type"].startswith("text/event-stream")
    assert second_bytes == first_bytes
    assert first_bytes.endswith(b"data: [DONE]\n\n")
    assert len(received(fake_upstream)) == 1


async def test_stream_reaches_client_before_it_ends_when_upstream_is_slow(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.post("/v1/chat/completions", json=chat_body("slow " * 20, stream=True))
    first_chunk = await response.content.readany()
    # The upstream paces its words; a buffering proxy would deliver everything at once, [DONE] included.
    assert first_chunk and b"[DONE]" not in first_chunk
    assert (await response.read()).endswith(b"data: [DONE]\n\n")


async def test_broken_stream_is_not_stored_when_upstream_drops(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    body = chat_body("please drop this stream half way", stream=True)
    first = await client.post("/v1/chat/completions", json=body)
    try:
        partial = await first.read()
    except Exception:  # a truncated chunked body surfaces as a payload error in aiohttp
        partial = b""
    assert b"[DONE]" not in partial
    await drain(client)
    again = await client.post("/v1/chat/completions", json=body)
    assert again.headers["X-Cache"] == "MISS"
    assert len(received(fake_upstream)) == 2


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


async def test_responses_stream_is_cached_when_it_completes(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    body = {"model": "gpt-4o-mini", "input": "responses api", "stream": True}
    first = await client.post("/v1/responses", json=body)
    first_bytes = await first.read()
    second = await client.post("/v1/responses", json=body)
    assert second.headers["X-Cache"] == "HIT"
    assert await second.read() == first_bytes


async def test_embeddings_keep_encoding_format_apart_when_it_differs(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    outcomes = []
    for fmt in ("base64", "float", "base64"):
        response = await client.post(
            "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x", "encoding_format": fmt}
        )
        outcomes.append(response.headers["X-Cache"])
    assert outcomes == ["MISS", "MISS", "HIT"]


async def test_other_routes_pass_through_uncached_when_not_cacheable(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for _ in range(2):
        models = await client.get("/v1/models?limit=2")
        assert models.status == 200 and models.headers["X-Cache"] == "BYPASS"
    upload = await client.post("/v1/files", data=b"x" * 300_000, headers={"Content-Type": "application/octet-stream"})
    assert (await upload.json())["bytes"] == 300_000
    assert [r.path for r in received(fake_upstream)] == ["/v1/models", "/v1/models", "/v1/files"]
    assert received(fake_upstream)[0].query == "limit=2"


async def test_proxy_keys_reject_unknown_clients_when_configured(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, proxy_api_keys=frozenset({"client-key-1"}))
    denied = await client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"})
    missing = await client.get("/v1/models")
    allowed = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer client-key-1"}
    )
    assert [denied.status, missing.status, allowed.status] == [401, 401, 200]
    error = (await denied.json())["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert len(received(fake_upstream)) == 1
    assert received(fake_upstream)[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_oversized_body_gets_openai_error_when_over_limit(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, max_body_bytes=1024)
    response = await client.post("/v1/chat/completions", json=chat_body("x" * 2000))
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "request_too_large"
    assert received(fake_upstream) == []


async def test_unknown_path_gets_openai_error_when_outside_v1(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.get("/nope")
    assert response.status == 404
    assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


async def test_unreachable_upstream_gets_502_when_nothing_listens(
    aiohttp_client: Any, settings_for: Any, fake_upstream: Any
) -> None:
    from proxy.app import create_app
    from proxy.config import Upstream
    from tests.redis_server import free_port

    settings = settings_for(fake_upstream)
    dead = Upstream(name="default", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=UPSTREAM_KEY)
    client = await aiohttp_client(
        create_app(settings.__class__(upstreams=(dead,), cache=settings.cache), redis_client=FakeAsyncRedis())
    )
    response = await client.post("/v1/chat/completions", json=chat_body())
    body = await response.json()
    assert response.status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    assert UPSTREAM_KEY not in orjson.dumps(body).decode()


async def test_silent_upstream_gets_504_when_timeout_passes(
    fake_upstream: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    from dataclasses import replace

    from proxy.app import create_app

    settings = settings_for(fake_upstream)
    settings = replace(settings, upstreams=(replace(settings.upstreams[0], timeout_s=0.3),))
    client = await aiohttp_client(create_app(settings, redis_client=FakeAsyncRedis()))
    response = await client.post("/v1/chat/completions", json=chat_body("hang"))
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "upstream_timeout"


async def test_models_route_to_matching_upstream_when_several_are_configured(
    aiohttp_server: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    from dataclasses import replace

    from proxy.app import create_app
    from proxy.config import Upstream
    from tests.fakes.upstream import create_fake_upstream

    main, local = await aiohttp_server(create_fake_upstream()), await aiohttp_server(create_fake_upstream())
    settings = settings_for(main)
    settings = replace(
        settings,
        upstreams=(
            settings.upstreams[0],
            Upstream(name="local", base_url=str(local.make_url("/v1")), models=("llama-*", "qwen*")),
        ),
    )
    client = await aiohttp_client(create_app(settings, redis_client=FakeAsyncRedis()))
    await client.post("/v1/chat/completions", json={**chat_body(), "model": "llama-3-8b"})
    await client.post("/v1/chat/completions", json=chat_body())
    assert [r.json()["model"] for r in received(local)] == ["llama-3-8b"]
    assert [r.json()["model"] for r in received(main)] == ["gpt-4o-mini"]
    assert "Authorization" not in received(local)[0].headers


async def test_metrics_count_outcomes_without_secrets_when_scraped(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for _ in range(3):
        await client.post("/v1/chat/completions", json=chat_body("metrics"))
    await client.get("/v1/models")
    text = await (await client.get("/metrics")).text()
    assert 'llm_cache_requests_total{outcome="HIT",route="chat/completions"} 2.0' in text
    assert 'llm_cache_requests_total{outcome="MISS",route="chat/completions"} 1.0' in text
    assert 'llm_cache_requests_total{outcome="BYPASS",route="models"} 1.0' in text
    assert 'llm_cache_tokens_saved_total{kind="completion"} 10.0' in text
    assert UPSTREAM_KEY not in text


async def test_health_endpoints_answer_when_running(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    health = await client.get("/healthz")
    ready = await client.get("/readyz")
    assert (health.status, await health.json()) == (200, {"status": "ok"})
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_compressed_upstream_answer_is_relayed_decoded_when_upstream_gzips(
    aiohttp_server: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    from aiohttp import web

    from proxy.app import create_app

    async def gzipped(request: web.Request) -> web.Response:
        response = web.json_response({"id": "chatcmpl-gz", "object": "chat.completion", "choices": []})
        response.enable_compression(web.ContentCoding.gzip)
        return response

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", gzipped)
    upstream = await aiohttp_server(upstream_app)
    client = await aiohttp_client(create_app(settings_for(upstream), redis_client=FakeAsyncRedis()))
    for outcome in ("MISS", "HIT"):
        response = await client.post(
            "/v1/chat/completions", json=chat_body("gzip"), headers={"Accept-Encoding": "identity"}
        )
        assert response.headers["X-Cache"] == outcome
        assert "Content-Encoding" not in response.headers
        assert (await response.json())["id"] == "chatcmpl-gz"


async def test_memory_backend_caches_without_redis_when_configured(
    fake_upstream: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    from proxy.app import create_app
    from proxy.store import MemoryStore

    client = await aiohttp_client(create_app(settings_for(fake_upstream, backend="memory")))
    outcomes = [(await client.post("/v1/chat/completions", json=chat_body("mem"))).headers["X-Cache"] for _ in range(2)]
    assert outcomes == ["MISS", "HIT"]
    assert isinstance(client.app[STORE], MemoryStore)
    assert (await (await client.get("/readyz")).json())["cache"] == "ok"


async def test_off_backend_always_calls_upstream_when_configured(
    fake_upstream: Any, aiohttp_client: Any, settings_for: Any
) -> None:
    from proxy.app import create_app

    client = await aiohttp_client(create_app(settings_for(fake_upstream, backend="off")))
    outcomes = [(await client.post("/v1/chat/completions", json=chat_body("off"))).headers["X-Cache"] for _ in range(2)]
    assert outcomes == ["MISS", "MISS"]
    assert len(received(fake_upstream)) == 2


async def test_escaped_path_reaches_upstream_unchanged_when_client_encodes_it(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.get("/v1/files/file%3Fabc?purpose=x%26y")
    assert response.status == 200
    sent = received(fake_upstream)[0]
    assert sent.path == "/v1/files/file?abc" and sent.query == "purpose=x%26y"
    assert (await response.json())["path"] == "/v1/files/file?abc"


async def test_dot_segments_are_refused_when_they_would_leave_v1(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.get("/v1/models/%2E%2E/%2E%2E/admin")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "unknown_url"
    assert received(fake_upstream) == []


async def test_wrong_method_on_health_gets_openai_error_when_posted(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.post("/healthz")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"
