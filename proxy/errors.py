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

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type, self.code, self.param)


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


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
