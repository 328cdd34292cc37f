"""The proxy's own refusals, in OpenAI's error shape: client keys, body size, unknown paths and methods."""

from __future__ import annotations

from typing import Any

from tests.support import UPSTREAM_KEY, chat_body, received


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
    error = (await response.json())["error"]
    assert error["code"] == "request_too_large" and "1024 bytes" in error["message"]
    assert received(fake_upstream) == []


async def test_unknown_path_gets_openai_error_when_outside_v1(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.get("/nope")
    assert response.status == 404
    assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


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
