"""HTTP handlers: the cacheable OpenAI endpoint and passthrough for the rest of ``/v1``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .config import ServerSettings, Upstream
from .entry import CacheEntry, Recording, entry_for, replay_headers
from .errors import BodyTooLarge, MethodNotAllowed, ProxyError, RequestTimeout, UpstreamUnreachable
from .fleet import Claim
from .flight import Flight, Opener, cut_off
from .keying import Keyed
from .lending import LentTransport
from .logs import Exchange
from .metrics import Metrics
from .state import CLIENT, EXCHANGE, FLEET, FLIGHTS, KEYER, METRICS, SETTINGS, SLOTS, STORE, UPSTREAMS
from .upstream import confined_target, relay_headers

log = logging.getLogger(__name__)

_JSON = "application/json"
StaleAnswer = Callable[[], web.Response | None]
OFFLOAD_BYTES = 256 * 1024
_PASSTHROUGH_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


async def openai_endpoint(request: web.Request) -> web.StreamResponse:
    """``POST /v1/<cacheable route>``: key the request, serve a hit, or serve from the upstream."""
    app = request.app
    raw = await read_body(request, app[SETTINGS].server)
    route, query, keyer = request.match_info["route"], request.rel_url.raw_query_string, app[KEYER]
    client = request.get(CLIENT) if keyer.has_clients else None
    if len(raw) < OFFLOAD_BYTES:
        keyed = keyer.key(route, raw, query, request.headers, client)
    else:
        # Parsing and hashing a large body takes milliseconds: not on the event loop.
        keyed = await asyncio.to_thread(keyer.derive, route, raw, query, request.headers, client)
    ex = request[EXCHANGE]
    ex.route, ex.upstream, ex.model, ex.tag = keyed.route, keyed.upstream.name, keyed.model, keyed.tag
    stale: CacheEntry | None = None
    transport = request.transport
    # Lent by the fast path, which has just found nothing under this key: one lookup is enough.
    missed = isinstance(transport, LentTransport) and transport.missed == keyed.key
    if keyed.plan.lookup and not missed:
        hit = await serve_hit(app, keyed, ex)
        if isinstance(hit, web.Response):
            return hit
        stale = hit
    return await serve_from_upstream(request, keyed, raw, stale)


async def serve_hit(app: web.Application, keyed: Keyed, ex: Exchange) -> web.Response | CacheEntry | None:
    """The stored answer for *keyed*; or, when the entry found is too old for the request (expired and kept for
    stale-if-error, or past the request's ``max-age``), that entry, to fall back on if the upstream fails."""
    assert keyed.key is not None
    entry = await app[STORE].get(keyed.key)
    if entry is None:
        return None
    now = time.time()
    if not count_hit(entry, keyed, ex, app[METRICS], now):
        return entry
    return _replay(entry, keyed.tag, now)


def count_hit(entry: CacheEntry, keyed: Keyed, ex: Exchange, metrics: Metrics, now: float) -> bool:
    """Whether *entry* may answer *keyed* at *now* (Unix time): fresh, and within the request's ``max-age``.
    If so, the hit is counted on *ex* and in *metrics*, as a response written at once."""
    if now >= entry.expires_at or (keyed.plan.max_age_s is not None and now - entry.stored_at > keyed.plan.max_age_s):
        return False
    ex.outcome = "HIT"
    if entry.usage:
        ex.tokens = entry.tokens
        metrics.count_saved(keyed.model, entry.tokens)
    if entry.is_stream:
        # Replayed in one write, as soon as the answer is handed over.
        ex.mark_first_byte(time.perf_counter())
    return True


def _replay(entry: CacheEntry, tag: str, now: float, label: str = "HIT") -> web.Response:
    # Built in one go and handed over as a CIMultiDict, which aiohttp then uses without copying.
    return web.Response(status=entry.status, body=entry.body, headers=replay_headers(entry, tag, now, label))


def _stale_fallback(keyed: Keyed, stale: CacheEntry | None, ex: Exchange, allowed_s: float) -> StaleAnswer | None:
    """What answers instead of an upstream failure: *stale*, marked ``X-Cache: STALE``, if it is within what the
    request (``Cache-Control: stale-if-error=N``) or else the proxy (*allowed_s*, ``cache.stale_if_error_s``)
    accepts past its freshness."""
    if stale is None:
        return None
    plan = keyed.plan
    if plan.stale_if_error_s is not None:
        allowed_s = plan.stale_if_error_s
    fresh_until = stale.expires_at
    if plan.max_age_s is not None:
        fresh_until = min(fresh_until, stale.stored_at + plan.max_age_s)
    if not allowed_s or time.time() - fresh_until > allowed_s:
        return None

    def fallback() -> web.Response | None:
        now = time.time()
        if now - fresh_until > allowed_s:
            return None
        log.warning(
            "upstream failed; serving a stale answer route=%s key=%s age=%ds",
            keyed.route,
            keyed.tag,
            now - stale.stored_at,
        )
        ex.outcome = "STALE"
        return _replay(stale, keyed.tag, now, "STALE")

    return fallback


async def serve_from_upstream(
    request: web.Request, keyed: Keyed, raw: bytes, stale: CacheEntry | None = None
) -> web.StreamResponse:
    """Relay the upstream's answer: joined with an identical request in flight, here or on another replica, when
    the plan allows it; stored afterwards when the plan says so and the answer is worth replaying. If the
    upstream fails and *stale* is acceptable for stale-if-error, that is the answer instead."""
    app, ex = request.app, request[EXCHANGE]
    plan = keyed.plan
    opener = partial(_open_upstream, request, keyed.upstream, keyed.route, raw)
    fallback = _stale_fallback(keyed, stale, ex, app[SETTINGS].cache.stale_if_error_s)
    if keyed.key is None or not plan.lookup or not plan.store:
        slots, max_kept = app[SLOTS], app[SETTINGS].cache.max_entry_bytes
        ttl_s = plan.ttl_s if keyed.key and plan.store else None
        on_finish = partial(_store, app, keyed, ex) if ttl_s else None
        finish = app[FLIGHTS].finish_abandoned
        flight = Flight(
            None, ttl_s=ttl_s, on_finish=on_finish, slots=slots, max_kept_bytes=max_kept, finish_abandoned=finish
        )
        ex.outcome = outcome = "MISS" if ttl_s else "BYPASS"
        _log_decision(keyed, outcome)
        named = [("X-Cache", outcome), ("X-Request-ID", ex.id)]
        if keyed.key:
            named.append(("X-Cache-Key", keyed.tag))
        return await flight.started_by(opener).respond(request, named, fallback, ex)
    shared = await _shared_flight(request, keyed, opener)
    if isinstance(shared, web.Response):
        return shared
    flight, started = shared
    ex.outcome = "MISS" if started and flight.own_call else "COALESCED"
    _log_decision(keyed, ex.outcome)

    def headers() -> tuple[tuple[str, str], ...]:
        # Settled once the answer begins: a follower whose holder vanished made the call itself.
        ex.outcome = outcome = "MISS" if started and flight.own_call else "COALESCED"
        return (("X-Cache", outcome), ("X-Cache-Key", keyed.tag), ("X-Request-ID", ex.id))

    return await flight.respond(request, headers, fallback, ex)


async def _shared_flight(request: web.Request, keyed: Keyed, opener: Opener) -> tuple[Flight, bool] | web.Response:
    """The flight for *keyed* to answer from, and whether this request started it: one in progress here,
    another replica's through Redis, or a new upstream call (published for the other replicas when they
    coordinate); or a hit, if the entry appeared meanwhile."""
    app, key, plan = request.app, keyed.key, keyed.plan
    assert key is not None
    flights, fleet = app[FLIGHTS], app.get(FLEET)
    flight = flights.get(key)
    if flight is None and fleet is not None and plan.ttl_s == app[SETTINGS].cache.ttl_s:
        claim, token = await fleet.claim(key)
        if claim is Claim.STORED:
            hit = await serve_hit(app, keyed, request[EXCHANGE])
            if isinstance(hit, web.Response):
                return hit
        # Another request here may have started the call while this one asked Redis.
        flight = flights.get(key)
        if claim is Claim.LEAD and flight is not None:
            if not flight.own_call:
                # That request follows the lease this one holds: Redis granted it here first, but the other claim's
                # answer was read first. Only this one can make the call; the follower reads it from the stream,
                # as another replica would.
                flight = None
            elif flight.publication is None:
                # A call of this replica's own that nobody can follow yet: the lease is for it.
                fleet.publish(key, token, flight)
        if flight is None:
            flight = flights.start(key, plan.ttl_s, None)
            flight.on_finish = partial(_store_own, app, keyed, request[EXCHANGE], flight)
            if claim is Claim.FOLLOW:
                return flight.fed_by(fleet.follow(key, partial(flight.from_upstream, opener))), True
            flight.started_by(opener)
            if claim is Claim.LEAD:
                fleet.publish(key, token, flight)
            return flight, True
    if flight is not None:
        flight.join_ttl(plan.ttl_s)
        return flight, False
    return flights.start(key, plan.ttl_s, partial(_store, app, keyed, request[EXCHANGE])).started_by(opener), True


def _log_decision(keyed: Keyed, outcome: str) -> None:
    # Before the upstream answers: the request line comes only once the response is complete.
    if log.isEnabledFor(logging.DEBUG):
        log.debug("cache %s route=%s key=%s reason=%s", outcome, keyed.route, keyed.tag or "-", keyed.plan.reason)


def _store_own(
    app: web.Application, keyed: Keyed, ex: Exchange, flight: Flight, recording: Recording, ttl_s: int
) -> None:
    # A follower relays the answer the holder stores; it stores only an answer it fetched itself.
    if flight.own_call:
        _store(app, keyed, ex, recording, ttl_s)


def _store(app: web.Application, keyed: Keyed, ex: Exchange, recording: Recording, ttl_s: int) -> None:
    assert keyed.key is not None
    max_entry_bytes = app[SETTINGS].cache.max_entry_bytes
    entry = entry_for(recording, ttl_s=ttl_s, max_entry_bytes=max_entry_bytes, now=time.time())
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
    ex.tokens = entry.tokens
    app[STORE].put(keyed.key, entry)
    metrics = app[METRICS]
    metrics.stores += 1
    metrics.stored_bytes += len(entry.body)


async def read_body(request: web.Request, server: ServerSettings) -> bytes:
    """The whole request body, within ``server.client_timeout_s`` and ``server.max_body_bytes`` (413, nothing
    read past it, chunked bodies included). With a Content-Length it is one exact read (aiohttp's ``read()``
    loops and copies)."""
    length = request.content_length
    if length is not None and length > server.max_body_bytes:
        raise BodyTooLarge(f"Request body is larger than this proxy accepts ({server.max_body_bytes} bytes).")
    if length and request.content.is_eof():
        # All there already (a small body comes with its headers): no deadline to arm.
        return await request.content.readexactly(length)
    try:
        async with asyncio.timeout(server.client_timeout_s):
            if length is None:
                return await request.read()  # enforces client_max_size as it reads
            if length == 0:
                return b""
            return await request.content.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("client closed the connection mid-body") from None
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {server.client_timeout_s:g}s.") from None


async def _open_upstream(request: web.Request, upstream: Upstream, target: str, data: Any) -> aiohttp.ClientResponse:
    """Send the request to ``<upstream>/<target>``; *target* is the path after ``/v1/`` as the client encoded
    it (decoding would turn an escaped "?" or "/" into syntax)."""
    counters, ex = request.app[METRICS], request[EXCHANGE]
    client = request.app[UPSTREAMS][upstream.name]
    # With client keys (every request then carries one), what the client presented is the proxy's own
    # credential, never the upstream's.
    own_credentials = not request.app[KEYER].has_clients
    started = time.perf_counter()
    try:
        response = await client.open(
            request.method,
            target,
            request.rel_url.raw_query_string,
            request.headers,
            data,
            client_credentials=own_credentials,
        )
    except ProxyError:
        counters.count_upstream(upstream.name, "error", None)
        raise
    counters.count_upstream(upstream.name, str(response.status), time.perf_counter() - started)
    ex.upstream_status = response.status
    return response


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other ``/v1`` call: forwarded unchanged and uncached, both bodies streamed."""
    rest = confined_target(request.rel_url.raw_path)
    if request.method not in _PASSTHROUGH_METHODS:
        raise MethodNotAllowed(f"method {request.method} is not supported")
    server = request.app[SETTINGS].server
    data, model = await _passthrough_body(request, server)
    route = request.match_info["rest"]
    ex = request[EXCHANGE]
    upstream = request.app[SETTINGS].upstream_for(model)
    # Only the first segment (models, files, batches...), and of those a bounded number: paths hold ids.
    ex.route, ex.upstream, ex.model = request.app[METRICS].routes(route.partition("/")[0]), upstream.name, model
    ex.outcome = "BYPASS"
    with request.app[SLOTS]:
        upstream_response = await _open_upstream(request, upstream, rest, data)
        complete = False
        try:
            response = web.StreamResponse(status=upstream_response.status)
            for name, value in relay_headers(upstream_response.headers):
                response.headers.add(name, value)
            response.headers["X-Cache"] = "BYPASS"
            response.headers["X-Request-ID"] = ex.id
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            complete = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream broke off a passthrough response route=%s error=%r", route, exc)
            if not response.prepared:
                raise UpstreamUnreachable("upstream response broke off") from None
            cut_off(request)
        finally:
            if complete:
                upstream_response.release()
            else:
                upstream_response.close()
    return response


async def _passthrough_body(request: web.Request, server: ServerSettings) -> tuple[bytes | None, str | None]:
    """The body to forward, read whole within the size and time limits, and the model it names, if any."""
    if not request.body_exists:
        return None, None
    data = await read_body(request, server)
    if request.content_type != _JSON:
        return data, None
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data, None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return data, model if isinstance(model, str) else None
