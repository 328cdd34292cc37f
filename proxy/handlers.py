"""HTTP handlers: the cacheable OpenAI endpoint, passthrough for the rest of ``/v1``, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from .config import Upstream
from .entry import CacheEntry, Recording, entry_for
from .errors import MethodNotAllowed, NotFound, ProxyError, UpstreamUnreachable
from .flight import Flight, cut_off
from .keying import Keyed
from .state import FLIGHTS, KEYER, METRICS, READY, SETTINGS, STORE, UPSTREAMS
from .upstream import relay_headers

log = logging.getLogger(__name__)

_JSON = "application/json"
_PASSTHROUGH_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


async def openai_endpoint(request: web.Request) -> web.StreamResponse:
    """``POST /v1/<cacheable route>``: key the request, serve a hit, or serve from the upstream."""
    app = request.app
    raw = await read_body(request, app[SETTINGS].server.max_body_bytes)
    keyed = app[KEYER].key(request.match_info["route"], raw, request.rel_url.raw_query_string, request.headers)
    if keyed.plan.lookup:
        hit = await serve_hit(request, keyed)
        if hit is not None:
            return hit
    return await serve_from_upstream(request, keyed, raw)


async def serve_hit(request: web.Request, keyed: Keyed) -> web.Response | None:
    """The stored answer for *keyed*, or ``None`` when there is none young enough for the request."""
    assert keyed.key is not None
    entry = await request.app[STORE].get(keyed.key)
    if entry is None:
        return None
    now = time.time()
    if keyed.plan.max_age_s is not None and now - entry.stored_at > keyed.plan.max_age_s:
        return None
    counters = request.app[METRICS]
    counters.count(keyed.route, "HIT")
    if entry.usage:
        counters.count_tokens(entry.usage)
    return _replay(entry, keyed.tag, now)


def _replay(entry: CacheEntry, tag: str, now: float) -> web.Response:
    # Built in one go and handed over as a CIMultiDict, which aiohttp then uses without copying.
    headers = CIMultiDict(entry.headers)
    headers["X-Cache"] = "HIT"
    headers["X-Cache-Key"] = tag
    headers["Age"] = str(max(0, int(now - entry.stored_at)))
    return web.Response(status=entry.status, body=entry.body, headers=headers)


async def serve_from_upstream(request: web.Request, keyed: Keyed, raw: bytes) -> web.StreamResponse:
    """Relay the upstream's answer: joined with an identical request in flight when the plan allows it, stored
    afterwards when the plan says so and the answer is worth replaying."""
    app = request.app
    plan = keyed.plan
    opener = partial(_open_upstream, request, keyed.upstream, keyed.route, raw)
    if keyed.key is None:
        flight, outcome = Flight(None).started_by(opener), "BYPASS"
    else:
        on_finish = partial(_store, app, keyed) if plan.store else None
        if plan.lookup and plan.store:
            flight, leader = app[FLIGHTS].join(keyed.key, opener, on_finish)
        else:
            flight, leader = Flight(None, on_finish).started_by(opener), True
        # A request that joined a call in flight made no upstream call of its own.
        outcome = ("MISS" if plan.store else "BYPASS") if leader else "HIT"
        if not leader:
            app[METRICS].coalesced += 1
        log.debug("cache %s route=%s key=%s reason=%s", outcome, keyed.route, keyed.tag, plan.reason)
    app[METRICS].count(keyed.route, outcome)
    headers = (("X-Cache", outcome), ("X-Cache-Key", keyed.tag)) if keyed.key else (("X-Cache", outcome),)
    return await flight.respond(request, headers)


def _store(app: web.Application, keyed: Keyed, recording: Recording) -> None:
    assert keyed.key is not None
    max_entry_bytes = app[SETTINGS].cache.max_entry_bytes
    entry = entry_for(recording, ttl_s=keyed.plan.ttl_s, max_entry_bytes=max_entry_bytes, now=time.time())
    if entry is None:
        log.debug(
            "answer not stored key=%s status=%d stream=%s finished=%s bytes=%d",
            keyed.tag,
            recording.status,
            recording.is_stream,
            recording.finished,
            len(recording.body),
        )
        return
    app[STORE].put(keyed.key, entry)
    app[METRICS].stores += 1


async def read_body(request: web.Request, max_bytes: int) -> bytes:
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


async def _open_upstream(request: web.Request, upstream: Upstream, route: str, data: Any) -> aiohttp.ClientResponse:
    counters = request.app[METRICS]
    # The path as the client encoded it: decoding would turn an escaped "?" or "/" into syntax.
    raw_path = request.rel_url.raw_path
    target = raw_path[4:] if raw_path.startswith("/v1/") else route
    client = request.app[UPSTREAMS][upstream.name]
    try:
        response = await client.open(request.method, target, request.rel_url.raw_query_string, request.headers, data)
    except ProxyError:
        counters.count_upstream(upstream.name, "error")
        raise
    counters.count_upstream(upstream.name, f"{response.status // 100}xx")
    return response


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other ``/v1`` call: forwarded unchanged and uncached, both bodies streamed."""
    rest = request.match_info["rest"]
    if "." in rest and any(part in (".", "..") for part in rest.split("/")):
        # The upstream base may sit below other paths of the same host; never let a client climb out of it.
        raise NotFound(f"Unknown request URL: {request.method} {request.path}.")
    if request.method not in _PASSTHROUGH_METHODS:
        raise MethodNotAllowed(f"method {request.method} is not supported")
    data, model = await _passthrough_body(request, request.app[SETTINGS].server.max_body_bytes)
    request.app[METRICS].count(rest, "BYPASS")
    upstream_response = await _open_upstream(request, request.app[SETTINGS].upstream_for(model), rest, data)
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
        log.warning("upstream broke off a passthrough response route=%s error=%r", rest, exc)
        if not response.prepared:
            raise UpstreamUnreachable("upstream response broke off") from None
        cut_off(request)
    finally:
        if complete:
            upstream_response.release()
        else:
            upstream_response.close()
    return response


async def _passthrough_body(request: web.Request, max_bytes: int) -> tuple[Any, str | None]:
    """The body to forward (bytes when small enough to read, else a stream) and the model it names, if any."""
    if not request.body_exists:
        return None, None
    length = request.content_length
    if length is None or length > max_bytes:
        return request.content.iter_chunked(64 * 1024), None
    data = await request.read()
    if request.content_type != _JSON:
        return data, None
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data, None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return data, model if isinstance(model, str) else None


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: ready to serve. The cache's state is reported but never makes the proxy unready."""
    ready = request.app[READY].is_set()
    body = orjson.dumps({"status": "ready" if ready else "stopping", "cache": request.app[STORE].state})
    return web.Response(status=200 if ready else 503, body=body, content_type=_JSON)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's counters."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": "text/plain; version=0.0.4"})
