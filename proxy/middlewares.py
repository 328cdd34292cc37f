"""The error envelope: every error the proxy itself produces leaves in OpenAI's error shape."""

from __future__ import annotations

import functools
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import MethodNotAllowed, NotFound, ProxyError, error_response

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
    for every request, which cost about a tenth of a cache hit's CPU time.
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
                message = f"Request body is larger than this proxy accepts ({request.app._client_max_size} bytes)."
            return error_response(exc.status, message, "invalid_request_error", _HTTP_CODES.get(exc.status))
        except (ConnectionResetError, OSError):
            raise
        except Exception:
            log.exception("unhandled error method=%s path=%s", request.method, request.path)
            return error_response(500, "The proxy failed to handle this request.", "server_error", "internal_error")

    return guard


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
