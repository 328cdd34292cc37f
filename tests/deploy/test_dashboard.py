"""The Grafana dashboard: its JSON, the chart's ConfigMap that carries it, and its queries against what the proxy
exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from fakeredis import FakeAsyncRedis, FakeServer
from prometheus_client.parser import text_string_to_metric_families

from tests.support import chat_body

from .support import CHART_DIR, FULLNAME, NAMESPACE, Render

pytestmark = pytest.mark.deploy

RenderFn = Callable[[Mapping[str, Any]], Render]

DASHBOARD = CHART_DIR / "dashboards" / "llm-cache-proxy.json"
CONFIG_MAP = f"{FULLNAME}-dashboard"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Words of PromQL that look like metric names but are not: operators, modifiers and special values.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "Inf", "NaN", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS_AND_RANGES = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]


def metric_names(expr: str) -> set[str]:
    """The metric names an instant or range PromQL expression reads: what is left once strings, label matchers,
    ranges, `by (...)`-style label lists, function names and keywords are set aside."""
    bare = _STRING.sub('""', expr)
    bare = _MATCHERS_AND_RANGES.sub(" ", bare)
    bare = _LABEL_LISTS.sub(" ", bare)
    return {name for name in _NAME.findall(bare) if name not in PROMQL_WORDS}


def dashboard_metric_names(dashboard: Mapping[str, Any]) -> set[str]:
    """Every metric name in the panels' queries and the template variables' `label_values(...)`."""
    names = {name for panel in query_panels(dashboard) for t in panel["targets"] for name in metric_names(t["expr"])}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            names |= set(_LABEL_VALUES.findall(variable["query"]["query"]))
    return names


def test_dashboard_is_absent_when_not_enabled(rendered: dict[str, Render]) -> None:
    for name, result in rendered.items():
        if not result.values.get("metrics", {}).get("dashboard", {}).get("enabled"):
            assert CONFIG_MAP not in [d["metadata"]["name"] for d in result.of_kind("ConfigMap")], name


def test_config_map_carries_the_dashboard_byte_for_byte_when_enabled(rendered: dict[str, Render]) -> None:
    config_map = rendered["standalone-full"].one("ConfigMap", CONFIG_MAP)
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert config_map["data"] == {"llm-cache-proxy.json": DASHBOARD.read_text(encoding="utf-8")}


def test_config_map_goes_where_grafana_looks_when_namespace_and_labels_are_set(render: RenderFn) -> None:
    dashboard = {"enabled": True, "namespace": "monitoring", "labels": {"grafana_dashboard": None, "dash": "yes"}}
    config_map = render({"metrics": {"dashboard": dashboard}}).one("ConfigMap", CONFIG_MAP)
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["dash"] == "yes"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert "annotations" not in config_map["metadata"]


def test_dashboard_asks_for_a_prometheus_datasource_when_imported() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] == "llm-cache-proxy" and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # A `${DS_...}` input is only filled in by the import dialog; the dashboard sidecar would leave it unresolved.
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text(encoding="utf-8")
    for name in ("namespace", "job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_every_panel_queries_the_chosen_datasource_when_loaded() -> None:
    dashboard = load_dashboard()
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    panels = query_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            # Every query follows the filters, so a selection narrows every panel alike.
            assert all(f'{v}=~"${v}"' in target["expr"] for v in ("namespace", "job", "instance")), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le, outcome) (rate(a_bucket{outcome="x y", job=~"$job"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(b_bucket[5m])))", {"b_bucket"}),
        (
            '(sum(increase(c_total{k="or"}[$__range])) or vector(0)) / sum(d_total offset 1h) * 3600',
            {"c_total", "d_total"},
        ),
        ("e_total / on (instance) group_left (model) f", {"e_total", "f"}),
        ("up", {"up"}),
    ],
)
def test_metric_names_are_found_when_expressions_nest(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


async def test_dashboard_reads_only_exported_metrics_when_the_proxy_served_traffic(
    fake_upstream: TestServer, proxy_for: Callable[..., Any]
) -> None:
    redis_server = FakeServer()
    # Without replica single-flight: its lease release does not wait for Redis, and when Redis is gone its
    # failure would surface late, as an unretrieved future, in whichever test runs next.
    client = await proxy_for(
        fake_upstream, redis_client=FakeAsyncRedis(server=redis_server), replica_single_flight=False
    )
    # A miss and a hit, plain and streamed, with usage for the tokens and money saved; an upstream failure.
    for body in (chat_body("dashboard plain"), chat_body("dashboard streamed", stream=True)):
        for _ in range(2):
            async with client.post("/v1/chat/completions", json=body) as response:
                assert response.status == 200
                await response.read()
    async with client.post("/v1/chat/completions", json=chat_body("fail:500")) as response:
        assert response.status == 500
    redis_server.connected = False
    async with client.post("/v1/chat/completions", json=chat_body("dashboard without redis")) as response:
        assert response.status == 200
    async with client.get("/metrics") as response:
        text = await response.text()
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    used = dashboard_metric_names(load_dashboard())
    assert used >= {"llm_cache_requests_total", "llm_cache_redis_errors_total", "llm_cache_cost_saved_usd_total"}
    assert used - exported == set()
