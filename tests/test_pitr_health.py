"""/healthz and `backupd health` fail when the point-in-time link lags past pitr.max_lag;
the metrics show the lag, the link, segments and bytes."""

from __future__ import annotations

import json
from dataclasses import replace

from backupd import health
from backupd.metrics import Metrics
from backupd.pitr.link import LinkStatus

NOW = 1_800_000_000.0


def _state(**changes: object) -> health.DaemonState:
    base = health.DaemonState(started_at=NOW - 600, last_success=NOW - 60,
                              last_success_id="20270115T080000Z-abcdef", updated_at=NOW)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_lag_past_max_lag_is_unhealthy() -> None:
    ok = health.evaluate(_state(pitr_max_lag=30.0, pitr_durable=NOW - 2), NOW, 7200)
    assert ok.ok
    late = health.evaluate(_state(pitr_max_lag=30.0, pitr_durable=NOW - 45), NOW, 7200)
    assert not late.ok and late.status == "pitr_lag" and "pitr.max_lag" in late.reason
    never = health.evaluate(_state(pitr_max_lag=30.0), NOW, 7200)
    assert not never.ok and "no durable second" in never.reason
    off = health.evaluate(_state(), NOW, 7200)
    assert off.ok


def test_the_state_file_carries_the_lag() -> None:
    state = _state(pitr_max_lag=30.0, pitr_durable=NOW - 45)
    parsed = health.DaemonState.from_json(json.loads(json.dumps(state.to_json())))
    assert parsed.pitr_max_lag == 30.0 and parsed.pitr_durable == NOW - 45
    # `backupd health` judges the lag as the daemon saw it at its last heartbeat
    verdict = health.evaluate(parsed, NOW + 100, 7200, stale_after=150)
    assert verdict.status == "pitr_lag"


def test_metrics_show_the_link() -> None:
    metrics = Metrics()
    status = LinkStatus(up=True, durable_time=None, segments=3, bytes=1234)
    metrics.watch_pitr(status, started=0.0)
    text = metrics.exposition().decode()
    assert "backupd_pitr_link_up 1.0" in text
    assert "backupd_pitr_segments 3.0" in text and "backupd_pitr_bytes 1234.0" in text
    status.up, status.durable_time = False, 2_000_000_000
    text = metrics.exposition().decode()
    assert "backupd_pitr_link_up 0.0" in text
    lag = float(next(line.split()[1] for line in text.splitlines()
                     if line.startswith("backupd_pitr_lag_seconds ")))
    assert lag < 0  # a durable second in the future of this test's clock: now - durable
