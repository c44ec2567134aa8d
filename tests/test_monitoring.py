"""Tests for deploy/prometheus and deploy/grafana: the alert rules and the dashboard.

promtool (Debian's ``prometheus`` package, which .ci/run installs) checks the rules, runs their
unit tests on synthetic series and parses every dashboard query; without it those tests skip
and say so. Every metric name the rules and the dashboard use must be one a running keeper
serves on /metrics, with a gateway, a relayed order, local COD and a reconnect behind it so
that the series carrying labels exist.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deribit_keeper.config import HttpConfig
from deribit_keeper.simulator import Simulator
from deribit_keeper.supervisor import Keeper

from .conftest import RESEARCH, LogLines, keeper_config
from .gateway_support import gateway_account, local_client, ready_and_listening, until, upstream
from .test_http import http

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "deribit-keeper.rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "deribit-keeper.rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "deribit-keeper.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install --no-install-recommends "
    "prometheus; .ci/run does): the rules and the dashboard's PromQL are not checked",
)

# Metrics the rules are written against that the keeper does not export yet: what each must be.
# Series Prometheus makes itself, not the keeper.
PROMETHEUS_OWN = {"up"}
# The alerts the issue asks for, by what they watch.
REQUIRED_ALERTS = {
    "DeribitKeeperAccountNotReady",  # not ready for more than 30 s
    "DeribitKeeperCodNotConfirmed",  # COD not confirmed ...
    "DeribitKeeperCodDrift",  # ... or drifted
    "DeribitKeeperReconnectStorm",
    "DeribitKeeperInboundSilence",  # more than 2 heartbeat intervals
    "DeribitKeeperTokenRefreshFailing",
    "DeribitKeeperLocalCodFired",
    "DeribitKeeperDown",
    "DeribitKeeperAbsent",
}
KEEPER_WIDE = {"DeribitKeeperDown", "DeribitKeeperAbsent"}  # no account to name
MOST_IMPORTANT = {"DeribitKeeperAccountNotReady", "DeribitKeeperCodNotConfirmed"}
REQUIRED_PANELS = {
    "Accounts ready": "stat",
    "State per account": "state-timeline",
    "COD confirmed per account": "state-timeline",
    "Reconnects by reason": "timeseries",
    "Seconds since the last inbound message": "timeseries",
    "Request latency by method": "timeseries",
    "Gateway links": "timeseries",
    "Relayed requests": "timeseries",
    "Local COD cancellations": "timeseries",
}
# What Grafana puts in for its variables, so a query becomes plain PromQL.
GRAFANA_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$account": ".*",
}

Doc = dict[str, Any]


def rules() -> list[Doc]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> Doc:
    found: Doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return found


def panels() -> list[Doc]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, then the variables' queries
    (``label_values(EXPR, label)`` is Grafana's, and only its EXPR is PromQL)."""
    found = [t["expr"] for p in panels() for t in p["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+?)(?:,\s*\w+)?\)", text.strip())
            found.append(match[1] if match else text)
    return found


def plain(expr: str) -> str:
    for variable, value in GRAFANA_VALUES.items():
        expr = expr.replace(variable, value)
    return expr


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "offset", "bool"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers,
    ranges, grouping label lists and function names are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    grouping = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    text = re.sub(grouping, " ", text)
    names = re.findall(r"\b([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {n for n in names if n.lower() not in _KEYWORDS}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# ---- the rules, by themselves ----------------------------------------------------------------


def test_the_rules_cover_what_the_issue_asks_for() -> None:
    """Every required alert is there, each with a severity, a summary and a description; all
    but the keeper-wide ones name the account in both."""
    found = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert set(found) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(found)
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert summary and len(description) > 100, name  # long enough to say what to do
        if name not in KEEPER_WIDE:
            assert "$labels.account" in summary and "$labels.account" in description, name
    assert found["DeribitKeeperLocalCodFired"]["labels"]["severity"] == "info"


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    """``promtool check rules`` finds every rule of the file valid."""
    result = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """``promtool test rules`` passes the rules' unit tests, which cover the two that matter
    most (an account not ready, COD not confirmed)."""
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    assert {c["alertname"] for c in cases if c.get("exp_alerts")} >= MOST_IMPORTANT  # fires
    assert {c["alertname"] for c in cases if not c.get("exp_alerts")} >= MOST_IMPORTANT  # not
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_metric_names_are_read_from_promql() -> None:
    """The name extraction the exported-name tests rely on sees through PromQL's syntax."""
    expr = (
        'sum by (job, account) (increase(a_total{reason="x", b="c{d}"}[15m])) > 0 or '
        "b_seconds > on (account) group_left 2 * c unless d offset 5m and bool e"
    )
    assert metric_names(expr) == {"a_total", "b_seconds", "c", "d", "e"}
    assert metric_names('histogram_quantile(0.99, sum(rate(h_bucket{a=~"$x"}[1m])) by (le))') == {
        "h_bucket"
    }


# ---- the dashboard, by itself ----------------------------------------------------------------


def test_the_dashboard_imports_with_a_prometheus_input_and_an_account_variable() -> None:
    """As Grafana 10/11 exports it: a DS_PROMETHEUS input every query uses, instance and
    account variables from label_values, unique panel ids, and every panel the issue names."""
    board = dashboard()
    (source,) = board["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    wanted = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["account"]["definition"].startswith("label_values(")
    assert variables["account"]["datasource"] == wanted
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    required = {r["id"] for r in board["__requires"] if r["type"] == "panel"}
    for panel in panels():
        assert panel["type"] in required, panel["title"]
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == wanted and target["expr"], panel["title"]
    kinds = {p["title"]: p["type"] for p in panels()}
    for title, kind in REQUIRED_PANELS.items():
        assert kinds.get(title) == kind, title
    per_account = [p for p in panels() if "account" in json.dumps(p["targets"])]
    assert all('account=~\\"$account\\"' in json.dumps(p["targets"]) for p in per_account)


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, parses (as a recording rule for
    ``promtool check rules``)."""
    queries = dashboard_queries()
    recorded = [{"record": f"dashboard:query{i}", "expr": plain(q)} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    result = promtool("check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


# ---- against a running keeper's /metrics -----------------------------------------------------


async def exported_names(nursery: trio.Nursery, sim: Simulator, log_lines: LogLines) -> set[str]:
    """The metric names a keeper's /metrics serves after a busy start: a gateway with a local
    link that relayed an order and died with local COD on, and an upstream reconnect.

    Sample names as served (``_total``, ``_bucket``, ``_count``, ``_sum``), plus the names of
    the ``# TYPE`` lines (a histogram's only with its sample suffixes), so that a family whose
    labelled series have not appeared yet still counts.
    """
    config = keeper_config(gateway_account(sim))
    config = dataclasses.replace(config, http=HttpConfig("127.0.0.1", 0))
    keeper = Keeper(config, rng=random.Random(7), environ={})
    await nursery.start(partial(keeper.run, handle_signals=False))
    await until(keeper, ready_and_listening(keeper))
    async with local_client(keeper.gateways["main"]) as engine:
        await engine.auth(RESEARCH)
        await engine.result("private/enable_cancel_on_disconnect")
        await engine.buy()
        await engine.abort()
    await until(keeper, lambda: bool(log_lines.events("gateway.cod_fired")))
    await sim.drop(upstream(sim), abrupt=True)
    await until(keeper, lambda: keeper.sessions["main"].reconnects == 1)
    await until(keeper, ready_and_listening(keeper))
    assert keeper.http_port is not None
    text = (await http(keeper.http_port, "/metrics")).body.decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        if kind == "histogram":  # a histogram's own name selects nothing
            names.update(name + suffix for suffix in ("_bucket", "_count", "_sum"))
        elif kind == "summary":
            names.update(name + suffix for suffix in ("", "_count", "_sum"))
        else:
            names.add(name)
    return names


async def test_every_metric_the_rules_use_is_exported(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Each rule selects only series a running keeper serves (or Prometheus's own ``up``)."""
    exported = await exported_names(nursery, sim, log_lines)
    unknown = {
        rule["alert"]: used
        for rule in rules()
        if (used := metric_names(rule["expr"]) - exported - PROMETHEUS_OWN)
    }
    assert not unknown
    assert all(metric_names(rule["expr"]) for rule in rules())


async def test_every_metric_the_dashboard_uses_is_exported(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    sim: Simulator,
    log_lines: LogLines,
) -> None:
    """Each dashboard query, variables included, selects only series a running keeper serves."""
    exported = await exported_names(nursery, sim, log_lines)
    used = {q: metric_names(q) for q in dashboard_queries()}
    assert all(used.values())
    unknown = {q: names - exported for q, names in used.items() if names - exported}
    assert not unknown
