"""create_app: routes, application state and the lifetime of the upstream session and the cache store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import redis.asyncio as redis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .cache_key import Memo
from .config import DEFAULT_REDIS_URL, Settings
from .handlers import healthz, metrics, openai_endpoint, readyz
from .keys import FLIGHTS, INJECTED_REDIS, KEY_MEMO, METRICS, READY, SESSION, SETTINGS, STORE
from .metrics import Metrics
from .middlewares import get_only, guarded, not_found
from .relay import Flights
from .store import CacheStore, MemoryStore, NullStore, RedisStore, TieredStore
from .upstream import create_session

log = logging.getLogger(__name__)

# Raw request bodies remembered for keying; small next to the in-process entry tier.
KEY_MEMO_MAX_BYTES = 512 * 1024


def create_app(settings: Settings, *, redis_client: redis.Redis | None = None) -> web.Application:
    """The proxy as an aiohttp application. *redis_client* replaces the one built from ``REDIS_URL``."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[FLIGHTS] = Flights()
    app[KEY_MEMO] = Memo(KEY_MEMO_MAX_BYTES)
    app[READY] = asyncio.Event()
    if redis_client is not None:
        app[INJECTED_REDIS] = redis_client
    app.cleanup_ctx.append(_session_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.on_shutdown.append(_stop_ready)
    for path, handler in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)):
        app.router.add_route("*", path, guarded(get_only(handler)))
    app.router.add_route("*", "/v1/{rest:.+}", guarded(openai_endpoint))
    app.router.add_route("*", "/{tail:.*}", guarded(not_found))
    return app


def redis_client_for(settings: Settings) -> redis.Redis:
    """A pooled client for ``settings.redis``.

    Only connecting has a socket deadline here; each whole operation gets its deadline from
    :class:`RedisStore`. redis-py implements a socket timeout with ``asyncio.wait_for`` around every write,
    a task per command, which made up a tenth of a cache miss's CPU time. Retrying a stale connection is
    :meth:`RedisStore._execute`'s job, so the client itself never retries: redis-py's default would retry
    three times with backoff, inside the operation's deadline.
    """
    cfg = settings.redis
    # RedisStore admits at most max_connections operations at once, so this pool never runs dry; the plain
    # pool hands out connections several times cheaper than the blocking one.
    pool = redis.ConnectionPool.from_url(
        cfg.url,
        max_connections=cfg.max_connections,
        socket_connect_timeout=cfg.op_timeout_s,
        socket_timeout=None,
        retry=Retry(NoBackoff(), 0),
    )
    if cfg.password:
        # from_url lets a password in the URL win over keyword arguments; REDIS_PASSWORD must win instead.
        pool.connection_kwargs["password"] = cfg.password
    return redis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = create_session()
    yield
    await app[SESSION].close()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cache = settings.cache
    store: CacheStore
    client: redis.Redis | None = None
    metrics = app[METRICS]
    if cache.backend == "off":
        store = NullStore()
    elif cache.backend == "memory":
        memory = MemoryStore(cache.memory_max_entries, cache.memory_max_bytes)
        metrics.gauge("llm_cache_memory_entries", "Entries in the in-process cache tier.", lambda: len(memory))
        store = memory
    else:
        client = app.get(INJECTED_REDIS) or redis_client_for(settings)
        remote = RedisStore(
            client,
            op_timeout_s=settings.redis.op_timeout_s,
            retry_after_s=settings.redis.retry_after_s,
            max_in_flight=settings.redis.max_connections,
        )
        tiered = TieredStore(MemoryStore(cache.memory_max_entries, cache.memory_max_bytes), remote)
        metrics.gauge("llm_cache_memory_entries", "Entries in the in-process cache tier.", lambda: len(tiered.memory))
        metrics.gauge("llm_cache_redis_errors", "Redis operations that failed (read as a miss).", lambda: remote.errors)
        metrics.gauge(
            "llm_cache_redis_available",
            "1 while Redis is in use, 0 while the proxy serves without it.",
            lambda: 1 if remote.available else 0,
        )
        store = tiered
        probe = asyncio.get_running_loop().create_task(_probe_redis(remote, settings.redis.url))
    app[STORE] = store
    app[READY].set()
    yield
    if client is not None and not probe.done():
        probe.cancel()
    await store.aclose()
    if client is not None and INJECTED_REDIS not in app:
        await client.aclose()


async def _probe_redis(remote: RedisStore, url: str) -> None:
    # Tells the operator early, and spares the first requests a wait on a Redis that is not there.
    default = url == DEFAULT_REDIS_URL
    if await remote.ping(quiet=default):
        log.info("redis reachable; shared cache in use")
    elif default:
        log.info("no redis at the default address; caching in this process until one answers")


async def _stop_ready(app: web.Application) -> None:
    app[READY].clear()
