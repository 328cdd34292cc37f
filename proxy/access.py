"""Each ``/v1`` request gets an id (``X-Request-ID``), its count in the metrics and one log line."""

from __future__ import annotations

import functools
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from .logs import Exchange
from .state import ACCESS_LOG, CLIENT, EXCHANGE, METRICS, REQUEST_IDS


def observed(handler: Handler) -> Handler:
    """Wrap *handler* (with its error envelope inside): the request's :class:`Exchange` is ``request[EXCHANGE]``
    while it runs; afterwards a request whose cache outcome is known is counted, and every one is logged, a
    client that left before its answer included. The response carries ``X-Request-ID``: the client's own when
    it sent a plausible one, else a new one.

    A wrapper at route registration, like the envelope, rather than a middleware: this is on every hit's path."""

    @functools.wraps(handler)
    async def observe(request: web.Request) -> web.StreamResponse:
        app = request.app
        ex = Exchange(app[REQUEST_IDS].take(request.headers.get("X-Request-ID")), time.perf_counter())
        request[EXCHANGE] = ex
        status: int | None = None
        try:
            response = await handler(request)
            status = response.status
            if not response.prepared:
                response.headers["X-Request-ID"] = ex.id
            return response
        finally:
            now = time.perf_counter()
            if ex.outcome is not None:
                app[METRICS].record(ex, now)
            access = app[ACCESS_LOG]
            if access.enabled:
                client = request.get(CLIENT)
                ex.client = client.name if client is not None else None
                access.record(ex, request.method, request.rel_url.raw_path, status, now)

    return observe
