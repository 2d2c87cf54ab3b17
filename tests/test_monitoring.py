"""deploy/monitoring: the Grafana dashboard and the Prometheus alert rules read only what the agent
exports, and they are well formed (every query parses as PromQL)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_redirect.adapters.kube import RestartReason
from ztunnel_redirect.adapters.ops import (
    CniInstallResult,
    Held,
    Metrics,
    ReconcileKind,
    WatchEventType,
)
from ztunnel_redirect.core.drift import DriftKind
from ztunnel_redirect.core.errors import KernelError

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
DASHBOARD = MONITORING / "dashboard.json"
ALERTS = MONITORING / "alerts.yaml"

# Grafana's variables, as Grafana would substitute them, so that a query is plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}
DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+")
ALERT_NAME = re.compile(r"[A-Z][A-Za-z0-9]+")


def exported_names() -> set[str]:
    """Every sample name of a real registry's exposition, with each recorder used once (some
    series only appear once recorded)."""
    m = Metrics()
    m.set_pods_enrolled(1)
    m.observe_reconcile(ReconcileKind.ADD, 0.001)
    m.count_repair(DriftKind.MISSING_RULE)
    m.count_failure(KernelError("x"))
    m.count_given_up(KernelError("x"))
    m.mark_pass()
    m.count_watch_restart("pods", RestartReason.EXPIRED)
    m.set_ztunnel_connections(1)
    for kind in Held:
        m.follow_held(kind, lambda: 1)
    m.count_replay_refused()
    m.observe_cni_add(0.01)
    m.count_plugin_request(200)
    m.count_watch_event("pods", WatchEventType.ADD)
    m.cni_install_verified(installed=True)
    m.cni_install_failed(CniInstallResult.CREATE_CNI_CONFIG_FAILURE)
    text = generate_latest(m.registry).decode()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


EXPORTED = exported_names()


def selected_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (ValueError when it does not parse)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_exposition_has_istios_and_our_names() -> None:
    assert {
        "istio_cni_install_ready",
        "istio_cni_installs_total",
        "istio_cni_plugin_requests_total",
        "nodeagent_reconcile_events_total",
        "ztunnel_connected",
        "ztunnel_redirect_pods_enrolled",
    } <= EXPORTED


@pytest.mark.parametrize("expr", dashboard_queries())
def test_every_dashboard_query_parses_and_names_only_exported_metrics(expr: str) -> None:
    names = selected_metrics(grafana_to_promql(expr))
    assert names, f"no metric in {expr!r}"
    assert names <= EXPORTED, f"not exported by the agent: {sorted(names - EXPORTED)}"


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    match = re.fullmatch(r"label_values\((\w+), instance\)", variables["instance"]["definition"])
    assert match is not None
    assert match[1] in EXPORTED
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_the_dashboard_shows_every_istio_metric() -> None:
    shown = set().union(*(selected_metrics(grafana_to_promql(q)) for q in dashboard_queries()))
    assert {
        "istio_cni_install_ready",
        "istio_cni_installs_total",
        "istio_cni_plugin_requests_total",
        "nodeagent_reconcile_events_total",
        "ztunnel_connected",
    } <= shown


def test_the_alert_rules_are_well_formed() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert set(group) == {"name", "rules"}
        assert group["rules"]
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        name = rule["alert"]
        assert ALERT_NAME.fullmatch(name), name
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert "for" not in rule or DURATION.fullmatch(rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert all(isinstance(text, str) for text in rule["annotations"].values()), name


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_parses_and_names_only_exported_metrics(rule: dict[str, Any]) -> None:
    names = selected_metrics(rule["expr"])
    assert names, rule["alert"]
    assert names <= EXPORTED, f"not exported by the agent: {sorted(names - EXPORTED)}"


@pytest.mark.parametrize(
    "metric",
    [
        "ztunnel_redirect_last_successful_pass_timestamp_seconds",  # stale drift pass
        "ztunnel_redirect_failures_total",  # failures
        "ztunnel_connected",  # ztunnel disconnected
        "istio_cni_install_ready",  # CNI not installed
    ],
)
def test_the_alerts_cover(metric: str) -> None:
    assert any(metric in selected_metrics(rule["expr"]) for rule in alert_rules())


def test_a_query_naming_an_unknown_metric_is_caught() -> None:
    assert selected_metrics("rate(istio_cni_repair_pods_repaired_total[5m])") - EXPORTED
    with pytest.raises(ValueError, match="parenthesis"):
        selected_metrics("sum(rate(ztunnel_connected[5m])")
