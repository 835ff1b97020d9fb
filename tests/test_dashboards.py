"""deploy/: the Prometheus alerts pass `promtool test rules` on synthetic series, and the alerts
and the Grafana dashboard query only series that backupd's /metrics exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from backupd.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "backupd.json"
# Series Prometheus makes itself, not backupd.
SCRAPE_SERIES = {"up"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:  # make test installs it (Debian's prometheus package)
        pytest.fail("promtool is not installed: `make test` installs it (apt-get install "
                    "prometheus)")
    return found


def exposed() -> set[str]:
    """Every sample name /metrics serves (the daemon's StatusServer serves this registry)."""
    text = Metrics().exposition().decode()
    return {sample.name for family in text_string_to_metric_families(text)
            for sample in family.samples}


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        after = text[match.end():].lstrip()
        if after.startswith("(") or match.group().lower() in KEYWORDS:
            continue  # a function call or a keyword
        names.add(match.group())
    return names


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    exprs += [var["query"].split("(", 1)[1].rsplit(",", 1)[0]  # label_values(<series>, label)
              for var in board["templating"]["list"] if var["type"] == "query"]
    return exprs


def test_alert_rules_pass_their_promtool_tests() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]}
    assert names == {"BackupdBackupTooOld", "BackupdFailuresInARow", "BackupdUploadPendingTooLong",
                     "BackupdDrillFailing", "BackupdDown"}
    tested_names = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested_names == names  # every alert has a test


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_queries_name_only_series_that_metrics_exposes(source: str) -> None:
    exprs = alert_exprs() if source == "alerts" else dashboard_exprs()
    used = set().union(*(series_in(expr) for expr in exprs))
    assert used, exprs
    unknown = used - exposed() - SCRAPE_SERIES
    assert not unknown, f"{source} queries series /metrics does not expose: {sorted(unknown)}"


def test_the_dashboard_shows_what_operators_look_at() -> None:
    used = set().union(*(series_in(expr) for expr in dashboard_exprs()))
    for wanted in ("backupd_last_success_timestamp_seconds",
                   "backupd_backup_duration_seconds_bucket", "backupd_backup_size_bytes",
                   "backupd_backup_keys", "backupd_uploads_pending", "backupd_backups_total",
                   "backupd_drills_total",
                   "backupd_drill_last_success_timestamp_seconds"):
        assert wanted in used, wanted


def test_the_series_check_catches_a_misspelt_metric() -> None:
    assert series_in('time() - backupd_last_sucess_timestamp_seconds{job="x"} > 2 * 3600') == {
        "backupd_last_sucess_timestamp_seconds"}
    assert series_in('sum by (le) (rate(a_bucket[5m])) and on (job) b == 0') == {"a_bucket", "b"}
