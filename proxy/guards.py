"""Guards around the handlers: the error envelope, client keys, method checks and the not-found answer."""

from __future__ import annotations

import functools
import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import InvalidApiKey, MethodNotAllowed, NotFound, ProxyError, error_response
from .state import SETTINGS

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    404: "unknown_url",
    405: "method_not_allowed",
    413: "request_too_large",
}


def guarded(handler: Handler) -> Handler:
    """Wrap *handler* so that :class:`ProxyError`, aiohttp's own HTTP errors and bugs answer as
    ``{"error": {...}}``, never as a traceback.

    A wrapper at route registration rather than an aiohttp middleware: aiohttp rebuilds its middleware chain
    for every request, work a cache hit should not pay for.
    """

    @functools.wraps(handler)
    async def guard(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            if exc.status == 413:
                limit = request.app[SETTINGS].server.max_body_bytes
                message = f"Request body is larger than this proxy accepts ({limit} bytes)."
            return error_response(exc.status, message, "invalid_request_error", _HTTP_CODES.get(exc.status))
        except (ConnectionResetError, OSError):
            raise
        except Exception:
            log.exception("unhandled error method=%s path=%s", request.method, request.path)
            return error_response(500, "The proxy failed to handle this request.", "server_error", "internal_error")

    return guard


def authorized(handler: Handler, client_keys: frozenset[str]) -> Handler:
    """Answer 401 in OpenAI's shape, before *handler* runs, unless the request carries one of *client_keys*
    (``Authorization: Bearer <key>`` or ``api-key: <key>``), compared in constant time."""
    keys = [key.encode() for key in client_keys]

    @functools.wraps(handler)
    async def check(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
        presented = token.encode()
        # Every key is compared, so the time taken does not tell which one nearly matched.
        if not token or not sum(hmac.compare_digest(presented, key) for key in keys):
            raise InvalidApiKey(
                "Incorrect API key provided for this proxy. "
                "Send one of its client keys as 'Authorization: Bearer <key>'."
            )
        return await handler(request)

    return check


def get_only(handler: Handler) -> Handler:
    """Answer other methods than GET and HEAD with an OpenAI-shaped 405 (the route takes every method)."""

    @functools.wraps(handler)
    async def only(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use GET.")
        return await handler(request)

    return only


async def not_found(request: web.Request) -> web.StreamResponse:
    """Every path outside ``/v1`` and the health endpoints."""
    raise NotFound(f"Unknown request URL: {request.method} {request.path}. Point the client at <proxy>/v1.")
