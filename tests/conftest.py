"""Shared fixtures: the fake upstream, settings pointing at it, and proxy clients on fakeredis."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakeredis import FakeAsyncRedis

from proxy.app import create_app
from proxy.config import CacheSettings, RedisSettings, Settings, Upstream
from tests.fakes.upstream import RECEIVED, Received, create_fake_upstream
from tests.redis_server import RedisServer

UPSTREAM_KEY = "sk-upstream-secret-0123456789"

SettingsFactory = Callable[..., Settings]


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> TestServer:
    return await aiohttp_server(create_fake_upstream())


def received(server: TestServer) -> list[Received]:
    """What the fake upstream got so far (a list it appends to)."""
    return server.app[RECEIVED]


def make_settings(
    upstream_url: str, *, api_key: str | None = UPSTREAM_KEY, backend: str = "redis", **overrides: Any
) -> Settings:
    """Settings for one proxy in front of *upstream_url* (which ends in ``/v1``)."""
    cache = CacheSettings(backend=backend, namespace="test", ttl_s=60)
    settings = Settings(
        upstreams=(
            Upstream(name="default", base_url=upstream_url, api_key=api_key, timeout_s=5.0, connect_timeout_s=2.0),
        ),
        redis=RedisSettings(op_timeout_s=0.2, retry_after_s=0.5),
        cache=cache,
    )
    cache_fields = {k: overrides.pop(k) for k in list(overrides) if k in CacheSettings.__dataclass_fields__}
    redis_fields = {k: overrides.pop(k) for k in list(overrides) if k in ("op_timeout_s", "retry_after_s", "url")}
    return replace(
        settings, cache=replace(cache, **cache_fields), redis=replace(settings.redis, **redis_fields), **overrides
    )


@pytest.fixture
def settings_for() -> Callable[..., Settings]:
    def build(server: TestServer, **overrides: Any) -> Settings:
        return make_settings(str(server.make_url("/v1")), **overrides)

    return build


@pytest.fixture
def proxy_for(aiohttp_client: Any, settings_for: SettingsFactory) -> Callable[..., Any]:
    """Start a proxy in front of a fake upstream; the cache is fakeredis unless a client is given."""

    async def start(server: TestServer, *, redis_client: Any = None, **overrides: Any) -> TestClient[Any, Any]:
        app: web.Application = create_app(
            settings_for(server, **overrides), redis_client=redis_client or FakeAsyncRedis()
        )
        return await aiohttp_client(app)

    return start


def chat_body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests flush it through :func:`redis_url`."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, emptied for this test."""
    with socket.create_connection(("127.0.0.1", redis_server.port)) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        sock.recv(64)
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and restart under a running proxy."""
    with RedisServer() as server:
        yield server
