"""create_app: routes, application state and the lifetime of the upstream sessions and the cache store."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .config import RedisSettings, Settings
from .flight import Flights
from .guards import Screen, authorized, envelope, get_only, screened
from .handlers import healthz, metrics_endpoint, openai_endpoint, passthrough, readyz
from .keying import Keyer, key_secret
from .kinds import ClientKey
from .memory import MemoryStore, NullStore, TieredStore
from .metrics import Metrics
from .policy import CACHEABLE_ROUTES
from .seal import SealingCodec
from .state import FLIGHTS, INJECTED_REDIS, KEYER, METRICS, READY, SETTINGS, SLOTS, STORE, UPSTREAMS
from .store import CacheStore, RedisStore
from .upstream import CallSlots, UpstreamClient

log = logging.getLogger(__name__)


class _ClientErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger. A request the HTTP parser refuses is the client's mistake: one line without a
    traceback, and no text from the request beyond the parser's reason. A client that left is no error at all.
    Anything else keeps its traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(error, HttpProcessingError):
            self.info("malformed request refused status=%s reason=%r", error.code, error.message.splitlines()[0])
            return
        if isinstance(error, ConnectionResetError):
            self.debug("client left before its answer error=%r", error)
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)


http_log = _ClientErrorLog(logging.getLogger("proxy.http"))

# Raw request bodies remembered for keying; small next to the in-process entry tier.
KEY_MEMO_MAX_BYTES = 512 * 1024


def create_app(settings: Settings, *, redis_client: redis.Redis | None = None) -> web.Application:
    """The proxy as an aiohttp application. *redis_client* replaces the one built from ``REDIS_URL``."""
    app = web.Application(
        client_max_size=settings.server.max_body_bytes, handler_args={"logger": http_log}, middlewares=[envelope]
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[SLOTS] = CallSlots(settings.server.max_upstream_calls)
    app[FLIGHTS] = Flights(app[SLOTS], settings.cache.max_entry_bytes)
    app[KEYER] = Keyer(
        settings,
        enabled=settings.cache.backend != "off",
        memo_max_bytes=KEY_MEMO_MAX_BYTES,
        secret=key_secret(settings),
    )
    app[READY] = asyncio.Event()
    if redis_client is not None:
        app[INJECTED_REDIS] = redis_client
    app.cleanup_ctx.append(_upstreams_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.on_shutdown.append(_stop_ready)
    screen = Screen(settings.server)
    _add_routes(app.router, screen, settings.auth.clients)
    if screen.origins:
        app.on_response_prepare.append(screen.add_cors_headers)
    return app


def _add_routes(router: web.UrlDispatcher, screen: Screen, clients: tuple[ClientKey, ...]) -> None:
    def admit(handler: Handler, *, needs_key: bool = True) -> Handler:
        # Browsers and Host names first, then client keys.
        return screened(authorized(handler, clients) if needs_key and clients else handler, screen)

    for path, handler in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics_endpoint)):
        router.add_route("*", path, admit(get_only(handler), needs_key=False))
    # Only POSTs to these routes consult the cache; every other /v1 request, these paths with another method
    # included, falls through to passthrough. Other targets get the envelope's 404.
    router.add_post(f"/v1/{{route:{'|'.join(sorted(CACHEABLE_ROUTES))}}}", admit(openai_endpoint))
    router.add_route("*", "/v1/{rest:.+}", admit(passthrough))


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
        "socket_connect_timeout": settings.op_timeout_s,
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


def redis_client_for(settings: RedisSettings) -> redis.Redis:
    """A pooled client for *settings*, connecting with :func:`redis_connection_kwargs`.

    Only connecting has a socket deadline here; each whole operation gets its deadline from
    :class:`RedisStore`, since redis-py implements a socket timeout with ``asyncio.wait_for`` around every
    write, a task per command. Retrying a stale connection is :meth:`RedisStore._execute`'s job, so the client
    itself never retries: redis-py's default would retry three times with backoff, inside the deadline.
    """
    # The URL gives the address, the database and any other query options; parse_url also picks the connection
    # class from the scheme, which is what a pool takes where a client takes ssl=True.
    options: dict[str, Any] = {**parse_url(settings.url), **redis_connection_kwargs(settings)}
    options.pop("ssl", None)
    # RedisStore admits at most max_connections operations at once, so this pool never runs dry; the plain
    # pool hands out connections more cheaply than the blocking one.
    options |= {"max_connections": settings.max_connections, "retry": Retry(NoBackoff(), 0)}
    return redis.Redis.from_pool(redis.ConnectionPool(**options))  # owns the pool: aclose() closes it


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    app[UPSTREAMS] = {upstream.name: UpstreamClient(upstream) for upstream in app[SETTINGS].upstreams}
    yield
    await asyncio.gather(*(client.close() for client in app[UPSTREAMS].values()))


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cache = settings.cache
    counters = app[METRICS]
    store: CacheStore
    client: redis.Redis | None = None
    probe: asyncio.Task[None] | None = None
    memory = MemoryStore(cache.memory_max_entries, cache.memory_max_bytes)
    if cache.backend == "off":
        store = NullStore()
    elif cache.backend == "memory":
        store = memory
    else:
        client = app.get(INJECTED_REDIS) or redis_client_for(settings.redis)
        codec = SealingCodec(cache.encryption_key, cache.encryption_old_keys) if cache.encryption_key else None
        if codec is not None:
            log.info(
                "redis entries encrypted key_id=%s old_keys=%d", codec.key_id.hex(), len(cache.encryption_old_keys)
            )
        remote = RedisStore(
            client,
            op_timeout_s=settings.redis.op_timeout_s,
            retry_after_s=settings.redis.retry_after_s,
            max_in_flight=settings.redis.max_connections,
            codec=codec,
        )
        store = TieredStore(memory, remote)
        counters.gauge(
            "llm_cache_redis_errors", "Redis operations that failed (read as a miss).", lambda: remote.errors
        )
        counters.gauge(
            "llm_cache_redis_available",
            "1 while Redis is in use, 0 while the proxy serves without it.",
            lambda: 1 if remote.available else 0,
        )
        probe = asyncio.get_running_loop().create_task(_probe_redis(remote, settings.redis))
    if cache.backend != "off":
        counters.gauge("llm_cache_memory_entries", "Entries in the in-process cache tier.", lambda: len(memory))
    app[STORE] = store
    app[READY].set()
    yield
    if probe is not None and not probe.done():
        probe.cancel()
    await store.aclose()
    if client is not None and INJECTED_REDIS not in app:
        await client.aclose()


async def _probe_redis(remote: RedisStore, settings: RedisSettings) -> None:
    # Tells the operator early, and spares the first requests a wait on a Redis that is not there.
    default = settings.url == RedisSettings().url
    if await remote.ping(quiet=default):
        log.info("redis reachable; shared cache in use")
    elif default:
        log.info("no redis at the default address; caching in this process until one answers")


async def _stop_ready(app: web.Application) -> None:
    app[READY].clear()
