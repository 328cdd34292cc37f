"""Middlewares: every error the proxy itself produces leaves in OpenAI's error envelope."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ProxyError, error_response

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request", 404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large",
}


@web.middleware
async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render :class:`ProxyError` and aiohttp's own HTTP errors as ``{"error": {...}}``; hide tracebacks."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"Unknown request URL: {request.method} {request.path}."
        elif exc.status == 413:
            message = f"Request body is larger than this proxy accepts ({request.app._client_max_size} bytes)."
        return error_response(exc.status, message, "invalid_request_error", _HTTP_CODES.get(exc.status))
    except (ConnectionResetError, OSError):
        raise
    except Exception:
        log.exception("unhandled error method=%s path=%s", request.method, request.path)
        return error_response(500, "The proxy failed to handle this request.", "server_error", "internal_error")
