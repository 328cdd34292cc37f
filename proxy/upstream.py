"""The connection to OpenAI-compatible upstreams: one pooled ClientSession, header filtering both ways."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Upstream
from .errors import UpstreamTimeout, UpstreamUnreachable

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
# The upstream session decompresses, so the encoding and length of what the client gets are the proxy's.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}
# Response headers kept in a cache entry: metadata of the answer itself, never per-account rate limits.
_KEPT_PREFIXES = ("openai-", "x-request-id", "azureml-model")


def forward_headers(headers: Mapping[str, str], upstream: Upstream) -> CIMultiDict[str]:
    """Request headers for the upstream: hop-by-hop fields dropped, the upstream key injected."""
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in connection:
            continue
        if upstream.api_key and lower in ("authorization", "api-key"):
            continue
        out.add(name, value)
    if upstream.api_key:
        if upstream.auth_header.lower() == "authorization":
            out["Authorization"] = f"Bearer {upstream.api_key}"
        else:
            out[upstream.auth_header] = upstream.api_key
    return out


def relay_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Response headers for the client: hop-by-hop fields and recomputed framing dropped."""
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in _RESPONSE_DROP and k.lower() not in connection]


def kept_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The subset of response headers worth storing with an entry."""
    return tuple((k, v) for k, v in headers if k.lower() == "content-type" or k.lower().startswith(_KEPT_PREFIXES))


def create_session(limit: int = 256) -> aiohttp.ClientSession:
    """The process-wide upstream session. Timeouts are per request, from each :class:`Upstream`."""
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, enable_cleanup_closed=True)
    # auto_decompress: the client gets identity bodies; cache entries are stored decompressed.
    # DummyCookieJar: a cookie set by the upstream for one client must never ride along on another's request.
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


@lru_cache(maxsize=1024)
def _url(base_url: str, rest: str, query: str) -> URL:
    # Parsed once per distinct target: yarl parsing is a measurable share of a miss.
    return URL(f"{base_url}/{rest}?{query}" if query else f"{base_url}/{rest}", encoded=True)


@lru_cache(maxsize=64)
def _timeout(upstream: Upstream) -> aiohttp.ClientTimeout:
    # total=None: aiohttp's default 300 s total would cut long generations; sock_read bounds silence instead.
    return aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout_s, sock_read=upstream.timeout_s)


async def send(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    method: str,
    rest: str,
    query: str,
    headers: Mapping[str, str],
    body: Any,
) -> aiohttp.ClientResponse:
    """Open the upstream response for ``/v1/<rest>?<query>`` (*query* still percent-encoded); the caller reads
    and releases it.

    Raises :class:`UpstreamUnreachable` when no connection can be made, :class:`UpstreamTimeout` when the
    upstream stays silent for longer than its ``timeout_s`` (between bytes, so long streams are not cut).
    """
    try:
        return await session.request(
            method,
            _url(upstream.base_url, rest, query),
            headers=forward_headers(headers, upstream),
            data=body,
            timeout=_timeout(upstream),
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
