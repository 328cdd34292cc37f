"""Keyer: a request's cache plan, upstream and key, remembered by its raw bytes so that repeats skip the work."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from .cache_key import build_key, build_scope, short_key
from .config import Settings, Upstream
from .policy import CachePlan, decide

K = TypeVar("K")
V = TypeVar("V")

# The headers, besides the body, that select a different answer upstream (the credential only when it is the
# client's own). They are part of the raw-bytes memo key so that a remembered key is never reused across them.
_SCOPE_HEADERS = ("Authorization", "api-key", "OpenAI-Organization", "OpenAI-Project")
_OFF = CachePlan(False, False, 0, "cache off")


class Memo(Generic[K, V]):
    """A dict bounded by the summed size of its keys; it empties itself rather than grow past *max_bytes*.

    Emptying instead of keeping LRU order keeps ``get`` a plain dict lookup, which is the point of a memo on
    the hit path.
    """

    def __init__(self, max_bytes: int) -> None:
        self._items: dict[K, V] = {}
        self._bytes = 0
        self._max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, size: int, value: V) -> None:
        if size > self._max_bytes // 16:
            return
        if self._bytes + size > self._max_bytes:
            self._items.clear()
            self._bytes = 0
        self._items[key] = value
        self._bytes += size


@dataclass(frozen=True, slots=True)
class Keyed:
    """A request's route, its cache key (``None``: bypass the cache) and the key's short form, its upstream and
    its plan."""

    route: str
    key: str | None
    tag: str
    upstream: Upstream
    plan: CachePlan


class Keyer:
    """Keys POSTs to cacheable routes for one app: parse the body, :func:`decide`, choose the upstream by model,
    :func:`build_key`.

    A request without cache controls has the default plan, so its result is remembered by its raw bytes,
    query and scope headers: a repeat skips JSON parsing, canonical re-encoding and hashing, which is most of
    a hit's own work. With *enabled* false (the cache is off) every request bypasses it.
    """

    def __init__(self, settings: Settings, *, enabled: bool, memo_max_bytes: int) -> None:
        self._settings = settings
        self._enabled = enabled
        self._by_raw: Memo[tuple[str | bytes | None, ...], Keyed] = Memo(memo_max_bytes)
        self._scopes: Memo[tuple[str | None, ...], str] = Memo(memo_max_bytes // 4)

    def key(self, route: str, raw: bytes, query: str, headers: Mapping[str, str]) -> Keyed:
        """The :class:`Keyed` for a POST of *raw* to ``/v1/<route>?<query>`` with *headers*."""
        cache_control, ttl_header = headers.get("Cache-Control"), headers.get("X-Cache-TTL")
        memo_key = None
        if cache_control is None and ttl_header is None:
            memo_key = (route, raw, query, *(headers.get(name) for name in _SCOPE_HEADERS))
            keyed = self._by_raw.get(memo_key)
            if keyed is not None:
                return keyed
        body: Any
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None  # the upstream's answer to it is the authority
        model = body.get("model") if isinstance(body, dict) else None
        upstream = self._settings.upstream_for(model if isinstance(model, str) else None)
        plan = decide(route, body, cache_control, self._settings.cache.ttl_s, ttl_header) if self._enabled else _OFF
        if not plan.cacheable:
            return Keyed(route, None, "", upstream, plan)
        key = build_key(self._settings.cache.namespace, route, body, self._scope(upstream, query, headers))
        keyed = Keyed(route, key, short_key(key), upstream, plan)
        if memo_key is not None:
            self._by_raw.put(memo_key, len(raw), keyed)
        return keyed

    def _scope(self, upstream: Upstream, query: str, headers: Mapping[str, str]) -> str:
        # With an upstream key every client is the same account upstream, so they share entries; without one,
        # the client's own credential reaches the upstream and must partition the cache.
        credential = None if upstream.api_key else (headers.get("Authorization") or headers.get("api-key"))
        organization, project = headers.get("OpenAI-Organization"), headers.get("OpenAI-Project")
        parts = (upstream.name, _canonical(query), credential, organization, project)
        scope = self._scopes.get(parts)
        if scope is None:
            scope = build_scope(self._settings.cache.namespace, parts[0], parts[1], credential, organization, project)
            self._scopes.put(parts, sum(len(p) for p in parts if p), scope)
        return scope


def _canonical(query: str) -> str:
    if not query or "&" not in query:
        return query
    return "&".join(sorted(query.split("&")))
