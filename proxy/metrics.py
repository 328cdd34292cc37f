"""Metrics of one proxy process: plain counters and fixed-bucket histograms on the request path, snapshots that
the workers of one process group add up, and Prometheus text when scraped."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from .logs import Exchange
from .pricing import ModelPrice, PriceList

# Hits take well under a millisecond and streamed misses minutes: buckets from 0.5 ms to 5 min.
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
REDIS_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
MAX_LABEL_VALUES = 100
MAX_LABEL_CHARS = 100
# Distinct (model, token counts) groups of saved answers kept before they are added to the totals.
MAX_SAVED_GROUPS = 10_000
OTHER = "other"
# A gauge of the whole process group: the workers' values added, or the lowest (an "up" gauge is up when all are).
SUM, MIN = "sum", "min"

Series = dict[tuple[str, ...], Any]


class Histogram:
    """Observations by label values, in fixed buckets: per series, the count in each bucket (the last one past
    every bound, +Inf), then the sum. No lock: the event loop is the only writer."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: Series = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value


class Bounded:
    """Label values as they come, up to *limit* distinct ones (each at most *max_chars* long); past that, and for
    longer ones, :data:`OTHER`, so that clients choosing model names cannot grow the metrics without end."""

    __slots__ = ("_limit", "_max_chars", "seen")

    def __init__(self, limit: int = MAX_LABEL_VALUES, max_chars: int = MAX_LABEL_CHARS) -> None:
        self.seen: dict[str, str] = {}
        self._limit, self._max_chars = limit, max_chars

    def __call__(self, value: str | None) -> str:
        if value is None:
            return "none"
        label = self.seen.get(value)
        if label is not None:
            return label
        if len(self.seen) >= self._limit or len(value) > self._max_chars:
            return OTHER
        self.seen[value] = value
        return value


class Metrics:
    """Everything ``/metrics`` reports for one process, as plain integers, floats and :class:`Histogram` s that
    the request path updates without locks (prometheus_client's own take one per increment); prometheus_client
    is imported at the first scrape. Label values are route names, outcomes, upstream names, status codes, Redis
    operations and bounded model and client names: never keys, prompts or credentials.

    *prices* turns the tokens of answers served from the cache into money; a model without a price counts tokens
    only.
    """

    def __init__(self, prices: Iterable[ModelPrice] = ()) -> None:
        # By upstream, route, model and outcome: the request counts are its series' counts, and the duration
        # histogram by route and outcome their sum, both computed when scraped.
        self.requests = Histogram(DURATION_BUCKETS_S)
        self.first_bytes = Histogram(DURATION_BUCKETS_S)
        self.upstream_responses: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self.upstream_first_bytes = Histogram(DURATION_BUCKETS_S)
        self.redis_durations = Histogram(REDIS_BUCKETS_S)
        self.redis_errors: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self.cost_usd: defaultdict[tuple[str, ...], float] = defaultdict(float)
        # Answers served from the cache, by (model, (input tokens, output tokens)): one increment per hit; labels,
        # tokens and money are worked out when scraped.
        self.saved: dict[tuple[str | None, tuple[int, int]], int] = {}
        self.clients: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self.stores = 0
        self.stored_bytes = 0
        self.gauges: dict[str, tuple[str, Callable[[], float], str]] = {}
        self.models = Bounded()
        self.routes = Bounded()
        self._prices = PriceList(prices)

    def record(self, ex: Exchange, now: float) -> None:
        """Count a finished request whose outcome is known, with its duration and time to first byte."""
        outcome = ex.outcome
        assert outcome is not None
        # Histogram.observe and Bounded.__call__ written out: this runs once per request.
        model = self.models.seen.get(ex.model) if ex.model is not None else None
        labels = (ex.upstream, ex.route, model or self.models(ex.model), outcome)
        counts = self.requests.series.get(labels)
        if counts is None:
            counts = self.requests.series[labels] = [0] * (len(DURATION_BUCKETS_S) + 1) + [0.0]
        elapsed_s = now - ex.started
        counts[bisect_left(DURATION_BUCKETS_S, elapsed_s)] += 1
        counts[-1] += elapsed_s
        if ex.first_byte_s is not None:
            self.first_bytes.observe((ex.route, outcome), ex.first_byte_s)

    @property
    def coalesced(self) -> int:
        """Requests that joined an identical one in flight: the requests counted as COALESCED."""
        return sum(sum(counts[:-1]) for labels, counts in self.requests.series.items() if labels[-1] == "COALESCED")

    def count_saved(self, model: str | None, tokens: tuple[int, int]) -> None:
        """Count an answer served from the cache as *model*'s, with its input and output *tokens* (a cache
        entry's :attr:`~proxy.entry.CacheEntry.tokens`); they, and what they would have cost, join the totals
        when scraped."""
        saved = self.saved
        group = (model, tokens)
        saved[group] = saved.get(group, 0) + 1
        if len(saved) >= MAX_SAVED_GROUPS:
            self.add_up_saved()

    def add_up_saved(self) -> None:
        """Move the counted answers into the token and money totals."""
        saved, self.saved = self.saved, {}
        prices: dict[str, ModelPrice | None] = {}
        for (model, (input_tokens, output_tokens)), count in saved.items():
            label = self.models(model)
            if input_tokens:
                self.tokens[(label, "input")] += count * input_tokens
            if output_tokens:
                self.tokens[(label, "output")] += count * output_tokens
            if model is None:
                continue
            if model not in prices:
                prices[model] = self._prices.price(model)
            price = prices[model]
            if price is not None:
                self.cost_usd[(label,)] += count * price.cost_usd(input_tokens, output_tokens)

    def count_upstream(self, upstream: str, status: str, first_byte_s: float | None) -> None:
        """An upstream answered *status* (its HTTP code, or ``error``: no response) after *first_byte_s*."""
        self.upstream_responses[(upstream, status)] += 1
        if first_byte_s is not None:
            self.upstream_first_bytes.observe((upstream,), first_byte_s)

    def gauge(self, name: str, help_text: str, read: Callable[[], float], combine: str = SUM) -> None:
        """Expose ``read()`` as gauge *name* at every scrape; a process group reports the *combine* of its
        workers' values."""
        self.gauges[name] = (help_text, read, combine)

    def snapshot(self) -> dict[str, Any]:
        """Every value now, as plain data (gauges read) that :func:`merge` adds to other workers' snapshots."""
        self.add_up_saved()
        out: dict[str, Any] = {}
        for family in FAMILIES:
            if family.attribute == "requests":
                series = {labels: sum(counts[:-1]) for labels, counts in self.requests.series.items()}
            elif family.attribute == "durations":
                series = _by_route_and_outcome(self.requests.series)
            else:
                series = getattr(self, family.attribute)
                if isinstance(series, Histogram):
                    series = series.series
            out[family.name] = [[*labels, value] for labels, value in series.items()] if family.labels else series
        out["gauges"] = {name: [help_text, read(), how] for name, (help_text, read, how) in self.gauges.items()}
        return out


def _by_route_and_outcome(series: Series) -> Series:
    out: Series = {}
    for (_, route, _, outcome), counts in series.items():
        total = out.get((route, outcome))
        out[(route, outcome)] = list(counts) if total is None else [a + b for a, b in zip(total, counts, strict=True)]
    return out


class Family:
    """How one metric is exposed: its name (without ``_total``), type, help, labels, the :class:`Metrics`
    attribute holding it and, for histograms, the bucket bounds."""

    __slots__ = ("attribute", "bounds", "help", "kind", "labels", "name")

    def __init__(
        self, name: str, kind: str, help_text: str, labels: tuple[str, ...], attribute: str, bounds: Any = None
    ) -> None:
        self.name, self.kind, self.help, self.labels = name, kind, help_text, labels
        self.attribute, self.bounds = attribute, bounds


FAMILIES = (
    Family(
        "llm_cache_requests",
        "counter",
        "Proxied requests by upstream, route, model and cache outcome.",
        ("upstream", "route", "model", "outcome"),
        "requests",
    ),
    Family(
        "llm_cache_request_duration_seconds",
        "histogram",
        "Time to the whole response, by route and cache outcome.",
        ("route", "outcome"),
        "durations",
        DURATION_BUCKETS_S,
    ),
    Family(
        "llm_cache_first_byte_seconds",
        "histogram",
        "Time to the first byte of streamed answers (replayed hits and relayed misses), by route and outcome.",
        ("route", "outcome"),
        "first_bytes",
        DURATION_BUCKETS_S,
    ),
    Family(
        "llm_cache_upstream_responses",
        "counter",
        "Upstream responses by upstream and HTTP status code (error: no response).",
        ("upstream", "status"),
        "upstream_responses",
    ),
    Family(
        "llm_cache_upstream_first_byte_seconds",
        "histogram",
        "Time from sending a request upstream to its response headers.",
        ("upstream",),
        "upstream_first_bytes",
        DURATION_BUCKETS_S,
    ),
    Family(
        "llm_cache_redis_operation_duration_seconds",
        "histogram",
        "Redis round trips by operation (one per batch of the same event-loop turn).",
        ("operation",),
        "redis_durations",
        REDIS_BUCKETS_S,
    ),
    Family(
        "llm_cache_redis_errors",
        "counter",
        "Redis operations that failed (a read then is a miss).",
        ("operation",),
        "redis_errors",
    ),
    Family(
        "llm_cache_tokens_saved",
        "counter",
        "Tokens of answers served from the cache instead of the upstream, by model and kind (input, output).",
        ("model", "kind"),
        "tokens",
    ),
    Family(
        "llm_cache_cost_saved_usd",
        "counter",
        "What the answers served from the cache would have cost upstream, in USD, from the pricing table.",
        ("model",),
        "cost_usd",
    ),
    Family(
        "llm_cache_client_requests",
        "counter",
        "Requests admitted by each client key, by its name.",
        ("client",),
        "clients",
    ),
    Family(
        "llm_cache_coalesced_requests",
        "counter",
        "Requests answered by joining an identical request already in flight (the COALESCED requests).",
        (),
        "coalesced",
    ),
    Family("llm_cache_stores", "counter", "Answers written to the cache.", (), "stores"),
    Family("llm_cache_stored_bytes", "counter", "Bytes of answers written to the cache.", (), "stored_bytes"),
)
