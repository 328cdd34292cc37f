"""Errors the proxy itself raises, rendered in OpenAI's error envelope."""

from __future__ import annotations

import orjson
from aiohttp import web


class ProxyError(Exception):
    """A failure caused by the proxy, not by the upstream; the client sees :meth:`response`.

    ``type`` and ``code`` follow OpenAI's vocabulary so SDKs expose them as ``exc.type`` / ``exc.code``.
    """

    status = 500
    type = "server_error"
    code: str | None = "proxy_error"
    # Seconds after which a retry may succeed; sent as Retry-After, which the SDKs honour.
    retry_after_s: int | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        response = error_response(self.status, self.message, self.type, self.code, self.param)
        if self.retry_after_s is not None:
            response.headers["Retry-After"] = str(self.retry_after_s)
        return response


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class MalformedRequest(BadRequest):
    """A request that is not valid HTTP/1.1, refused by aiohttp's parser."""

    code = "malformed_request"


class Forbidden(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class Misdirected(ProxyError):
    status = 421
    type = "invalid_request_error"
    code = "misdirected_request"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Overloaded(ProxyError):
    status = 503
    type = "server_error"
    code = "proxy_overloaded"
    retry_after_s = 1


class InternalError(ProxyError):
    status = 500
    type = "server_error"
    code = "internal_error"


class HandlerTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "proxy_timeout"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> web.Response:
    """An OpenAI-shaped error: ``{"error": {"message", "type", "param", "code"}}``."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
    return web.Response(status=status, body=body, content_type="application/json")
