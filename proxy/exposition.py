"""Add up the metric snapshots of a process group's workers and render them as Prometheus text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .metrics import FAMILIES, MIN, Family


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One snapshot of the whole group: counters and histogram buckets added, gauges combined as each says."""
    merged: dict[str, Any] = {family.name: {} if family.labels else 0 for family in FAMILIES}
    gauges: dict[str, list[Any]] = {}
    for snapshot in snapshots:
        for family in FAMILIES:
            value = snapshot.get(family.name)
            if value is None:
                continue
            if not family.labels:
                merged[family.name] += value
                continue
            series = merged[family.name]
            for *labels, number in value:
                key = tuple(labels)
                series[key] = _add(series.get(key), number)
        for name, (help_text, number, how) in snapshot.get("gauges", {}).items():
            if name not in gauges:
                gauges[name] = [help_text, number, how]
            elif how == MIN:
                gauges[name][1] = min(gauges[name][1], number)
            else:
                gauges[name][1] += number
    merged["gauges"] = gauges
    return merged


def _add(total: Any, value: Any) -> Any:
    if total is None:
        return list(value) if isinstance(value, list) else value
    if isinstance(value, list):
        return [a + b for a, b in zip(total, value, strict=True)]
    return total + value


def render(merged: dict[str, Any]) -> bytes:
    """The Prometheus text exposition of a (merged) snapshot."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, Metric

    def families() -> list[Metric]:
        out = [_family(family, merged[family.name]) for family in FAMILIES]
        out.extend(
            GaugeMetricFamily(name, help_text, value=value)
            for name, (help_text, value, _) in sorted(merged["gauges"].items())
        )
        return out

    class Snapshot:
        def collect(self) -> list[Metric]:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


def _family(family: Family, value: Any) -> Any:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    if family.kind == "counter" and not family.labels:
        return CounterMetricFamily(family.name, family.help, value=value)
    if family.kind == "counter":
        counter = CounterMetricFamily(family.name, family.help, labels=family.labels)
        for labels, number in sorted(value.items()):
            counter.add_metric(labels, number)
        return counter
    histogram = HistogramMetricFamily(family.name, family.help, labels=family.labels)
    bounds = [*(_le(bound) for bound in family.bounds), "+Inf"]
    for labels, counts in sorted(value.items()):
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, counts[:-1], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        histogram.add_metric(labels, buckets, counts[-1])
    return histogram


def _le(bound: float) -> str:
    return repr(float(bound))
