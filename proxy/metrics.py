"""Metrics of one proxy process: plain counters on the request path, Prometheus text when scraped."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

# Chat and completions report prompt/completion tokens, the Responses API input/output tokens.
_TOKEN_FIELDS = (
    ("prompt_tokens", "prompt"),
    ("completion_tokens", "completion"),
    ("input_tokens", "input"),
    ("output_tokens", "output"),
)


class Metrics:
    """Counters for cache outcomes, upstream responses, stores, coalesced requests and tokens saved, plus
    gauges read from the store when scraped.

    Every request updates plain integers: prometheus_client's own counters take a lock per increment, and
    importing it is left to the first scrape (it is a measurable part of start-up). Label values are route
    names, outcomes, upstream names and status classes: never keys, prompts or credentials.
    """

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.upstream_responses: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.tokens: defaultdict[str, int] = defaultdict(int)
        self.clients: defaultdict[str, int] = defaultdict(int)
        self.stores = 0
        self.coalesced = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def count(self, route: str, outcome: str) -> None:
        self.requests[(route, outcome)] += 1

    def relabel(self, route: str, was: str, now: str) -> None:
        """A request counted as *was* got another outcome after all (a stale answer instead of a failure)."""
        self.requests[(route, was)] -= 1
        self.requests[(route, now)] += 1

    def count_upstream(self, upstream: str, status: str) -> None:
        """*status* is a class: ``2xx``, ``4xx``, ``5xx`` or ``error`` (no response)."""
        self.upstream_responses[(upstream, status)] += 1

    def count_tokens(self, usage: Mapping[str, Any]) -> None:
        """Add a replayed answer's token usage to ``llm_cache_tokens_saved_total``."""
        for field, kind in _TOKEN_FIELDS:
            value = usage.get(field)
            if type(value) is int and value > 0:
                self.tokens[kind] += value

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Expose ``read()`` as gauge *name* at every scrape."""
        self.gauges[name] = (help_text, read)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        def families() -> list[Metric]:
            requests = CounterMetricFamily(
                "llm_cache_requests", "Proxied requests by route and cache outcome.", labels=("route", "outcome")
            )
            for labels, value in sorted(self.requests.items()):
                requests.add_metric(labels, value)
            upstream = CounterMetricFamily(
                "llm_cache_upstream_responses",
                "Upstream responses by upstream and status class (2xx, 4xx, 5xx, error).",
                labels=("upstream", "status"),
            )
            for labels, value in sorted(self.upstream_responses.items()):
                upstream.add_metric(labels, value)
            tokens = CounterMetricFamily(
                "llm_cache_tokens_saved", "Tokens of upstream usage answered from the cache instead.", labels=("kind",)
            )
            for kind, value in sorted(self.tokens.items()):
                tokens.add_metric((kind,), value)
            clients = CounterMetricFamily(
                "llm_cache_client_requests", "Requests admitted by each client key, by its name.", labels=("client",)
            )
            for name, value in sorted(self.clients.items()):
                clients.add_metric((name,), value)
            out: list[Metric] = [
                requests,
                upstream,
                tokens,
                clients,
                CounterMetricFamily("llm_cache_stores", "Responses written to the cache.", value=self.stores),
                CounterMetricFamily(
                    "llm_cache_coalesced",
                    "Requests answered by joining an identical request already in flight.",
                    value=self.coalesced,
                ),
            ]
            out.extend(
                GaugeMetricFamily(name, help_text, value=read()) for name, (help_text, read) in self.gauges.items()
            )
            return out

        class Snapshot:
            def collect(self) -> list[Metric]:
                return families()

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Snapshot())
        return generate_latest(registry)
