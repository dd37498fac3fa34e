"""The alert rules and dashboards against the metrics the code defines (issue 11).

Every PromQL expression of deploy/prometheus/alerts.yml and of every Grafana panel parses
(promql-parser), and names only metrics observability.metrics defines (or the Temporal SDK's,
or Prometheus' own `up`), with only their labels. Both plans' alert tables are there with
their thresholds and severities, each rule with a summary and a runbook line.
`promtool check rules` runs where promtool is installed (Debian: `apt-get install prometheus`),
and the compose overlay validates where docker-compose is (both skip, saying so, otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from observability.metrics import DEFINED, TEMPORAL_SDK_METRICS

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels every scraped series has or a histogram query needs, beyond a metric's own.
IMPLICIT_LABELS = {"le", "instance", "job", "__name__"}
PROMETHEUS_BUILTINS = {"up": ("instance", "job")}
KNOWN: dict[str, tuple[str, ...]] = {**DEFINED, **TEMPORAL_SDK_METRICS, **PROMETHEUS_BUILTINS}
SEVERITIES = {"critical", "warning"}
TOOL_TIMEOUT_S = 120

# alert -> severity: the credit terminal plan's table, then the wallet migration plan's.
REQUIRED_ALERTS = {
    "TigerBeetleNodeDown": "critical",
    "TigerBeetleQuorumLost": "critical",
    "TigerBeetleHighLatency": "warning",
    "LedgerSyncLagCritical": "critical",
    "LedgerSyncLagWarning": "warning",
    "TerminalErrorRateHigh": "warning",
    "WalletErrorRateHigh": "warning",
    "ReconciliationMatchRatioLow": "critical",
    "ReadFallbackRateHigh": "warning",
    "BacklogAgeGrowing": "warning",
    "ReconciliationNotRun": "warning",
    "MigrationAutoRollback": "critical",
}
# alert -> a threshold its expression must state (the plans' numbers).
THRESHOLDS = {
    "TigerBeetleHighLatency": "> 0.05",
    "LedgerSyncLagCritical": "> 300",
    "LedgerSyncLagWarning": "> 60",
    "TerminalErrorRateHigh": "> 0.001",
    "WalletErrorRateHigh": "> 0.001",
    "ReconciliationMatchRatioLow": "< 0.9999",
    "ReadFallbackRateHigh": "> 0.001",
}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    found = [rule for group in groups for rule in group["rules"]]
    assert found
    return found


def panel_exprs() -> list[tuple[str, str]]:
    """(dashboard/panel title, expr) of every panel target."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name}/{panel['title']}", target["expr"]))
    return out


def base_name(name: str) -> str:
    if name in KNOWN:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in KNOWN:
            return name[: -len(suffix)]
    return name


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """The metric selectors of `expr` (name, labels matched) and every grouping label."""
    found: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            found.append((node.name, {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit, None)
    return found, grouping


def check_expr(where: str, expr: str) -> None:
    found, grouping = selectors(expr)
    assert found, f"{where}: {expr!r} names no metric"
    labels_seen: set[str] = set()
    for name, matched in found:
        base = base_name(name)
        assert base in KNOWN, f"{where}: {name} is not a metric the code defines"
        allowed = set(KNOWN[base]) | IMPLICIT_LABELS
        assert matched <= allowed, f"{where}: {name} has no label {matched - allowed}"
        labels_seen |= allowed
    assert grouping <= labels_seen, f"{where}: grouping by {grouping - labels_seen}"


def test_every_alert_expression_parses_and_names_defined_metrics() -> None:
    for rule in rules():
        check_expr(rule["alert"], rule["expr"])


def test_every_dashboard_query_parses_and_names_defined_metrics() -> None:
    assert {p.name for p in DASHBOARDS} == {
        "migration.json", "credit-terminal.json", "temporal-workers.json"}
    exprs = panel_exprs()
    assert len(exprs) >= 20
    for where, expr in exprs:
        check_expr(where, expr)


def test_the_plans_alerts_are_there_with_severity_summary_and_runbook() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    for name, severity in REQUIRED_ALERTS.items():
        assert name in by_name, f"missing alert {name}"
        assert by_name[name]["labels"]["severity"] == severity, name
    for name, threshold in THRESHOLDS.items():
        assert threshold in by_name[name]["expr"], (name, threshold)
    for rule in by_name.values():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        notes = rule["annotations"]
        assert len(notes["summary"]) > 10 and len(notes["runbook"]) > 20, rule["alert"]


def test_the_migration_dashboard_compares_the_stores_per_operation() -> None:
    board = json.loads((ROOT / "deploy/grafana/dashboards/migration.json").read_text())
    text = json.dumps(board)
    for operation in ("balance", "balances", "credit", "debit", "void"):
        assert f'operation=\\"{operation}\\"' in text, operation
    assert "walletmig_migration_phase" in text and "walletmig_reconciliation_match_ratio" in text


def test_metric_names_are_bounded_and_prefixed() -> None:
    forbidden = {"client_id", "wallet", "transaction_id", "client", "txn"}
    for name, labels in DEFINED.items():
        assert name.startswith("walletmig_"), name
        assert not forbidden & set(labels), (name, labels)


def test_promtool_check_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus): rules parsed by "
                    "promql-parser only")
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # The rules' unit tests: they fire on the plans' thresholds, not below (alerts_test.yml).
    done = subprocess.run([promtool, "test", "rules", str(ALERTS.with_name("alerts_test.yml"))],
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    embedded = ROOT / "deploy" / "prometheus" / "prometheus-embedded.yml"
    done = subprocess.run([promtool, "check", "config", str(embedded)], capture_output=True,
                          text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_with_the_observability_overlay_is_valid() -> None:
    from test_compose import DUMMY_ENV

    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed: overlay not validated")
    env = {**os.environ, **DUMMY_ENV, "GRAFANA_ADMIN_PASSWORD": "dummy-grafana"}
    done = subprocess.run(
        [compose, "-f", "docker-compose.yml", "-f", "deploy/observability.yml", "config", "-q"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
