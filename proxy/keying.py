"""Keyer: a request's cache plan, upstream and key, remembered by its raw bytes so that repeats skip the work."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from .cache_key import ambiguous, build_key, build_scope, short_key
from .config import Settings, Upstream
from .kinds import ClientKey
from .policy import CachePlan, decide
from .seal import derive_secret

K = TypeVar("K")
V = TypeVar("V")

# Headers, besides the body, that select another answer upstream. The credential headers are part of the
# raw-bytes memo key too, so that a remembered key is never reused for another tenant.
_CREDENTIALS = ("Authorization", "api-key")
_ACCOUNT = ("OpenAI-Organization", "OpenAI-Project")
_VARIED = ("OpenAI-Beta",)
_OFF = CachePlan(False, False, 0, "cache off")

ScopeOf = Callable[[Upstream, str, Mapping[str, str], ClientKey | None], str]


class Memo(Generic[K, V]):
    """A dict bounded by the summed size its items are given, each plus *item_bytes* for the objects an item
    holds beyond that (its key tuple, value and dict slot); it empties itself rather than grow past *max_bytes*.

    Emptying instead of keeping LRU order keeps ``get`` a plain dict lookup, which is the point of a memo on
    the hit path.
    """

    def __init__(self, max_bytes: int, *, item_bytes: int = 0) -> None:
        self._items: dict[K, V] = {}
        self._bytes = 0
        self._max_bytes = max_bytes
        self._item_bytes = item_bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def put(self, key: K, size: int, value: V) -> None:
        size += self._item_bytes
        if size > self._max_bytes // 16:
            return
        if self._bytes + size > self._max_bytes:
            self.clear()
        self._items[key] = value
        self._bytes += size


@dataclass(frozen=True, slots=True)
class Keyed:
    """A request's route, its cache key (``None``: bypass the cache) and the key's short form, its upstream and
    its plan, and the model it names (for logs and metrics only)."""

    route: str
    key: str | None
    tag: str
    upstream: Upstream
    plan: CachePlan
    model: str | None = None


class Keyer:
    """Keys POSTs to cacheable routes for one app: parse the body, :func:`decide`, choose the upstream by model,
    :func:`build_key` in the right namespace and partition.

    A request without cache controls has the default plan, so its result is remembered by its raw bytes,
    query and scope headers: a repeat skips JSON parsing, canonical re-encoding and hashing, which is most of
    a hit's own work. With *enabled* false (the cache is off) every request bypasses it.

    Partitions: a request authenticated by a named client key is keyed apart from other client keys; without
    client keys, a request whose own credential goes upstream (no upstream key) is keyed apart by it.
    ``cache.share_across_keys`` lifts both. *secret* keys the hashes (see :func:`build_key`).
    """

    def __init__(self, settings: Settings, *, enabled: bool, memo_max_bytes: int, secret: bytes | None) -> None:
        self._settings = settings
        self._enabled = enabled
        self._secret = secret
        self._scope_key = secret or settings.cache.namespace.encode()
        self._varied = (*_VARIED, *settings.cache.vary_headers)
        self._headers = (*_CREDENTIALS, *_ACCOUNT, *self._varied)
        self.has_clients = bool(settings.auth.clients)
        # A remembered key holds its Keyed (key, tag, plan) and the tuple it is found by: about 512 bytes.
        self._by_raw: Memo[tuple[Any, ...], Keyed] = Memo(memo_max_bytes, item_bytes=512)
        self._scopes: Memo[tuple[Any, ...], str] = Memo(memo_max_bytes // 4, item_bytes=256)
        # Each namespace's generation (absent: 0), part of every key built in it; see switch_generation.
        self._generations: dict[str, int] = {}

    def generation(self, namespace: str) -> int:
        return self._generations.get(namespace, 0)

    def switch_generation(self, namespace: str, generation: int) -> bool:
        """Build *namespace*'s keys in *generation* from now on; remembered keys are forgotten. Returns whether
        the generation changed."""
        if self._generations.get(namespace, 0) == generation:
            return False
        self._generations[namespace] = generation
        self._by_raw.clear()
        return True

    def key(
        self, route: str, raw: bytes, query: str, headers: Mapping[str, str], client: ClientKey | None = None
    ) -> Keyed:
        """The :class:`Keyed` for a POST of *raw* to ``/v1/<route>?<query>`` with *headers*, authenticated by
        *client* when the proxy has client keys."""
        memo_key = self._memo_key(route, raw, query, headers, client)
        keyed = self._by_raw.get(memo_key) if memo_key is not None else None
        if keyed is None:
            keyed = self._derive(route, raw, query, headers, client, self._scope)
            self._remember(memo_key, raw, keyed)
        return keyed

    def derive(
        self, route: str, raw: bytes, query: str, headers: Mapping[str, str], client: ClientKey | None = None
    ) -> Keyed:
        """:meth:`key` without the memos, safe to call from a worker thread: large bodies take milliseconds to
        parse and hash, and are too large to remember anyway."""
        return self._derive(route, raw, query, headers, client, self._fresh_scope)

    def _memo_key(
        self, route: str, raw: bytes, query: str, headers: Mapping[str, str], client: ClientKey | None
    ) -> tuple[Any, ...] | None:
        # Only requests without cache controls have the default plan that a remembered key carries.
        if "Cache-Control" in headers or "X-Cache-TTL" in headers:
            return None
        return (route, raw, query, client.digest if client else None, *map(headers.get, self._headers))

    def _remember(self, memo_key: tuple[Any, ...] | None, raw: bytes, keyed: Keyed) -> None:
        if memo_key is not None and keyed.key is not None:
            self._by_raw.put(memo_key, len(raw), keyed)

    def _derive(
        self,
        route: str,
        raw: bytes,
        query: str,
        headers: Mapping[str, str],
        client: ClientKey | None,
        scope_of: ScopeOf,
    ) -> Keyed:
        body: Any
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None  # the upstream's answer to it is the authority
        named = body.get("model") if isinstance(body, dict) else None
        model = named if isinstance(named, str) else None
        settings = self._settings
        upstream = settings.upstream_for(model)
        plan = _OFF
        if self._enabled:
            plan = decide(route, body, headers.get("Cache-Control"), settings.cache.ttl_s, headers.get("X-Cache-TTL"))
        if plan.cacheable and ambiguous(raw, body):
            plan = CachePlan(False, False, 0, "ambiguous")
        if not plan.cacheable:
            return Keyed(route, None, "", upstream, plan, model)
        namespace = (client.namespace if client else None) or settings.cache.namespace
        scope = scope_of(upstream, query, headers, client)
        key = build_key(namespace, route, body, scope, self._secret, generation=self._generations.get(namespace, 0))
        return Keyed(route, key, short_key(key), upstream, plan, model)

    def _scope_parts(
        self, upstream: Upstream, query: str, headers: Mapping[str, str], client: ClientKey | None
    ) -> tuple[Any, ...]:
        partition: str | None = None
        if not self._settings.cache.share_across_keys:
            if client is not None:
                partition = f"client:{client.digest.hex()}" if client.tenant else None
            elif not upstream.api_key:
                # The client's own credential reaches the upstream: its answers are that account's.
                partition = headers.get("Authorization") or headers.get("api-key")
        varied = tuple((name, value) for name in self._varied if (value := headers.get(name)) is not None)
        account = tuple(headers.get(name) for name in _ACCOUNT)
        return (upstream.name, _canonical(query), partition, *account, varied)

    def _fresh_scope(self, upstream: Upstream, query: str, headers: Mapping[str, str], client: ClientKey | None) -> str:
        name, canonical_query, partition, organization, project, varied = self._scope_parts(
            upstream, query, headers, client
        )
        return build_scope(self._scope_key, name, canonical_query, partition, organization, project, varied)

    def _scope(self, upstream: Upstream, query: str, headers: Mapping[str, str], client: ClientKey | None) -> str:
        parts = self._scope_parts(upstream, query, headers, client)
        scope = self._scopes.get(parts)
        if scope is None:
            name, canonical_query, partition, organization, project, varied = parts
            scope = build_scope(self._scope_key, name, canonical_query, partition, organization, project, varied)
            self._scopes.put(parts, len(orjson.dumps(parts)), scope)
        return scope


def _canonical(query: str) -> str:
    if not query or "&" not in query:
        return query
    return "&".join(sorted(query.split("&")))


def key_secret(settings: Settings) -> bytes | None:
    """The secret that keys cache hashes: ``cache.key_secret``, else one derived from the encryption key (whoever
    cannot read entries should not be able to confirm a guessed prompt from a key either), else none."""
    cache = settings.cache
    if cache.key_secret:
        return hashlib.sha256(cache.key_secret.encode()).digest()
    if cache.encryption_key:
        return derive_secret(cache.encryption_key, b"llm-cache-proxy cache key v1")
    return None
