"""Derive a stable, secret-free Redis key from an OpenAI request."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson

KEY_VERSION = "v1"


def build_key(namespace: str, route: str, body: Any, scope: str) -> str:
    """Return ``<namespace>:v1:<route>:<sha256>``.

    *body* is the parsed JSON request body and *scope* comes from :func:`build_scope`. The whole body is
    keyed: an allow-list of "relevant" fields would silently serve one request's answer to another the day
    the API grows a parameter. Keys are sorted, so the same JSON in another order or spacing shares an entry.
    """
    canonical = orjson.dumps([route, scope, body], option=orjson.OPT_SORT_KEYS)
    return f"{namespace}:{KEY_VERSION}:{route}:{hashlib.sha256(canonical).hexdigest()}"


def build_scope(
    namespace: str,
    upstream: str,
    query: str,
    authorization: str | None,
    organization: str | None,
    project: str | None,
) -> str:
    """Digest of everything outside the body that changes the answer.

    *authorization* is the client's own credential, given only when it is what reaches the upstream (no
    upstream key configured): two keys then never share answers. It goes through an HMAC so that the key
    material cannot be recovered or confirmed from a Redis dump. *query* must already be canonical
    (sorted); Azure-style gateways select the API version there. Headers that vary per call without changing
    the answer (SDK retry counters, timeouts, user agents, idempotency keys) are deliberately absent.
    """
    parts = orjson.dumps([upstream, query, authorization or "", organization or "", project or ""])
    return hmac.new(namespace.encode(), parts, hashlib.sha256).hexdigest()


def short_key(key: str) -> str:
    """The first 16 hex digits of the key's hash, for the ``X-Cache-Key`` header and logs."""
    return key.rpartition(":")[2][:16]
