"""Fixtures: the fake upstream, settings pointing at it, proxies on fakeredis, and real redis-server processes
(standalone, Cluster and Sentinel)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TextIO

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakeredis import FakeAsyncRedis

from proxy.app import create_app
from proxy.config import Settings
from tests.fakes.upstream import create_fake_upstream
from tests.redis_topologies import RedisCluster, RedisSentinel
from tests.support import RedisServer, make_settings

SettingsFactory = Callable[..., Settings]


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> TestServer:
    return await aiohttp_server(create_fake_upstream())


@pytest.fixture
def settings_for() -> SettingsFactory:
    """``settings_for(server, **overrides)``: :func:`tests.support.make_settings` in front of a test server."""

    def build(server: TestServer, **overrides: Any) -> Settings:
        return make_settings(str(server.make_url("/v1")), **overrides)

    return build


@pytest.fixture
def proxy_for(aiohttp_client: Any, settings_for: SettingsFactory) -> Callable[..., Any]:
    """Start a proxy in front of a fake upstream; the cache is fakeredis unless a client is given; request log
    lines go to *log_stream* (default stderr)."""

    async def start(
        server: TestServer, *, redis_client: Any = None, log_stream: TextIO | None = None, **overrides: Any
    ) -> TestClient[Any, Any]:
        app: web.Application = create_app(
            settings_for(server, **overrides), redis_client=redis_client or FakeAsyncRedis(), log_stream=log_stream
        )
        return await aiohttp_client(app)

    return start


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests flush it through :func:`redis_url`."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, emptied for this test."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and restart under a running proxy."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster (3 masters, a replica each) shared by one test module: its tests leave the nodes running
    and may :meth:`~tests.redis_topologies.RedisCluster.flush` it."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def own_redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of this test's own, to kill, fail over and restart nodes of."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A master, a replica and three Sentinels shared by one test module: its tests leave the nodes running and may
    :meth:`~tests.redis_topologies.RedisSentinel.flush` it."""
    with RedisSentinel() as deployment:
        yield deployment


@pytest.fixture
def own_redis_sentinel() -> Iterator[RedisSentinel]:
    """A Sentinel deployment of this test's own, to fail over and restart the master of."""
    with RedisSentinel() as deployment:
        yield deployment
