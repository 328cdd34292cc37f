"""The proxy's own refusals, in OpenAI's error shape and before anything is forwarded: client keys, body size,
paths that could leave /v1, foreign Host names and origins, absolute-form targets, CONNECT."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.support import UPSTREAM_KEY, chat_body, raw_request, received


async def test_proxy_keys_reject_unknown_clients_when_configured(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, proxy_api_keys=("client-key-1",))
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


def port_of(client: Any) -> int:
    port: int = client.server.port
    return port


def error_code(body: bytes) -> str:
    code: str = orjson.loads(body)["error"]["code"]
    return code


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/..\\admin",
        b"/v1/..%5cadmin",
        b"/v1/%5c..%5cadmin",
        b"/v1/models/%2e%2e/%2e%2e/admin",
        b"/v1/models/..;/admin",
        b"/v1//admin",
        b"/v1/models/%252e%252e/admin",
        b"/v1/models/%c0%ae%c0%ae/admin",
        b"/v1/models/%zz",
        b"/v1/models/%00",
        b"/v1/models/%0d%0aX-Injected:%201",
    ],
)
async def test_paths_that_could_leave_v1_are_refused_when_any_server_could_normalise_them(
    fake_upstream: Any, proxy_for: Any, target: bytes
) -> None:
    client = await proxy_for(fake_upstream)
    status, body = await raw_request(port_of(client), b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1")
    assert status in (400, 404)
    assert error_code(body) in ("invalid_request", "unknown_url")
    assert received(fake_upstream) == []


async def test_ordinary_escaped_paths_pass_when_they_stay_under_v1(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    for target in (b"/v1/files/file-abc%3Fx", b"/v1/files/caf%C3%A9", b"/v1/models/"):
        status, _ = await raw_request(port_of(client), b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1")
        assert status == 200, target
    assert len(received(fake_upstream)) == 3


@pytest.mark.parametrize("host", [b"rebind.evil.example", b"rebind.evil.example:8080", b"127.0.0.1.evil.example"])
async def test_foreign_host_names_are_refused_when_bound_to_loopback(
    fake_upstream: Any, proxy_for: Any, host: bytes
) -> None:
    client = await proxy_for(fake_upstream)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json"
    status, body = await raw_request(port_of(client), request + b"\r\nContent-Length: 2", b"{}")
    assert status == 403 and error_code(body) == "forbidden"
    assert received(fake_upstream) == []


@pytest.mark.parametrize("host", ["localhost", "localhost:1234", "127.0.0.1", "[::1]:8080", "10.1.2.3", "LOCALHOST."])
async def test_local_names_and_addresses_are_served_when_bound_to_loopback(
    fake_upstream: Any, proxy_for: Any, host: str
) -> None:
    client = await proxy_for(fake_upstream)
    response = await client.get("/v1/models", headers={"Host": host})
    assert response.status == 200


async def test_listed_host_names_are_served_when_configured(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, allowed_hosts=("proxy.internal",))
    allowed = await client.get("/v1/models", headers={"Host": "proxy.internal:8080"})
    refused = await client.get("/v1/models", headers={"Host": "other.internal"})
    assert (allowed.status, refused.status) == (200, 403)


async def test_any_host_is_served_when_bound_to_all_addresses_without_a_list(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream, host="0.0.0.0")
    assert (await client.get("/v1/models", headers={"Host": "llm-cache-proxy:8080"})).status == 200


async def test_cross_site_requests_are_refused_when_origin_is_not_listed(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    # A form-like POST: text/plain needs no CORS preflight, so only the proxy can stop it.
    simple = await client.post(
        "/v1/chat/completions",
        data=orjson.dumps(chat_body("csrf")),
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    navigation = await client.get("/v1/models", headers={"Sec-Fetch-Site": "cross-site"})
    null_origin = await client.get("/v1/models", headers={"Origin": "null"})
    assert [simple.status, navigation.status, null_origin.status] == [403, 403, 403]
    assert (await simple.json())["error"]["code"] == "forbidden"
    assert received(fake_upstream) == []


async def test_listed_origin_gets_cors_answers_when_configured(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, allowed_origins=("https://app.example.com",))
    origin = {"Origin": "https://app.example.com"}
    preflight = await client.options(
        "/v1/chat/completions",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type"
    assert received(fake_upstream) == []  # a preflight is answered, never forwarded
    for outcome in ("MISS", "HIT"):
        response = await client.post("/v1/chat/completions", json=chat_body("cors"), headers=origin)
        assert response.headers["X-Cache"] == outcome
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "X-Cache" in response.headers["Access-Control-Expose-Headers"]
    other = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert other.status == 403 and "Access-Control-Allow-Origin" not in other.headers


async def test_absolute_form_for_another_host_is_refused_when_received(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    port = port_of(client)
    status, body = await raw_request(port, b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: 127.0.0.1")
    assert status == 421 and error_code(body) == "misdirected_request"
    own = b"GET http://127.0.0.1:%d/v1/models HTTP/1.1\r\nHost: 127.0.0.1" % port
    assert (await raw_request(port, own))[0] == 200
    assert [r.path for r in received(fake_upstream)] == ["/v1/models"]


async def test_connect_is_refused_when_asked_to_tunnel(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream)
    status, body = await raw_request(port_of(client), b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443")
    assert status == 405 and error_code(body) == "method_not_allowed"
    assert received(fake_upstream) == []
