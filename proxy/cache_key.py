"""Derive a stable, secret-free Redis key from an OpenAI request."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, TypeVar

import orjson

from .config import Upstream
from .policy import CachePlan

KEY_VERSION = "v1"


def build_key(namespace: str, route: str, body: Any, scope: str) -> str:
    """Return ``<namespace>:v1:<route>:<sha256>``.

    *body* is the parsed JSON request body and *scope* comes from :func:`build_scope`. The whole body is
    keyed: an allow-list of "relevant" fields would silently serve one request's answer to another the day
    the API grows a parameter. Keys are sorted, so the same JSON in another order or spacing shares an entry.
    """
    canonical = orjson.dumps([route, scope, body], option=orjson.OPT_SORT_KEYS)
    return f"{namespace}:{KEY_VERSION}:{route}:{hashlib.sha256(canonical).hexdigest()}"


@lru_cache(maxsize=4096)
def build_scope(
    namespace: str, upstream: str, query: str, authorization: str | None, organization: str | None, project: str | None
) -> str:
    """Digest of everything outside the body that changes the answer.

    *authorization* is the client's own credential, given only when it is what reaches the upstream (no
    upstream key configured): two keys then never share answers. It goes through an HMAC so that the key
    material cannot be recovered or confirmed from a Redis dump. *query* must already be canonical
    (sorted); Azure-style gateways select the API version there. Headers that vary per call without changing
    the answer (SDK retry counters, timeouts, user agents, idempotency keys) are deliberately absent.
    Memoised: a process sees few distinct scopes, and the HMAC is the dearest step of keying a request.
    """
    parts = orjson.dumps([upstream, query, authorization or "", organization or "", project or ""])
    return hmac.new(namespace.encode(), parts, hashlib.sha256).hexdigest()


def short_key(key: str) -> str:
    """The first 16 hex digits of the key's hash, for the ``X-Cache-Key`` header and logs."""
    return key.rpartition(":")[2][:16]


@dataclass(frozen=True, slots=True)
class Keyed:
    """A request's cache key, its short form, the upstream it goes to and its cache plan."""

    key: str
    tag: str
    upstream: Upstream
    plan: CachePlan


K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """A dict bounded by the summed size of its keys; it empties itself rather than grow past *max_bytes*.

    Keying a request by its raw bytes and headers skips JSON parsing, canonical re-encoding and hashing for
    requests seen before, which is most of a hit's own work. Emptying instead of LRU order keeps ``get``
    a plain dict lookup.
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
