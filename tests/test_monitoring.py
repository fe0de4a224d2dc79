"""The Grafana dashboard and the Prometheus alert rules in docs/: well-formed, and naming
only metrics that a real server's ``/metrics`` exposes.

``promtool`` (Debian's ``prometheus`` package) also checks every expression's
PromQL when it is installed; without it, the structure and the names are checked.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import TIMEOUT, serve
from tidings.config import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
ALERTS = DOCS / "prometheus-alerts.yaml"
# Metric names as PromQL writes them; Tidings' own and the process collector's.
NAME = re.compile(r"\b(?:tidings|process)_[a-z0-9_]+\b")
# What Grafana puts in for its variables, for a PromQL parser that knows none.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its variables."""
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [p for item in items for p in [item, *panels(item.get("panels", []))]]

    expressions = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            expressions.append(variable["definition"])
    return expressions


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert graphs
    for panel in graphs:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_alert_rules_have_the_structure_prometheus_loads() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert group["name"]
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", rule["alert"])
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])
    names = {rule["alert"] for rule in alert_rules()}
    # What the operations issue asks to be woken for.
    assert {
        "TidingsChangeFeedDown",
        "TidingsReadinessFlapping",
        "TidingsSlowConsumerStorm",
    } <= names


@pytest.mark.e2e
async def test_every_metric_the_dashboard_and_the_alerts_name_is_exposed() -> None:
    async with serve(Settings(dev=True)) as url, httpx.AsyncClient(timeout=TIMEOUT) as http:
        response = await http.get(url.replace("ws://", "http://").removesuffix("/ws") + "/metrics")
    exposed = set()
    for family in text_string_to_metric_families(response.text):
        exposed.add(family.name)  # the name without _total, _bucket, _sum, _count
        exposed.update(sample.name for sample in family.samples)
    expressions = dashboard_expressions() + [rule["expr"] for rule in alert_rules()]
    named = {name for expression in expressions for name in NAME.findall(expression)}
    assert named, "no metric found in the expressions"
    assert sorted(named - exposed) == []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_every_dashboard_expression(tmp_path: Path) -> None:
    def check(path: Path) -> None:
        done = subprocess.run(
            ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr

    check(ALERTS)
    # Each dashboard query as a recording rule: promtool parses its PromQL.
    rules = []
    for n, expression in enumerate(dashboard_expressions()):
        for variable, stand_in in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, stand_in)
        if expression.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        rules.append({"record": f"tidings:dashboard_{n}", "expr": expression})
    recorded = tmp_path / "dashboard-rules.yaml"
    recorded.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check(recorded)
