"""redis_connection_kwargs and redis_client_for: which credentials and TLS options a Redis connection gets."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection

from proxy.config import RedisSettings
from proxy.kinds import MountedSecret
from proxy.redis_client import redis_client_for, redis_connection_kwargs


def from_file(password: str) -> MountedSecret:
    return MountedSecret("/run/secrets/redis-password", password)


@pytest.mark.parametrize(
    ("settings", "username", "password"),
    [
        (RedisSettings(url="redis://127.0.0.1:6379/0"), None, None),
        (RedisSettings(url="redis://url-user:url%40pass@h:6379/0"), "url-user", "url@pass"),
        (
            RedisSettings(url="redis://url-user:url-pass@h/0", password_file=from_file("file-pass")),
            "url-user",
            "file-pass",
        ),
        (
            RedisSettings(url="redis://:url-pass@h/0", password="env-pass", password_file=from_file("file-pass")),
            None,
            "env-pass",
        ),
        (RedisSettings(url="redis://url-user:url-pass@h/0", username="acl-user"), "acl-user", "url-pass"),
    ],
    ids=["none", "url-only", "file-over-url", "password-over-file", "username-over-url"],
)
def test_settings_win_over_the_url_when_both_give_credentials(
    settings: RedisSettings, username: str | None, password: str | None
) -> None:
    kwargs = redis_connection_kwargs(settings)
    assert (kwargs["username"], kwargs["password"]) == (username, password)


def test_tls_is_off_when_the_url_is_plain() -> None:
    kwargs = redis_connection_kwargs(RedisSettings(url="redis://h:6379/0", timeout_ms=300))
    assert not [name for name in kwargs if name.startswith("ssl")]
    assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"]) == (0.3, None)


def test_tls_options_follow_the_settings_when_the_url_is_rediss() -> None:
    settings = RedisSettings(
        url="rediss://h:6380/0",
        tls_ca_file="/ca.pem",
        tls_cert_file="/client.pem",
        tls_key_file="/client.key",
        tls_check_hostname=False,
    )
    kwargs = redis_connection_kwargs(settings)
    assert {name: value for name, value in kwargs.items() if name.startswith("ssl")} == {
        "ssl": True,
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/client.pem",
        "ssl_keyfile": "/client.key",
        "ssl_check_hostname": False,
    }


def test_unset_tls_files_are_left_to_redis_py_when_not_configured() -> None:
    kwargs = redis_connection_kwargs(RedisSettings(url="rediss://h:6380/0"))
    assert {name: value for name, value in kwargs.items() if name.startswith("ssl")} == {
        "ssl": True,
        "ssl_check_hostname": True,
    }


@pytest.mark.parametrize(
    ("url", "connection_class", "address"),
    [
        ("redis://h:6379/2", Connection, {"host": "h", "port": 6379, "db": 2}),
        ("rediss://h:6380/0", SSLConnection, {"host": "h", "port": 6380, "db": 0}),
        ("unix:///run/redis.sock?db=1", UnixDomainSocketConnection, {"path": "/run/redis.sock", "db": 1}),
    ],
)
async def test_pool_connects_where_the_url_says_when_built_from_settings(
    url: str, connection_class: type[Any], address: dict[str, Any]
) -> None:
    client = redis_client_for(RedisSettings(url=url, max_connections=7))
    try:
        pool = client.connection_pool
        assert pool.connection_class is connection_class and pool.max_connections == 7
        assert address.items() <= pool.connection_kwargs.items()
        assert "ssl" not in pool.connection_kwargs  # a pool takes the connection class instead
    finally:
        await client.aclose()


async def test_pool_uses_settings_over_url_query_options_when_both_are_given() -> None:
    settings = RedisSettings(
        url="rediss://:url-pass@h:6380/0?ssl_check_hostname=true&ssl_ca_certs=/url-ca.pem&protocol=2",
        password="env-pass",
        username="acl-user",
        tls_ca_file="/ca.pem",
        tls_check_hostname=False,
    )
    client = redis_client_for(settings)
    try:
        options = client.connection_pool.connection_kwargs
        assert (options["username"], options["password"]) == ("acl-user", "env-pass")
        assert (options["ssl_ca_certs"], options["ssl_check_hostname"]) == ("/ca.pem", False)
        assert options["protocol"] == 2  # other query options still apply
    finally:
        await client.aclose()


async def test_cluster_and_sentinel_clients_take_the_same_kwargs_when_given_them() -> None:
    settings = RedisSettings(url="rediss://:url-pass@h:6380/0", username="acl-user", tls_ca_file="/ca.pem")
    kwargs = redis_connection_kwargs(settings)
    cluster = RedisCluster(host="127.0.0.1", port=7001, **kwargs)  # connects only when first used
    try:
        options = cluster.connection_kwargs
        assert options["connection_class"] is SSLConnection and options["ssl_ca_certs"] == "/ca.pem"
        assert (options["username"], options["password"]) == ("acl-user", "url-pass")
    finally:
        await cluster.aclose()
    master = Sentinel([("127.0.0.1", 26379)], **kwargs).master_for("cache")
    try:
        pool = master.connection_pool
        assert pool.connection_class is SentinelManagedSSLConnection
        assert (pool.connection_kwargs["ssl_ca_certs"], pool.connection_kwargs["username"]) == ("/ca.pem", "acl-user")
    finally:
        await master.aclose()
