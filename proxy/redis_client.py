"""redis-py's asyncio clients for each Redis deployment, built from the settings: a standalone server, Redis Cluster,
or a master found through Sentinel. Every mode connects with the same credentials and TLS options."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .config import RedisSettings

RedisClient = redis.Redis | RedisCluster


def redis_connection_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """Credentials, TLS and the connect deadline as keyword arguments that every redis-py asyncio client takes
    (``Redis``, ``RedisCluster``, ``Sentinel``), so that each topology connects the same way.

    Of the URL, only its scheme, user and password count here, and the settings win over the last two:
    ``username`` over the URL's user; ``password``, then ``password_file``, over its password. ``rediss://``
    turns TLS on; the ``tls_*`` settings then win over ``ssl_*`` options in the URL's query, and an unset file
    leaves redis-py's default (the system's CAs, no client certificate).
    """
    url = urlsplit(settings.url)
    from_file = settings.password_file.value if settings.password_file else None
    kwargs: dict[str, Any] = {
        "username": settings.username or _unquoted(url.username),
        "password": settings.password or from_file or _unquoted(url.password),
        "socket_connect_timeout": settings.timeout_ms / 1000,
        "socket_timeout": None,
    }
    if url.scheme == "rediss":
        tls = {
            "ssl_ca_certs": settings.tls_ca_file,
            "ssl_certfile": settings.tls_cert_file,
            "ssl_keyfile": settings.tls_key_file,
        }
        kwargs |= {"ssl": True, "ssl_check_hostname": settings.tls_check_hostname}
        kwargs |= {name: path for name, path in tls.items() if path}
    return kwargs


def _unquoted(part: str | None) -> str | None:
    return unquote(part) if part else None


def redis_client_for(settings: RedisSettings) -> RedisClient:
    """A pooled client for *settings* in its ``mode``, connecting with :func:`redis_connection_kwargs`.

    Only connecting has a socket deadline here; each whole operation gets its deadline from the store, since
    redis-py implements a socket timeout with ``asyncio.wait_for`` around every write, a task per command. A
    command is retried once at once, on a fresh connection: after a Redis restart every pooled one is stale;
    redis-py's default would retry three times with backoff, inside the deadline.
    """
    if settings.mode == "cluster":
        return _cluster(settings)
    if settings.mode == "sentinel":
        return _sentinel(settings)
    return standalone_client(settings, max_connections=settings.max_connections, retry=Retry(NoBackoff(), 1))


def standalone_client(settings: RedisSettings, **overrides: Any) -> redis.Redis:
    """A client of the server *settings*' URL names, with :func:`redis_connection_kwargs` and *overrides*.

    Not ``from_url``: it lets the URL's user and password win over keyword arguments, where the settings must.
    """
    # The URL gives the address, the database and any other query options; parse_url also picks the connection
    # class from the scheme, which is what a pool takes where a client takes ssl=True.
    options: dict[str, Any] = {**parse_url(settings.url), **redis_connection_kwargs(settings), **overrides}
    options.pop("ssl", None)
    return redis.Redis.from_pool(redis.ConnectionPool(**options))  # owns the pool: aclose() closes it


def _cluster(settings: RedisSettings) -> RedisCluster:
    url = urlsplit(settings.url)
    nodes = [ClusterNode(url.hostname or "127.0.0.1", url.port or 6379)]
    nodes += [ClusterNode(*_host_port(address)) for address in settings.cluster_nodes]
    # MOVED and ASK are followed, and the slot map refreshed, by the client itself.
    return RedisCluster(
        startup_nodes=nodes,
        max_connections=settings.max_connections,
        retry=Retry(NoBackoff(), 1),
        require_full_coverage=False,
        **redis_connection_kwargs(settings),
    )


def _sentinel(settings: RedisSettings) -> redis.Redis:
    kwargs = redis_connection_kwargs(settings)
    # Sentinels speak TLS when the data nodes do; they have a password of their own, or none.
    tls = {name: value for name, value in kwargs.items() if name.startswith("ssl")}
    sentinel_kwargs = {
        "socket_connect_timeout": settings.timeout_ms / 1000,
        "password": settings.sentinel_password,
        **tls,
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [_host_port(address) for address in settings.sentinels], sentinel_kwargs=sentinel_kwargs, **kwargs
    )
    database = int(urlsplit(settings.url).path.lstrip("/") or 0)
    client: redis.Redis = sentinel.master_for(
        settings.sentinel_master, max_connections=settings.max_connections, retry=Retry(NoBackoff(), 1), db=database
    )
    return client


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def close_redis(client: RedisClient) -> None:
    """Close *client*'s connections, the Sentinel connections behind a Sentinel-managed client included."""
    pool = client.connection_pool if isinstance(client, redis.Redis) else None
    await client.aclose()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()
