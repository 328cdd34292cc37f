"""Guards around the handlers: the error envelope, who may call (browsers, Host names, client keys), methods, and
the fallback for targets no route takes."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from .config import ServerSettings
from .errors import (
    BodyTooLarge,
    Forbidden,
    InvalidApiKey,
    MethodNotAllowed,
    Misdirected,
    NotFound,
    ProxyError,
    error_response,
)
from .kinds import ClientKey
from .state import CLIENT, METRICS, SETTINGS

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    404: "unknown_url",
    405: "method_not_allowed",
    413: "request_too_large",
}
# Fetch metadata a browser adds to a request made by another site's page (a navigation included).
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})
_CORS_EXPOSED = "X-Cache, X-Cache-Key, Age, X-Request-ID, OpenAI-Processing-Ms, OpenAI-Model"


def enveloped(handler: Handler) -> Handler:
    """Wrap *handler* so that every error it answers leaves as ``{"error": {...}}``, never as a traceback or plain
    text (see :func:`error_answer`).

    A wrapper at route registration rather than an aiohttp middleware: the middleware machinery costs a few
    microseconds per request, a measurable share of a cache hit. Targets no route takes get :func:`unrouted`
    through :func:`fall_back_to`."""

    @functools.wraps(handler)
    async def envelope(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return error_answer(request, exc)

    return envelope


def error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The answer in OpenAI's shape to *exc*, raised by a handler of *request* (call it in the ``except`` block):
    a :class:`ProxyError`, aiohttp's own HTTP errors, and bugs (logged with their traceback, answered 500).
    Raises *exc* again when it is no error to answer: a redirect, or a client that left."""
    if isinstance(exc, ProxyError):
        return exc.response()
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return _http_error(request, exc).response()
    if isinstance(exc, (web.HTTPException, ConnectionResetError, OSError)):
        raise exc
    log.exception("unhandled error method=%s path=%s", request.method, request.path)
    return error_response(500, "The proxy failed to handle this request.", "server_error", "internal_error")


async def unrouted(request: web.Request) -> web.StreamResponse:
    """Any target no route takes: 405 for CONNECT (this is not a forward proxy), else 404."""
    raise web.HTTPNotFound()


def fall_back_to(router: web.UrlDispatcher, handler: Handler) -> None:
    """Send every request no route takes to *handler*, instead of aiohttp's plain-text 404 or 405.

    Targets without a path (CONNECT's ``host:port``) never reach a resource, so the router's own ``resolve`` is
    wrapped: one await more per request, where an aiohttp middleware would cost several microseconds.
    """
    route = web.ResourceRoute("*", handler, web.PlainResource("/"))
    resolve = router.resolve

    async def resolve_or_fall_back(request: web.Request) -> web.UrlMappingMatchInfo:
        match = await resolve(request)
        return match if match.http_exception is None else web.UrlMappingMatchInfo({}, route)

    router.resolve = resolve_or_fall_back  # type: ignore[method-assign]


def _http_error(request: web.Request, exc: web.HTTPException) -> ProxyError:
    if request.method == "CONNECT":
        return MethodNotAllowed("This proxy is not a forward proxy: CONNECT is not supported.")
    if exc.status == 404:
        return NotFound(f"Unknown request URL: {request.method} {request.path}. Point the client at <proxy>/v1.")
    if exc.status == 413:
        limit = request.app[SETTINGS].server.max_body_bytes
        return BodyTooLarge(f"Request body is larger than this proxy accepts ({limit} bytes).")
    error = ProxyError(exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason)
    error.status, error.type, error.code = exc.status, "invalid_request_error", _HTTP_CODES.get(exc.status)
    return error


class Screen:
    """Which browsers and Host names may reach the proxy.

    A web page the user opens can send requests to a proxy on 127.0.0.1 and spend its key. Cross-site
    requests carry ``Origin`` or ``Sec-Fetch-Site``: they are refused unless their origin is listed, and then
    get proper CORS answers. A page can also rebind its own host name to 127.0.0.1 and then read the answers
    as same-origin; its requests still name that host in ``Host``. So, on a loopback address (or whenever
    names are listed), the Host must be ``localhost``, an IP address (a rebinding needs a name) or a listed
    name. SDKs send neither header, and name the address they were given.
    """

    def __init__(self, server: ServerSettings) -> None:
        self.checks_host = _is_loopback(server.host) or bool(server.allowed_hosts)
        self._names = frozenset({"localhost", *(name.lower().rstrip(".") for name in server.allowed_hosts)})
        self.origins = frozenset(origin.lower() for origin in server.allowed_origins)
        self._seen: dict[str, bool] = {}

    def host_allowed(self, host: str) -> bool:
        """Whether *host* (a Host header value, with or without its port) names this machine or a listed name."""
        allowed = self._seen.get(host)
        if allowed is None:
            allowed = _is_address(host) or _hostname(host) in self._names
            if len(self._seen) >= 1024:
                self._seen.clear()
            self._seen[host] = allowed
        return allowed

    async def add_cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: let a listed origin's page read the answer."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() in self.origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED
            response.headers.add("Vary", "Origin")

    def refusal(self, request: web.Request) -> ProxyError | None:
        """Why *request* may not be served, or ``None``."""
        if request.raw_path[:1] != "/" and not self._own_authority(request):
            return Misdirected("This proxy serves only requests meant for itself, not for other hosts.")
        return self.headers_refusal(request.headers)

    def headers_refusal(self, headers: Mapping[str, str]) -> ProxyError | None:
        """Why a request with *headers* and an origin-form target (``/path``) may not be served, or ``None``."""
        if self.checks_host and not self.host_allowed(headers.get("Host", "localhost")):
            return Forbidden("This proxy does not answer to that Host name; add it to PROXY_ALLOWED_HOSTS.")
        origin = headers.get("Origin")
        if origin is not None:
            if origin.lower() not in self.origins:
                return Forbidden("Requests from web pages are refused; list the origin in PROXY_ALLOWED_ORIGINS.")
        elif headers.get("Sec-Fetch-Site") in _FOREIGN_SITES:
            return Forbidden("Requests from other sites' pages are refused.")
        return None

    def _own_authority(self, request: web.Request) -> bool:
        # RFC 9112 §3.2.2: an absolute-form target's authority replaces Host. It must name this proxy; it
        # never chooses where the request goes.
        authority = request.url.raw_authority
        local = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if local and _hostname(authority) == str(local[0]).lower():
            return True
        return _hostname(authority) in self._names or _is_loopback_address(authority)


def screened(handler: Handler, screen: Screen) -> Handler:
    """Refuse, in OpenAI's shape and before *handler* runs, what :class:`Screen` refuses; answer a CORS
    preflight from a listed origin without forwarding it."""

    @functools.wraps(handler)
    async def check(request: web.Request) -> web.StreamResponse:
        refusal = screen.refusal(request)
        if refusal is not None:
            raise refusal
        if (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in (request.headers)
        ):
            return _preflight(request)
        return await handler(request)

    return check


def _preflight(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        response.headers["Access-Control-Allow-Headers"] = requested
    response.headers["Access-Control-Max-Age"] = "600"
    return response


class ClientKeys:
    """The client keys a request may present: ``Authorization: Bearer <key>`` or ``api-key: <key>``."""

    def __init__(self, clients: tuple[ClientKey, ...]) -> None:
        self._by_digest = {client.digest: client for client in clients}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def presented(self, headers: Mapping[str, str]) -> ClientKey | None:
        """The client key *headers* carry, or ``None``."""
        header = headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else headers.get("api-key", "")
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        # Looked up by the SHA-256 of what was presented, then compared in constant time: the time taken
        # depends on a digest the caller cannot steer, never on how much of a real key it guessed.
        client = self._by_digest.get(digest)
        return client if client is not None and hmac.compare_digest(client.digest, digest) else None


def authorized(handler: Handler, clients: tuple[ClientKey, ...]) -> Handler:
    """Answer 401 in OpenAI's shape, before *handler* runs, unless the request carries one of *clients*' keys
    (see :class:`ClientKeys`); remember which one as ``request[CLIENT]``."""
    keys = ClientKeys(clients)

    @functools.wraps(handler)
    async def check(request: web.Request) -> web.StreamResponse:
        client = keys.presented(request.headers)
        if client is None:
            raise InvalidApiKey(
                "Incorrect API key provided for this proxy. "
                "Send one of its client keys as 'Authorization: Bearer <key>'."
            )
        request[CLIENT] = client
        request.app[METRICS].clients[(client.name,)] += 1
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


def _hostname(host: str) -> str:
    host = host.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0].rstrip(".")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(_hostname(host).strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(_hostname(host).strip("[]")).is_loopback
    except ValueError:
        return False


def _is_loopback(bind: str) -> bool:
    return bind.lower() == "localhost" or _is_loopback_address(bind)
