"""A system clock that jumps backwards between backups: ids keep increasing in the order the
backups were made, and retention never deletes a newer backup for an older one.

The clock cannot be changed on this machine: backups are made in-process by the real action
functions (run_cycle: backup, then prune) with backupd.manifest.now_utc patched to a crafted
clock, against a real Redis.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from backupd import config as config_mod
from backupd import manifest as mf
from backupd.actions import cycle
from backupd.actions.catalog import catalog
from backupd.actions.prune import prune_location
from backupd.retention import Policy
from backupd.storage.local import LocalStorage
from tests.conftest import PASSWORD, RedisServer, write_config
from tests.faults.harness import fault_case, populate


class Clock:
    def __init__(self) -> None:
        self.now = mf.now_utc()

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(mf, "now_utc", fake)
    monkeypatch.setattr(cycle, "now_utc", fake)
    return fake


def run(config: config_mod.Config) -> cycle.CycleResult:
    return cycle.run_cycle(config, prune=config.schedule.prune,
                           env={"REDIS_PASSWORD": PASSWORD})


@pytest.mark.parametrize(("policy", "newest_kept"), [
    ("keep_last = 3\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n", 3),
    ('keep_last = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nkeep_within = "2h"\n',
     None),
    ("keep_last = 2\nkeep_hourly = 2\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n", 2),
])
def test_clock_jumps_back_between_backups(tmp_path: Path, redis_server: RedisServer,
                                          clock: Clock, policy: str,
                                          newest_kept: int | None) -> None:
    """`newest_kept`: the backups made last that the policy keeps by count (None: from the
    jump on, nothing is deleted: every backup is newer than the clock, so none is outside
    keep_within)."""
    fault_case("clock jumps back between backups")
    populate(redis_server.port, 500, 32)
    backups = tmp_path / "backups"
    path = write_config(tmp_path / "c.toml", redis_server, backups, f"[retention]\n{policy}")
    config = config_mod.load(path, env={})
    start = clock.now
    made: list[str] = []
    # A clock three days ahead, then set right (three days back), then back by a minute.
    moments = [start + timedelta(days=3, hours=h) for h in range(3)]
    moments += [start + timedelta(minutes=m) for m in range(3)]
    moments += [start + timedelta(minutes=1)]
    listed: list[str] = []
    for n, moment in enumerate(moments):
        clock.now = moment
        result = run(config)
        made.append(result.manifest.id)
        assert made == sorted(made), "ids must increase in the order backups are made"
        before, listed = listed, [m.id for m in LocalStorage(backups).listing().manifests]
        if newest_kept is None:
            assert n < 3 or set(listed) == {*before, made[-1]}, (made, listed)
        else:
            assert set(made[-newest_kept:]) <= set(listed), (made, listed)
        if newest_kept == 3:  # keep_last alone: exactly the last three made
            assert sorted(listed) == made[-3:]
    assert catalog([LocalStorage(backups)]).find("latest").manifest.id == made[-1]
    created = [LocalStorage(backups).read_manifest(i).created_at for i in listed]
    assert created == sorted(created, reverse=True)


def test_prune_with_a_clock_behind_every_backup(tmp_path: Path, redis_server: RedisServer,
                                                clock: Clock) -> None:
    """keep_within is anchored on the newest backup that is not in the future: with the clock
    behind all of them, nothing is old enough to go."""
    fault_case("clock behind every backup at prune time")
    populate(redis_server.port, 200, 32)
    backups = tmp_path / "backups"
    path = write_config(tmp_path / "c.toml", redis_server, backups,
                        '[retention]\nkeep_last = 0\nkeep_daily = 0\nkeep_weekly = 0\n'
                        'keep_monthly = 0\nkeep_within = "1h"\n\n[schedule]\nprune = false\n')
    config = config_mod.load(path, env={})
    start = clock.now
    for hours in (0, 5, 10):
        clock.now = start + timedelta(hours=hours)
        run(config)
    storage = LocalStorage(backups)
    report = prune_location(storage, Policy.from_config(config.retention),
                            now=start - timedelta(days=30))
    assert report.ok and report.deleted == []
    assert len(storage.listing().manifests) == 3
