"""The daemon's jobs in-process: the restore drill for real, and what a run records on failure.

The scheduled drill runs on a crontab (minute resolution), so it is tested here through
Runner.drill rather than by waiting for a `backupd run` minute to come round.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from backupd import config as config_mod
from backupd import jobs, logs
from backupd.config import Config, NotifyConfig
from backupd.errors import UploadPending
from backupd.health import DaemonState, Tracker
from backupd.manifest import Manifest
from backupd.metrics import Metrics
from backupd.notify import Notifier
from backupd.storage.local import LocalStorage
from tests.conftest import PASSWORD, RedisServer, run_cli
from tests.httpcapture import CaptureServer


@dataclasses.dataclass
class Rig:
    config: Config
    metrics: Metrics
    tracker: Tracker
    hooks: CaptureServer
    state_path: Path

    def runner(self, **kwargs: Any) -> jobs.Runner:
        notifier = Notifier(NotifyConfig(webhook_url=f"{self.hooks.url}/hook", on_success=True,
                                         timeout=5.0))
        return jobs.Runner(self.config, self.metrics, self.tracker, notifier, **kwargs)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def events(self) -> list[str]:
        return [r.json()["event"] for r in self.hooks.received("POST", "/hook")]


@pytest.fixture
def rig(setup: tuple[Path, RedisServer, Path], tmp_path: Path) -> Iterator[Rig]:
    config_path, _, _ = setup
    with CaptureServer() as hooks:
        state_path = tmp_path / "state.json"
        yield Rig(config_mod.load(config_path, env={}), Metrics(),
                  Tracker(DaemonState(started_at=time.time()), state_path), hooks, state_path)


def newest(config: Config) -> Manifest:
    return LocalStorage(Path(config.backup.dir)).listing().manifests[0]


def test_drill_loads_the_latest_backup_into_a_throwaway_server(
        rig: Rig, setup: tuple[Path, RedisServer, Path]) -> None:
    made = run_cli("-c", str(setup[0]), "backup")
    assert made.returncode == 0, made.stderr
    rig.runner().drill()
    drilled = rig.sample("backupd_drill_last_success_timestamp_seconds")
    assert drilled is not None
    assert drilled > time.time() - 60
    assert rig.sample("backupd_drills_total", outcome="success") == 1
    assert rig.events() == ["drill_success"]


def test_failed_drill_is_notified_not_raised(rig: Rig) -> None:
    with structlog.testing.capture_logs() as logged:
        rig.runner().drill()  # no backup exists yet
    assert rig.events() == ["drill_failure"]
    assert [e["event"] for e in logged if e["log_level"] == "error"] == ["drill_failed"]
    assert rig.sample("backupd_drill_last_success_timestamp_seconds") == 0
    assert rig.sample("backupd_drills_total", outcome="failure") == 1
    assert rig.sample("backupd_drills_total", outcome="success") == 0


def test_drill_of_an_encrypted_backup_is_skipped(
        rig: Rig, setup: tuple[Path, RedisServer, Path]) -> None:
    import pyrage

    recipient = str(pyrage.x25519.Identity.generate().to_public())
    made = run_cli("-c", str(setup[0]), "backup",
                   env={"BACKUPD_BACKUP__AGE_RECIPIENTS": recipient})
    assert made.returncode == 0, made.stderr
    with structlog.testing.capture_logs() as logged:
        rig.runner().drill()
    assert [e["event"] for e in logged] == ["drill_skipped"]
    assert "is encrypted" in logged[0]["reason"]
    assert rig.events() == []


def test_committed_backup_with_failed_upload_is_fresh_but_a_failed_run(
        rig: Rig, setup: tuple[Path, RedisServer, Path]) -> None:
    assert run_cli("-c", str(setup[0]), "backup").returncode == 0
    manifest = newest(rig.config)

    def cycle(config: Config, *, on_backup: Any, **_: Any) -> Any:
        on_backup(manifest)
        raise UploadPending("S3 is unreachable; the backup is kept locally, pending")

    rig.runner(cycle=cycle).backup()
    assert rig.sample("backupd_backups_total", outcome="failure") == 1
    assert rig.sample("backupd_backups_total", outcome="success") == 0
    assert rig.sample("backupd_backup_keys") == manifest.keys
    state = rig.tracker.state
    assert state.last_success_id == manifest.id
    assert state.consecutive_failures == 1
    assert "S3 is unreachable" in state.last_error
    [failure] = [r.json() for r in rig.hooks.received("POST", "/hook")]
    assert (failure["event"], failure["backup_id"]) == ("backup_failure", manifest.id)


def test_a_bug_in_the_cycle_is_recorded_masked_and_survived(rig: Rig) -> None:
    logs.register_secret(PASSWORD)

    def cycle(config: Config, **_: Any) -> Any:
        raise RuntimeError(f"unexpected: password {PASSWORD}")

    runner = rig.runner(cycle=cycle)
    runner.backup()
    runner.backup()
    assert rig.sample("backupd_backups_total", outcome="failure") == 2
    state = rig.tracker.state
    assert state.consecutive_failures == 2
    assert state.last_error == "RuntimeError: unexpected: password ***"
    assert not state.running
    assert not runner.busy
    assert PASSWORD not in str([r.body for r in rig.hooks.requests])
    saved = rig.state_path.read_text()
    assert "unexpected: password ***" in saved
    assert PASSWORD not in saved


def test_a_stopping_runner_refuses_new_runs(rig: Rig) -> None:
    calls: list[str] = []
    runner = rig.runner(cycle=lambda *a, **k: calls.append("ran"))
    runner.stopping.set()
    runner.backup()
    assert calls == []
    assert rig.sample("backupd_last_attempt_timestamp_seconds") == 0
