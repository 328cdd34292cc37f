"""Upstreams: one pooled ClientSession per OpenAI-compatible API, and header filtering both ways."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote_to_bytes

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Upstream
from .errors import BadRequest, NotFound, Overloaded, UpstreamTimeout, UpstreamUnreachable
from .keying import Memo

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop fields, plus what the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "x-cache-ttl"}
# The session decompresses, so the encoding and length of what the client gets are the proxy's.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}
_URL_MEMO_BYTES = 256 * 1024
_STREAMED_BODY_BYTES = 1024 * 1024
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def confined_target(raw_path: str) -> str:
    """The part of *raw_path* after ``/v1/``, still percent-encoded as the client sent it, once it is certain
    that no server could read it as a path outside ``/v1``.

    Servers normalise paths differently: some decode twice, read ``\\`` as ``/``, drop ``;params`` before
    resolving dot segments, or merge ``//``. So anything such a reading could turn into a climb is refused:
    invalid or double percent-encoding, encodings that are not UTF-8 (overlong forms of ``.`` and ``/``
    included), backslashes and control characters raise :class:`BadRequest`; ``.`` and ``..`` segments, with
    or without ``;params``, raise :class:`NotFound`.
    """
    if not raw_path.startswith("/v1/"):
        raise BadRequest("The request path must start with /v1/ as sent, without encoded characters before it.")
    rest = raw_path[4:]
    if _BAD_ESCAPE.search(rest):
        raise BadRequest("The request path has an invalid percent-encoding.")
    try:
        decoded = unquote_to_bytes(rest).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The request path does not decode to UTF-8.") from None
    if _ESCAPE.search(decoded):
        raise BadRequest("The request path is percent-encoded twice.")
    if "\\" in decoded or not decoded.isprintable():
        raise BadRequest("The request path holds a backslash or a control character.")
    segments = decoded.split("/")
    if any(segment.split(";", 1)[0] in (".", "..") for segment in segments):
        raise NotFound("Unknown request URL: a path under /v1 cannot hold '.' or '..' segments.")
    if "" in segments[:-1]:
        raise BadRequest("The request path has an empty segment ('//').")
    return rest


class CallSlots:
    """A cap on upstream calls in flight in this process. Past it a new call fails at once with
    :class:`Overloaded` (503 with Retry-After, which SDKs retry) instead of queueing behind the others."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def __enter__(self) -> None:
        if self.in_use >= self.limit:
            raise Overloaded(f"The proxy has {self.limit} upstream calls in flight; retry shortly.")
        self.in_use += 1

    def __exit__(self, *exc_info: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.in_use -= 1


def _named_by_connection(headers: Mapping[str, str]) -> set[str]:
    # Connection lists further hop-by-hop fields of this one message.
    return {token.strip().lower() for token in headers.get("Connection", "").split(",")}


def forward_headers(
    headers: Mapping[str, str], upstream: Upstream, *, client_credentials: bool = True
) -> CIMultiDict[str]:
    """Request headers for *upstream*: hop-by-hop fields dropped, the upstream key injected. The client's own
    ``Authorization`` and ``api-key`` go along only with *client_credentials* and no upstream key: a key the
    client presented to the proxy itself must never leave it."""
    drop = _REQUEST_DROP | _named_by_connection(headers)
    if upstream.api_key or not client_credentials:
        drop = drop | {"authorization", "api-key"}
    out: CIMultiDict[str] = CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in drop)
    if upstream.api_key:
        if upstream.auth_header.lower() == "authorization":
            out["Authorization"] = f"Bearer {upstream.api_key}"
        else:
            out[upstream.auth_header] = upstream.api_key
    return out


def relay_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Response headers for the client: hop-by-hop fields and recomputed framing dropped."""
    drop = _RESPONSE_DROP | _named_by_connection(headers)
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


class UpstreamClient:
    """One upstream's connection pool, with its timeouts and the target URLs it has parsed.

    ``total=None``: aiohttp's default 300 s total would cut long generations; ``sock_read`` bounds silence
    instead. Cookies are never kept (a cookie set for one client must not ride along on another's request),
    and answers are decompressed, so clients get identity bodies and entries are stored decoded.
    """

    def __init__(self, upstream: Upstream, *, max_connections: int = 256) -> None:
        self.upstream = upstream
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=upstream.connect_timeout_s, sock_read=upstream.timeout_s
        )
        connector = aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._urls: Memo[tuple[str, str], URL] = Memo(_URL_MEMO_BYTES)

    async def open(
        self,
        method: str,
        rest: str,
        query: str,
        headers: Mapping[str, str],
        body: Any,
        *,
        client_credentials: bool = True,
    ) -> aiohttp.ClientResponse:
        """Open the response to ``<base_url>/<rest>?<query>`` (*rest* and *query* still percent-encoded); the
        caller reads and releases it.

        Raises :class:`UpstreamUnreachable` when no connection can be made, :class:`UpstreamTimeout` when the
        upstream stays silent for longer than its ``timeout_s`` (between bytes, so long streams are not cut).
        """
        upstream = self.upstream
        if isinstance(body, bytes) and len(body) > _STREAMED_BODY_BYTES:
            # aiohttp sends a large bytes body in one write that holds the loop; a file-like one goes in chunks.
            body = io.BytesIO(body)
        try:
            return await self._session.request(
                method,
                self._url(rest, query),
                headers=forward_headers(headers, upstream, client_credentials=client_credentials),
                data=body,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {upstream.name} did not answer within {upstream.timeout_s:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            log.warning("upstream unreachable upstream=%s error=%s", upstream.name, exc.strerror or exc)
            raise UpstreamUnreachable(f"upstream {upstream.name} is unreachable") from None
        except aiohttp.ClientError as exc:
            log.warning("upstream request failed upstream=%s error=%r", upstream.name, exc)
            raise UpstreamUnreachable(f"upstream {upstream.name} failed: {type(exc).__name__}") from None

    def _url(self, rest: str, query: str) -> URL:
        url = self._urls.get((rest, query))
        if url is None:
            base = self.upstream.base_url
            url = URL(f"{base}/{rest}?{query}" if query else f"{base}/{rest}", encoded=True)
            self._urls.put((rest, query), len(rest) + len(query), url)
        return url

    async def close(self) -> None:
        await self._session.close()
