"""The health rule, the state file, `backupd health` and the status endpoint."""

from __future__ import annotations

import dataclasses
import json
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from backupd import health
from backupd.config import BackupConfig, Config, RedisConfig
from backupd.health import DaemonState, Tracker, Verdict, evaluate
from backupd.metrics import Metrics
from backupd.web import StatusServer
from tests.conftest import run_cli

T0 = 1_800_000_000.0
HOUR = 3600.0


def state(**changes: object) -> DaemonState:
    base = DaemonState(started_at=T0, first_due=T0 + HOUR, updated_at=T0)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("st", "now", "expected"), [
    # fresh success
    (state(last_success=T0 + 2 * HOUR, last_success_id="X"), T0 + 3 * HOUR, ("ok", True)),
    # no success yet, but nothing could have succeeded: first run at +1h, max_age 2h
    (state(), T0 + 2.9 * HOUR, ("starting", True)),
    # a failed first run does not fail health within the grace either
    (state(last_error="boom", last_error_at=T0 + HOUR), T0 + 2 * HOUR, ("starting", True)),
    # grace over without any success
    (state(last_error="boom", last_error_at=T0 + HOUR), T0 + 3.1 * HOUR, ("stale", False)),
    # an old success from before a restart: same grace, then stale
    (state(last_success=T0 - 10 * HOUR), T0 + HOUR, ("starting", True)),
    (state(last_success=T0 - 10 * HOUR), T0 + 3.5 * HOUR, ("stale", False)),
    # success aged past max_age
    (state(last_success=T0 + HOUR), T0 + 3.5 * HOUR, ("stale", False)),
    (state(stopped_at=T0 + 5), T0 + 6, ("stopped", False)),
])
def test_health_rule(st: DaemonState, now: float, expected: tuple[str, bool]) -> None:
    verdict = evaluate(st, now, max_age=2 * HOUR)
    assert (verdict.status, verdict.ok) == expected


def test_stale_reason_names_age_and_last_error() -> None:
    verdict = evaluate(state(last_success=T0 + HOUR, last_error="Redis is down",
                             last_error_at=T0 + 3 * HOUR), T0 + 4 * HOUR, max_age=2 * HOUR)
    assert "3h old" in verdict.reason
    assert "Redis is down" in verdict.reason


def test_heartbeat_only_checked_when_asked() -> None:
    st = state(last_success=T0, updated_at=T0)
    assert evaluate(st, T0 + 200, max_age=HOUR).ok
    verdict = evaluate(st, T0 + 200, max_age=HOUR, stale_after=health.STALE_AFTER_S)
    assert verdict.status == "unresponsive"


def test_state_file_round_trip_is_private(tmp_path: Path) -> None:
    path = tmp_path / health.STATE_FILE
    original = state(last_success=T0 + 1, last_success_id="20260107T120000Z-abcdef",
                     last_error="x", last_error_at=T0 + 2, consecutive_failures=3)
    health.write_state(path, original)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert health.read_state(path) == original
    assert health.read_state(tmp_path / "nope") is None
    path.write_text('{"format": 1, "started_at": 5}')
    with pytest.raises(ValueError, match="not a valid state file"):
        health.read_state(path)


def cfg(tmp_path: Path) -> Config:
    return Config(redis=RedisConfig(data_dir=str(tmp_path / "data")),
                  backup=BackupConfig(dir=str(tmp_path / "backups")))


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[redis]\ndata_dir = "{tmp_path / "data"}"\n'
                    f'[backup]\ndir = "{tmp_path / "backups"}"\n'
                    '[metrics]\nmax_age = "2h"\n')
    return path


def test_health_command(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    missing = run_cli("-c", str(config_path), "health")
    assert missing.returncode == 1
    assert "the daemon has not written its state yet" in missing.stdout
    assert len(missing.stdout.strip().splitlines()) == 1

    (tmp_path / "backups").mkdir()
    now = time.time()
    health.write_state(health.state_path(cfg(tmp_path)),
                       DaemonState(started_at=now - 60, updated_at=now, last_success=now - 30,
                                   last_success_id="20260107T120000Z-abcdef"))
    ok = run_cli("-c", str(config_path), "health")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("healthy (ok): last successful backup 20260107T120000Z-abcdef")


def test_check_reports_unreadable_and_unresponsive(tmp_path: Path) -> None:
    config = cfg(tmp_path)
    path = health.state_path(config)
    path.parent.mkdir()
    path.write_text("{")
    assert health.check(config).status == "unreadable"
    health.write_state(path, state(last_success=T0, updated_at=T0))
    assert health.check(config, now=T0 + 1000) == Verdict(
        False, "unresponsive", "the daemon has not updated its state for 16m40s "
        "(since 2027-01-15T08:00:00Z): is it running?")


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http only
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def test_status_server_serves_metrics_and_healthz() -> None:
    metrics = Metrics()
    started = time.time() - 3 * HOUR
    tracker = Tracker(DaemonState(started_at=started, first_due=started + 60), None)
    server = StatusServer("127.0.0.1:0", metrics, tracker, max_age=60.0)
    try:
        base = f"http://{server.address}"
        code, body, content_type = get(f"{base}/metrics")
        assert code == 200
        assert content_type.startswith("text/plain")
        assert b'backupd_backups_total{outcome="failure"} 0.0' in body
        assert b"backupd_build_info{version=" in body
        code, body, _ = get(f"{base}/healthz")  # no success 3h after start: stale
        assert code == 503
        document = json.loads(body)
        assert document["status"] == "stale"
        assert set(document) >= {"status", "reason", "last_success", "last_error", "next_run"}
        tracker.update(last_success=time.time(), last_success_id="A")
        code, body, _ = get(f"{base}/healthz")
        assert (code, json.loads(body)["status"]) == (200, "ok")
        assert get(f"{base}/nope")[0] == 404
    finally:
        server.close()
