"""Prometheus metrics of one proxy process, in a registry of its own (one per app)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

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
        # Counted on every request, hits included, so kept as plain integers and turned into metric families
        # only when scraped: prometheus_client's counters take a lock per increment.
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.tokens: defaultdict[str, int] = defaultdict(int)
        self.registry.register(_HotCounters(self))
        self.upstream_responses = Counter("llm_cache_upstream_responses",
                                          "Upstream responses by upstream and status class (2xx, 4xx, 5xx, error).",
                                          ("upstream", "status"), registry=self.registry)
        self.stores = Counter("llm_cache_stores", "Responses written to the cache.", registry=self.registry)
        self.coalesced = Counter("llm_cache_coalesced",
                                 "Requests answered by joining an identical request already in flight.",
                                 registry=self.registry)
        self.redis_errors = Gauge("llm_cache_redis_errors", "Redis operations that failed (read as a miss).",
                                  registry=self.registry)
        self.redis_available = Gauge("llm_cache_redis_available",
                                     "1 while Redis is in use, 0 while the proxy serves without it.",
                                     registry=self.registry)
        self.memory_entries = Gauge("llm_cache_memory_entries", "Entries in the in-process cache tier.",
                                    registry=self.registry)

    def count(self, route: str, outcome: str) -> None:
        self.requests[(route, outcome)] += 1

    def count_tokens(self, usage: Mapping[str, Any]) -> None:
        """Add a replayed answer's token usage to ``llm_cache_tokens_saved_total``."""
        for field, kind in _TOKEN_FIELDS:
            value = usage.get(field)
            if type(value) is int and value > 0:
                self.tokens[kind] += value

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HotCounters:
    """Exposes :attr:`Metrics.requests` and :attr:`Metrics.tokens` as Prometheus counters."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("llm_cache_requests", "Proxied requests by route and cache outcome.",
                                       labels=("route", "outcome"))
        for (route, outcome), count in sorted(self._metrics.requests.items()):
            requests.add_metric((route, outcome), count)
        yield requests
        tokens = CounterMetricFamily("llm_cache_tokens_saved",
                                     "Tokens of upstream usage answered from the cache instead.", labels=("kind",))
        for kind, count in sorted(self._metrics.tokens.items()):
            tokens.add_metric((kind,), count)
        yield tokens
