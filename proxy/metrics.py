"""Prometheus metrics of one proxy process, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.metrics import MetricWrapperBase

OUTCOMES = ("HIT", "MISS", "BYPASS")
# Chat and completions report prompt/completion tokens, the Responses API input/output tokens.
_TOKEN_FIELDS = (("prompt_tokens", "prompt"), ("completion_tokens", "completion"), ("input_tokens", "input"),
                 ("output_tokens", "output"))

# The *_created series double the exposition for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Counters for cache outcomes, upstream calls, Redis trouble and tokens saved.

    Label values are route names, outcomes, upstream names and status classes: never keys, prompts or
    credentials.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("llm_cache_requests", "Proxied requests by route and cache outcome.",
                                ("route", "outcome"), registry=self.registry)
        self.upstream_responses = Counter("llm_cache_upstream_responses",
                                          "Upstream responses by upstream and status class (2xx, 4xx, 5xx, error).",
                                          ("upstream", "status"), registry=self.registry)
        self.stores = Counter("llm_cache_stores", "Responses written to the cache.", registry=self.registry)
        self.coalesced = Counter("llm_cache_coalesced",
                                 "Requests answered by joining an identical request already in flight.",
                                 registry=self.registry)
        self.tokens_saved = Counter("llm_cache_tokens_saved",
                                    "Tokens of upstream usage answered from the cache instead.",
                                    ("kind",), registry=self.registry)
        self.redis_errors = Gauge("llm_cache_redis_errors", "Redis operations that failed (read as a miss).",
                                  registry=self.registry)
        self.redis_available = Gauge("llm_cache_redis_available",
                                     "1 while Redis is in use, 0 while the proxy serves without it.",
                                     registry=self.registry)
        self.memory_entries = Gauge("llm_cache_memory_entries", "Entries in the in-process cache tier.",
                                    registry=self.registry)
        self._outcomes: dict[tuple[str, str], MetricWrapperBase] = {}
        self._tokens: dict[str, MetricWrapperBase] = {}

    def count(self, route: str, outcome: str) -> None:
        child = self._outcomes.get((route, outcome))
        if child is None:
            child = self._outcomes[(route, outcome)] = self.requests.labels(route, outcome)
        child.inc()  # type: ignore[attr-defined]

    def count_tokens(self, usage: Mapping[str, Any]) -> None:
        """Add a replayed answer's token usage to ``tokens_saved``."""
        for field, kind in _TOKEN_FIELDS:
            value = usage.get(field)
            if type(value) is int and value > 0:
                child = self._tokens.get(kind)
                if child is None:
                    child = self._tokens[kind] = self.tokens_saved.labels(kind)
                child.inc(value)  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
