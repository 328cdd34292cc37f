"""create_app: routes, application state and the lifetime of the upstream sessions and the cache store."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, TextIO

import redis.asyncio as redis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from .access import observed
from .coherence import Invalidations
from .config import RedisSettings, Settings
from .fleet import Fleet
from .flight import Flights
from .generation import Generations
from .guards import Screen, authorized, enveloped, fall_back_to, get_only, screened, unrouted
from .handlers import openai_endpoint, passthrough
from .keying import Keyer, key_secret
from .kinds import ClientKey
from .logs import AccessLog, RequestIds, chosen_format
from .memory import MemoryStore, NullStore, TieredStore
from .metrics import MIN, Metrics
from .peers import Peers
from .policy import CACHEABLE_ROUTES
from .pricing import DEFAULT_PRICES
from .probes import healthz, metrics_endpoint, readyz
from .redis_client import RedisClient, close_redis, redis_client_for
from .seal import SealingCodec
from .state import (
    ACCESS_LOG,
    FLEET,
    FLIGHTS,
    INJECTED_REDIS,
    KEYER,
    METRICS,
    PEERS,
    READY,
    REQUEST_IDS,
    SETTINGS,
    SLOTS,
    STORE,
    UPSTREAMS,
)
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


def create_app(
    settings: Settings,
    *,
    redis_client: redis.Redis | None = None,
    peers_dir: str | None = None,
    log_stream: TextIO | None = None,
) -> web.Application:
    """The proxy as an aiohttp application. *redis_client* replaces the one built from ``REDIS_URL``; *peers_dir*
    is the directory where the workers of a process group share their metrics; request lines go to *log_stream*
    (default stderr)."""
    app = web.Application(client_max_size=settings.server.max_body_bytes, handler_args={"logger": http_log})
    app[SETTINGS] = settings
    app[METRICS] = Metrics((*DEFAULT_PRICES, *settings.pricing))
    stream = log_stream or sys.stderr
    app[ACCESS_LOG] = AccessLog(chosen_format(settings.log_format, stream), stream.write, stream.flush)
    app[REQUEST_IDS] = RequestIds()
    if peers_dir is not None:
        app[PEERS] = Peers(peers_dir, app[METRICS])
    app[SLOTS] = CallSlots(settings.server.max_upstream_calls)
    app[FLIGHTS] = Flights(app[SLOTS], settings.cache.max_entry_bytes, finish_abandoned=settings.cache.finish_abandoned)
    app[KEYER] = Keyer(
        settings,
        enabled=settings.cache.backend != "off",
        memo_max_bytes=KEY_MEMO_MAX_BYTES,
        secret=key_secret(settings),
    )
    app[READY] = asyncio.Event()
    if redis_client is not None:
        app[INJECTED_REDIS] = redis_client
    app.cleanup_ctx.append(_access_ctx)
    app.cleanup_ctx.append(_upstreams_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.on_shutdown.append(_stop_ready)
    screen = Screen(settings.server)
    _add_routes(app, screen, settings.auth.clients)
    if screen.origins:
        app.on_response_prepare.append(screen.add_cors_headers)
    return app


def _add_routes(app: web.Application, screen: Screen, clients: tuple[ClientKey, ...]) -> None:
    router = app.router

    def admit(handler: Handler, *, needs_key: bool = True) -> Handler:
        # Browsers and Host names first, then client keys.
        return screened(authorized(handler, clients) if needs_key and clients else handler, screen)

    def observe(handler: Handler) -> Handler:
        return observed(admit(handler), app[METRICS], app[ACCESS_LOG], app[REQUEST_IDS], has_clients=bool(clients))

    for path, handler in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics_endpoint)):
        router.add_route("*", path, enveloped(admit(get_only(handler), needs_key=False)))
    # Only POSTs to these routes consult the cache; every other /v1 request, these paths with another method
    # included, falls through to passthrough. Any other target (CONNECT's host:port too) is refused.
    router.add_post(f"/v1/{{route:{'|'.join(sorted(CACHEABLE_ROUTES))}}}", observe(openai_endpoint))
    router.add_route("*", "/v1/{rest:.+}", observe(passthrough))
    fall_back_to(router, enveloped(unrouted))


async def _access_ctx(app: web.Application) -> AsyncIterator[None]:
    access = app[ACCESS_LOG]
    access.schedule = asyncio.get_running_loop().call_soon
    peers = app.get(PEERS)
    if peers is not None:
        await peers.start()
    yield
    if peers is not None:
        await peers.aclose()
    access.schedule = None
    access.flush()


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    app[UPSTREAMS] = {upstream.name: UpstreamClient(upstream) for upstream in app[SETTINGS].upstreams}
    yield
    await asyncio.gather(*(client.close() for client in app[UPSTREAMS].values()))


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cache = settings.cache
    counters = app[METRICS]
    store: CacheStore
    client: RedisClient | None = None
    probe: asyncio.Task[None] | None = None
    invalidations: Invalidations | None = None
    generations: Generations | None = None
    memory = MemoryStore(cache.memory_max_entries, cache.memory_max_bytes, keep_s=cache.stale_if_error_s)
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
            op_timeout_s=settings.redis.timeout_ms / 1000,
            retry_after_s=settings.redis.retry_after_s,
            max_in_flight=settings.redis.max_connections,
            codec=codec,
            keep_s=cache.stale_if_error_s,
            metrics=counters,
        )
        # An injected client is a test double without server-assisted tracking: its tier is trusted as is.
        tracked = cache.invalidations and INJECTED_REDIS not in app
        tiered = TieredStore(memory, remote, coherent=not tracked)
        store = tiered
        generations = Generations(
            remote,
            app[KEYER],
            tiered,
            settings.namespaces,
            pushed=lambda: invalidations is not None and invalidations.up,
        )
        # Read before the first request, so that a replica started after a purge never keys the old generation.
        await generations.refresh()
        generations.start()
        if tracked:
            invalidations = Invalidations(
                client,
                settings.redis,
                _tracked_prefixes(settings),
                drop=partial(_invalidated, tiered, generations),
                trust=tiered.trust,
            )
            invalidations.start()
            counters.gauge(
                "llm_cache_invalidations_up",
                "1 while Redis pushes invalidations and the in-process tier is coherent across replicas.",
                lambda: 1 if invalidations.up else 0,
                MIN,
            )
        if cache.replica_single_flight:
            app[FLEET] = Fleet(remote, lease_s=cache.flight_lease_s, wait_s=cache.flight_wait_s)
        counters.gauge(
            "llm_cache_redis_up",
            "1 while Redis is in use, 0 while the proxy serves without it.",
            lambda: 1 if remote.available else 0,
            MIN,
        )
        probe = asyncio.get_running_loop().create_task(_probe_redis(remote, settings.redis))
    if cache.backend != "off":
        counters.gauge("llm_cache_memory_entries", "Entries in the in-process cache tier.", lambda: len(memory))
    counters.gauge(
        "llm_cache_flights", "Upstream calls in progress that identical requests can join.", lambda: len(app[FLIGHTS])
    )
    counters.gauge("llm_cache_asyncio_tasks", "asyncio tasks alive in this process.", lambda: len(asyncio.all_tasks()))
    app[STORE] = store
    app[READY].set()
    yield
    if probe is not None and not probe.done():
        probe.cancel()
    if invalidations is not None:
        await invalidations.aclose()
    if generations is not None:
        await generations.aclose()
    if FLEET in app:
        await app[FLEET].aclose()
    await store.aclose()
    if client is not None and INJECTED_REDIS not in app:
        await close_redis(client)


def _invalidated(tiered: TieredStore, generations: Generations, keys: list[bytes] | None) -> None:
    tiered.invalidate(keys)
    generations.heard(keys)


def _tracked_prefixes(settings: Settings) -> list[str]:
    """The key prefixes whose changes Redis must report: the namespace and every client key's own."""
    prefixes = [f"{namespace}:" for namespace in settings.namespaces]
    # Redis refuses overlapping prefixes; the shorter one covers the longer.
    return [p for p in prefixes if not any(p != q and p.startswith(q) for q in prefixes)]


async def _probe_redis(remote: RedisStore, settings: RedisSettings) -> None:
    # Tells the operator early, and spares the first requests a wait on a Redis that is not there.
    default = settings.url == RedisSettings().url
    if await remote.ping(quiet=default):
        log.info("redis reachable; shared cache in use")
    elif default:
        log.info("no redis at the default address; caching in this process until one answers")


async def _stop_ready(app: web.Application) -> None:
    app[READY].clear()
