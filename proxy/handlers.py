"""HTTP handlers: the OpenAI endpoint (cache, single-flight, relay), passthrough, health and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from .cache_key import Keyed, build_key, build_scope, short_key
from .config import Settings, Upstream
from .entry import CacheEntry
from .errors import InvalidApiKey, MethodNotAllowed, NotFound, ProxyError, UpstreamUnreachable
from .keys import FLIGHTS, KEY_MEMO, METRICS, READY, SESSION, SETTINGS, STORE
from .policy import CACHEABLE_ROUTES, CachePlan, decide
from .relay import Flight
from .upstream import kept_headers, relay_headers, send

log = logging.getLogger(__name__)

_JSON = "application/json"


async def openai_endpoint(request: web.Request) -> web.StreamResponse:
    """``/v1/{rest}``: answer from the cache, or from a (shared) upstream call that may then be stored."""
    app = request.app
    settings = app[SETTINGS]
    if settings.proxy_api_keys:
        _authorize(request, settings)
    route = request.match_info["rest"]
    if "." in route and any(part in (".", "..") for part in route.split("/")):
        # The upstream base may sit below other paths of the same host; never let a client climb out of it.
        raise NotFound(f"Unknown request URL: {request.method} {request.path}.")
    if request.method != "POST" or route not in CACHEABLE_ROUTES:
        return await passthrough(request, route)

    raw = await _read_body(request, settings.max_body_bytes)
    headers = request.headers
    cache_control, ttl_header = headers.get("Cache-Control"), headers.get("X-Cache-TTL")
    # Requests without cache controls have the default plan, so their keying can be remembered by raw bytes.
    memo_key = None
    if cache_control is None and ttl_header is None:
        memo_key = (
            route,
            raw,
            request.rel_url.raw_query_string,
            headers.get("Authorization"),
            headers.get("api-key"),
            headers.get("OpenAI-Organization"),
            headers.get("OpenAI-Project"),
        )
    keyed = app[KEY_MEMO].get(memo_key) if memo_key is not None else None
    if keyed is None:
        body: Any
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None  # the upstream's answer to it is the authority
        model = body.get("model") if isinstance(body, dict) else None
        upstream = settings.upstream_for(model if isinstance(model, str) else None)
        plan = decide("POST", route, body, cache_control, settings.cache.ttl_s, ttl_header)
        if not plan.cacheable:
            app[METRICS].count(route, "BYPASS")
            opener = partial(_open_upstream, request, upstream, "POST", route, raw)
            return await Flight(None).started_by(opener).respond(request, (("X-Cache", "BYPASS"),))
        key = build_key(settings.cache.namespace, route, body, _scope(request, settings, upstream))
        keyed = Keyed(key, short_key(key), upstream, plan)
        if memo_key is not None:
            app[KEY_MEMO].put(memo_key, len(raw), keyed)

    plan = keyed.plan
    metrics = app[METRICS]
    if plan.lookup:
        entry = await app[STORE].get(keyed.key)
        if entry is not None:
            now = time.time()
            if plan.max_age_s is None or now - entry.stored_at <= plan.max_age_s:
                metrics.count(route, "HIT")
                if entry.usage:
                    metrics.count_tokens(entry.usage)
                return _replay(entry, keyed.tag, now)

    opener = partial(_open_upstream, request, keyed.upstream, "POST", route, raw)
    on_complete = partial(_store_flight, app, keyed.key, plan) if plan.store else None
    if plan.lookup and on_complete is not None:
        flight, leader = app[FLIGHTS].join(keyed.key, opener, on_complete)
    else:
        flight, leader = Flight(None, on_complete).started_by(opener), True
    outcome = "MISS" if leader else "HIT"
    if not plan.store and leader:
        outcome = "BYPASS"
    metrics.count(route, outcome)
    if not leader:
        metrics.coalesced += 1
    log.debug("cache %s route=%s key=%s reason=%s", outcome, route, keyed.tag, plan.reason)
    return await flight.respond(request, (("X-Cache", outcome), ("X-Cache-Key", keyed.tag)))


async def _read_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole request body. With a Content-Length it is one exact read (aiohttp's ``read()`` loops and
    copies); chunked and oversized bodies go through ``read()``, which enforces ``client_max_size`` (413)."""
    length = request.content_length
    if length is None or length > max_bytes:
        return await request.read()
    if length == 0:
        return b""
    try:
        return await request.content.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("client closed the connection mid-body") from None


async def _open_upstream(
    request: web.Request, upstream: Upstream, method: str, route: str, data: Any
) -> aiohttp.ClientResponse:
    metrics = request.app[METRICS]
    # The path as the client encoded it: decoding would turn an escaped "?" or "/" into syntax.
    raw_path = request.rel_url.raw_path
    target = raw_path[4:] if raw_path.startswith("/v1/") else route
    try:
        response = await send(
            request.app[SESSION], upstream, method, target, request.rel_url.raw_query_string, request.headers, data
        )
    except ProxyError:
        metrics.count_upstream(upstream.name, "error")
        raise
    metrics.count_upstream(upstream.name, f"{response.status // 100}xx")
    return response


def _replay(entry: CacheEntry, tag: str, now: float) -> web.Response:
    # Built in one go and handed over as a CIMultiDict, which aiohttp then uses without copying.
    headers = CIMultiDict(entry.headers)
    headers["X-Cache"] = "HIT"
    headers["X-Cache-Key"] = tag
    headers["Age"] = str(max(0, int(now - entry.stored_at)))
    return web.Response(status=entry.status, body=entry.body, headers=headers)


def _store_flight(app: web.Application, key: str, plan: CachePlan, flight: Flight) -> None:
    """Keep a finished flight's answer when it is a complete 2xx that can be replayed faithfully."""
    if not 200 <= flight.status < 300:
        return
    body = flight.body()
    if len(body) > app[SETTINGS].cache.max_entry_bytes:
        return
    usage: Mapping[str, Any] | None = None
    if flight.is_stream:
        recorder = flight.recorder
        if recorder is None or not recorder.complete:
            log.info("stream ended without a terminal event; not stored key=%s", short_key(key))
            return
        usage = recorder.usage
    else:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            log.info("upstream 2xx body is not JSON; not stored key=%s", short_key(key))
            return
        if isinstance(parsed, dict) and isinstance(parsed.get("usage"), dict):
            usage = parsed["usage"]
    now = time.time()
    entry = CacheEntry(
        status=flight.status,
        headers=kept_headers(flight.headers),
        body=body,
        is_stream=flight.is_stream,
        stored_at=now,
        expires_at=now + plan.ttl_s,
        usage=usage,
    )
    app[STORE].put(key, entry)
    app[METRICS].stores += 1


def _scope(request: web.Request, settings: Settings, upstream: Upstream) -> str:
    headers = request.headers
    # With an upstream key every client is the same account upstream, so they share entries; without one,
    # the client's own credential reaches the upstream and must partition the cache.
    credential = None if upstream.api_key else (headers.get("Authorization") or headers.get("api-key"))
    return build_scope(
        settings.cache.namespace,
        upstream.name,
        _canonical_query(request),
        credential,
        headers.get("OpenAI-Organization"),
        headers.get("OpenAI-Project"),
    )


def _canonical_query(request: web.Request) -> str:
    query = request.rel_url.raw_query_string
    if not query or "&" not in query:
        return query
    return "&".join(sorted(query.split("&")))


def _authorize(request: web.Request, settings: Settings) -> None:
    """Raise :class:`InvalidApiKey` unless the request carries one of ``settings.proxy_api_keys``."""
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
    token_bytes = token.encode()
    if not token or not any(hmac.compare_digest(token_bytes, k.encode()) for k in settings.proxy_api_keys):
        raise InvalidApiKey(
            "Incorrect API key provided for this proxy. Send one of its client keys as 'Authorization: Bearer <key>'."
        )


async def passthrough(request: web.Request, route: str) -> web.StreamResponse:
    """Forward any other ``/v1`` call unchanged and uncached, streaming both bodies."""
    settings = request.app[SETTINGS]
    if request.method not in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        raise MethodNotAllowed(f"method {request.method} is not supported")
    length = request.content_length
    data: Any = None
    model: str | None = None
    if request.body_exists:
        if length is not None and length <= settings.max_body_bytes:
            data = await request.read()
            if request.content_type == _JSON:
                try:
                    parsed = orjson.loads(data)
                except orjson.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                    model = parsed["model"]
        else:
            data = request.content.iter_chunked(64 * 1024)
    upstream = settings.upstream_for(model)
    request.app[METRICS].count(route, "BYPASS")
    upstream_response = await _open_upstream(request, upstream, request.method, route, data)
    complete = False
    try:
        response = web.StreamResponse(status=upstream_response.status)
        for name, value in relay_headers(upstream_response.headers):
            response.headers.add(name, value)
        response.headers["X-Cache"] = "BYPASS"
        await response.prepare(request)
        async for chunk in upstream_response.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        complete = True
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("upstream broke off a passthrough response route=%s error=%r", route, exc)
        if not response.prepared:
            raise UpstreamUnreachable("upstream response broke off") from None
        if request.transport is not None:
            request.transport.close()
    finally:
        if complete:
            upstream_response.release()
        else:
            upstream_response.close()
    return response


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: ready to serve. The cache's state is reported but never makes the proxy unready."""
    store = request.app[STORE]
    ready = request.app[READY].is_set()
    body = orjson.dumps({"status": "ready" if ready else "stopping", "cache": store.state})
    return web.Response(status=200 if ready else 503, body=body, content_type=_JSON)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's counters."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": "text/plain; version=0.0.4"})
