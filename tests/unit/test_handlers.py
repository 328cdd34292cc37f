"""The cacheable endpoint over real HTTP with fakeredis: hits and misses, keying, request controls, streams."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from proxy.memory import TieredStore
from proxy.state import FLEET, KEYER, STORE
from tests.support import chat_body, received


async def drain(client: Any) -> None:
    """Wait for background cache writes and publications of the proxy behind *client*."""
    if FLEET in client.app:
        await client.app[FLEET].drain()
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
    # Age the stored entry by ten seconds instead of waiting for it to age.
    keyed = client.app[KEYER].key("chat/completions", orjson.dumps(chat_body("aged")), "", {})
    assert keyed.key is not None
    store = client.app[STORE]
    entry = await store.get(keyed.key)
    assert entry is not None
    store.put(keyed.key, replace(entry, stored_at=entry.stored_at - 10))
    fresh_enough = await client.post(
        "/v1/chat/completions", json=chat_body("aged"), headers={"Cache-Control": "max-age=60"}
    )
    too_old = await client.post("/v1/chat/completions", json=chat_body("aged"), headers={"Cache-Control": "max-age=5"})
    assert [fresh_enough.headers["X-Cache"], too_old.headers["X-Cache"]] == ["HIT", "MISS"]
    assert int(fresh_enough.headers["Age"]) >= 10


async def test_hit_headers_replace_any_of_the_same_name_when_the_entry_holds_them(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream)
    miss = await client.post("/v1/chat/completions", json=chat_body("own headers"))
    keyed = client.app[KEYER].key("chat/completions", orjson.dumps(chat_body("own headers")), "", {})
    assert keyed.key is not None
    store = client.app[STORE]
    entry = await store.get(keyed.key)
    assert entry is not None
    odd = (("x-cache", "MISS"), ("AGE", "99"), ("X-Cache-Key", "other"), ("X-Cache", "STALE"))
    store.put(keyed.key, replace(entry, headers=entry.headers + odd))
    hit = await client.post("/v1/chat/completions", json=chat_body("own headers"))
    assert hit.headers.getall("X-Cache") == ["HIT"] and hit.headers.getall("Age") == ["0"]
    assert hit.headers.getall("X-Cache-Key") == [miss.headers["X-Cache-Key"]]


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


async def test_background_response_bypasses_cache_when_requested(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    body = {"model": "m", "input": "poll me later", "background": True}
    outcomes = [(await client.post("/v1/responses", json=body)).headers["X-Cache"] for _ in range(2)]
    assert outcomes == ["BYPASS", "BYPASS"]
    assert len(received(fake_upstream)) == 2


async def test_other_routes_pass_through_uncached_when_not_cacheable(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for _ in range(2):
        models = await client.get("/v1/models?limit=2")
        assert models.status == 200 and models.headers["X-Cache"] == "BYPASS"
    upload = await client.post("/v1/files", data=b"x" * 300_000, headers={"Content-Type": "application/octet-stream"})
    assert (await upload.json())["bytes"] == 300_000
    assert [r.path for r in received(fake_upstream)] == ["/v1/models", "/v1/models", "/v1/files"]
    assert received(fake_upstream)[0].query == "limit=2"


async def test_only_posts_to_cacheable_routes_consult_the_cache_when_routed(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for _ in range(2):
        for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/audio/speech"), ("POST", "/v1/files")):
            response = await client.request(method, path, json=chat_body("not cached"))
            assert response.headers["X-Cache"] == "BYPASS", (method, path)
    assert len(received(fake_upstream)) == 6
