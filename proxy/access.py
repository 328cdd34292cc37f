"""Each ``/v1`` request gets an id (``X-Request-ID``), an answer in OpenAI's shape to its errors, its count in the
metrics and one log line."""

from __future__ import annotations

import functools
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from .guards import error_answer
from .lending import LentTransport
from .logs import AccessLog, Exchange, RequestIds
from .metrics import Metrics
from .state import CLIENT, EXCHANGE


def observed(
    handler: Handler,
    metrics: Metrics,
    access_log: AccessLog,
    request_ids: RequestIds,
    *,
    has_clients: bool = True,
) -> Handler:
    """Wrap *handler*: the request's :class:`Exchange` is ``request[EXCHANGE]`` while it runs, and errors are
    answered as :func:`~proxy.guards.enveloped` answers them; afterwards a request whose cache outcome is known is
    counted in *metrics*, and every one is written to *access_log*, a client that left before its answer
    included, with the name of the client key it presented when *has_clients*. The response carries
    ``X-Request-ID``: the client's own when it sent a plausible one, else a new one from *request_ids*.

    The envelope's job is done here rather than by a second wrapper, and the app's objects are bound rather than
    looked up: this runs on every hit."""

    @functools.wraps(handler)
    async def observe(request: web.Request) -> web.StreamResponse:
        ex = Exchange(request_ids.take(request.headers.get("X-Request-ID")), time.perf_counter())
        request[EXCHANGE] = ex
        response: web.StreamResponse | None = None
        try:
            try:
                response = await handler(request)
            except Exception as exc:
                response = error_answer(request, exc)
            if not response.prepared:
                response.headers["X-Request-ID"] = ex.id
            return response
        finally:
            now = time.perf_counter()
            if ex.outcome is not None:
                metrics.record(ex, now)
            if access_log.enabled:
                # Without client keys there is no name to find, and looking for none costs a raised KeyError.
                client = request.get(CLIENT) if has_clients else None
                ex.client = client.name if client is not None else None
                status = response.status if response is not None else None
                access_log.record(ex, request.method, request.rel_url.raw_path, status, now)
            transport = request.transport
            if isinstance(transport, LentTransport):
                transport.request_finished()

    return observe
