"""dashboards/carbon-router.json is an importable Grafana dashboard whose every PromQL
expression names only metrics the router exposes (read from the registry after requests
through the fakes), so the dashboard cannot drift from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.service_kit import DEMO, chat, service_kit

DASHBOARD = ROOT / "dashboards" / "carbon-router.json"
# PromQL's functions, aggregations and keywords (what is not a metric name in an expression)
PROMQL = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate",
    "histogram_quantile", "label_values", "and", "or", "unless", "on", "ignoring", "offset",
    "clamp_min", "topk", "bottomk", "abs", "group_left", "group_right",
}  # fmt: skip


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var["query"]
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers, once label matchers, groupings,
    ranges, strings, numbers and Grafana's variables are taken out, that are no keyword."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", bare)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if w not in PROMQL}


async def exposed(tmp_path: Path) -> set[str]:
    """Every metric and sample name at /metrics after a whole and a streamed request."""
    async with service_kit(tmp_path) as kit:
        for stream in (False, True):
            r = await kit.client.post("/v1/chat/completions", json=chat(stream=stream),
                                      headers=DEMO)  # fmt: skip
            assert r.status_code == 200
        text = (await kit.client.get("/metrics")).text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def test_the_dashboard_is_importable_with_a_prometheus_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (ds,) = dashboard["__inputs"]
    assert ds["name"] == "DS_PROMETHEUS" and ds["pluginId"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("requests/s", "energy", "carbon (g/h)", "avoided", "cost", "binding",
                   "intensity", "price", "desired replicas", "p50 / p99"):  # fmt: skip
        assert wanted in titles


async def test_every_expression_names_only_metrics_the_router_exposes(tmp_path: Path) -> None:
    names = await exposed(tmp_path)
    used: set[str] = set()
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        found = metric_names(expr)
        assert found, f"no metric in {expr!r}"
        assert found <= names, f"{expr!r} names {sorted(found - names)}, not exposed"
        used |= found
    # the expressions were read, not skipped: these are on the dashboard
    assert {"router_requests_total", "router_decisions_total", "router_carbon_avoided_g_total",
            "router_request_seconds_bucket", "router_desired_replicas"} <= used  # fmt: skip


def test_a_misspelt_metric_would_be_caught() -> None:
    expr = 'sum by (region) (rate(router_carbon_avoided_total{region=~"$region"}[$__range]))'
    assert metric_names(expr) == {"router_carbon_avoided_total"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) * 3600") == {
        "x_bucket"
    }
