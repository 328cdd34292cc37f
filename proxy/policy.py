"""decide(...): whether a request may be answered from the cache, and whether its answer may be stored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# POST routes whose answer is a pure function of the body (and scope); the app routes only these to the cache.
CACHEABLE_ROUTES = frozenset({"chat/completions", "completions", "embeddings", "moderations", "responses"})


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What to do with one request.

    *lookup*: serve a stored answer if there is one (no older than *max_age_s* when set).
    *store*: keep the upstream's answer for *ttl_s* seconds. *reason* explains a bypass in logs.
    *stale_if_error_s*: what the request accepts, past an entry's freshness, when the upstream fails (RFC 5861);
    ``None`` leaves it to the proxy's setting.
    """

    lookup: bool
    store: bool
    ttl_s: int
    reason: str
    max_age_s: float | None = None
    stale_if_error_s: float | None = None

    @property
    def cacheable(self) -> bool:
        return self.lookup or self.store


def decide(route: str, body: Any, cache_control: str | None, ttl_s: int, ttl_override: str | None = None) -> CachePlan:
    """Plan one POST to a cacheable *route* (one of :data:`CACHEABLE_ROUTES`).

    *body* is the parsed JSON body, or ``None`` when it was absent or not JSON (the upstream then judges it).
    *cache_control* is the request's ``Cache-Control``: ``no-cache`` skips the lookup but stores the fresh
    answer, ``no-store`` stores nothing, ``max-age=N`` accepts only entries at most N seconds old,
    ``stale-if-error=N`` accepts an entry up to N seconds past that when the upstream fails.
    *ttl_override* is the optional ``X-Cache-TTL`` request header, in seconds.
    """
    if not isinstance(body, Mapping):
        return CachePlan(False, False, 0, "body")
    if route == "responses" and body.get("background") is True:
        # A background response is a handle to poll, not an answer.
        return CachePlan(False, False, 0, "background")
    lookup, store, max_age_s, stale_s = True, True, None, None
    if cache_control:
        for directive in cache_control.lower().split(","):
            name, _, value = directive.strip().partition("=")
            if name == "no-cache":
                lookup = False
            elif name == "no-store":
                store = False
            elif name == "max-age":
                max_age_s = _seconds(value, max_age_s)
            elif name == "stale-if-error":
                stale_s = _seconds(value, stale_s)
    if ttl_override:
        try:
            override = int(ttl_override)
        except ValueError:
            override = ttl_s
        if override <= 0:
            store = False
        ttl_s = override if override > 0 else ttl_s
    reason = "ok" if (lookup and store) else ("no-store" if not store else "no-cache")
    if not lookup and not store:
        reason = "no-cache,no-store"
    return CachePlan(lookup, store, ttl_s, reason, max_age_s, stale_s)


def _seconds(value: str, otherwise: float | None) -> float | None:
    try:
        return max(0.0, float(value.strip().strip('"')))
    except ValueError:
        return otherwise
