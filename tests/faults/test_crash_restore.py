"""Crash consistency of `backupd restore` (command method): SIGKILL at each step.

After each kill, Redis's files are the previous ones or the restored ones, never a mix (one
moment excepted by design: between "move aside" and "rename in" the previous files sit complete
in the pre-restore directory, recorded by the journal, and Redis is down); a Redis that answers
holds exactly the previous data or exactly the backup. Then `backupd restore --rollback` puts
the previous data back with nothing left over, and (slow) the next `backupd restore` either
completes or says that `--rollback` is needed first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_until, write_config
from tests.faults import harness
from tests.faults.harness import (
    STATS,
    Service,
    cli,
    contents,
    in_bgsave,
    info,
    populate,
    redis_client,
    run_killed_at,
    sha256,
)

RESTORE_POINTS = ("restore-fetch", "restore-staged", "restore-snapshot", "restore-quiescing",
                  "restore-stopping", "restore-stopped", "restore-swapping", "restore-moved",
                  "restore-swapped", "restore-restarting", "restore-started", "restore-done")
FAST_POINTS = ("restore-moved", "restore-started")
# Recovery by the next restore, one point per distinct outcome: nothing changed yet, refused
# until --rollback (before and after the swap), completed on its own (Redis runs the backup).
NEXT_RESTORE_POINTS = ("restore-staged", "restore-stopping", "restore-moved",
                       "restore-swapped", "restore-started", "restore-done")
OLD, NEW = b"old-data-marker", b"backup-data-marker"
SAVE = "3600 1"

Data = dict[tuple[int, bytes], bytes]


@dataclass
class Scene:
    service: Service
    config: Path
    backup_id: str
    restored_sha: str
    old: Data
    new: Data
    aof: bool = False

    @property
    def entries(self) -> list[str]:
        """What a restore replaces in the data dir."""
        return ["dump.rdb", "appendonlydir"] if self.aof else ["dump.rdb"]


def make_old(service: Service) -> Data:
    client = redis_client(service.port)
    try:
        client.flushall()
        client.set(OLD, b"1")
    finally:
        client.close()
    populate(service.port, 500, 40, prefix="old")
    # A restore's safety BGSAVE or Redis's own may still run after a kill: SAVE would fail.
    wait_until(lambda: not in_bgsave(service.port), 30, "Redis's background save to end")
    client = redis_client(service.port)
    try:
        client.save()  # Redis's own file holds its data, as after any save
        if client.config_get("appendonly") in ({"appendonly": "yes"}, {b"appendonly": b"yes"}):
            client.bgrewriteaof()  # and so does its AOF (no history of the backup's data)
            wait_until(lambda: not any(int(info(service.port, "persistence")[k]) for k in (
                "aof_rewrite_in_progress", "aof_rewrite_scheduled")), 30, "the AOF rewrite")
    finally:
        client.close()
    return contents(service.port)


def make_scene(tmp_path: Path, services: Callable[..., Service], aof: bool) -> Scene:
    # save points: a restore must not leave them off
    service = services("--save", SAVE, "--appendonly", "yes" if aof else "no")
    client = redis_client(service.port)
    client.set(NEW, b"1")
    client.close()
    populate(service.port, 25_000, 48, prefix="orig", random_values=True)  # > 1 MiB stored
    new = contents(service.port)
    config = write_config(tmp_path / "c.toml", service.server, tmp_path / "backups",
                          service.restore_section())
    proc = cli(config, "backup", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    backup_id = proc.stdout.strip().splitlines()[-1]
    manifest = json.loads((tmp_path / "backups" / f"{backup_id}.json").read_text())
    old = make_old(service)
    return Scene(service, config, backup_id, manifest["raw_sha256"], old, new, aof)


@pytest.fixture
def scene(tmp_path: Path, services: Callable[..., Service]) -> Scene:
    return make_scene(tmp_path, services, aof=False)


def kind(path: Path, scene: Scene) -> str:
    """'restored' (the backup's RDB, or an AOF dir based on it), 'old' (Redis's previous
    data) or 'MIXED'."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    if any(sha256(f) == scene.restored_sha for f in files):
        return "restored"
    data = b"".join(f.read_bytes() for f in files)
    return "old" if OLD in data and NEW not in data else "MIXED"


def journal(scene: Scene) -> tuple[Path, dict[str, object]] | None:
    found = sorted(scene.service.dir.glob(".backupd-pre-restore-*/restore.json"), reverse=True)
    if not found:
        return None
    return found[0].parent, json.loads(found[0].read_text())


def assert_no_mix(scene: Scene, point: str) -> str:
    """The state right after a kill; returns what Redis's files hold."""
    found = journal(scene)
    states = set()
    for name in scene.entries:
        path = scene.service.dir / name
        if path.exists():
            states.add(kind(path, scene))
        else:  # only between moving aside and renaming in, with the journal saying so
            assert found is not None and found[1]["state"] == "swapping", (point, found)
            assert kind(found[0] / name, scene) == "old", point
            states.add("aside")
    assert len(states) == 1 and "MIXED" not in states, (point, states)
    (state,) = states
    if scene.service.answers():
        wait_until(scene.service.ready, 30, "redis to finish loading")
        data = contents(scene.service.port)
        assert data in (scene.old, scene.new), f"{point}: Redis holds a mix"
        if data == scene.new:
            assert state == "restored", point
    return state


def assert_recovered_old(scene: Scene) -> None:
    assert scene.service.answers(), "Redis is down after the rollback"
    assert contents(scene.service.port) == scene.old
    assert scene.service.restore_leftovers() == [], scene.service.restore_leftovers()
    client = redis_client(scene.service.port)
    try:
        assert client.config_get("save") in ({"save": SAVE}, {b"save": SAVE.encode()})
    finally:
        client.close()


def rollback(scene: Scene) -> None:
    had_journal = journal(scene) is not None
    proc = cli(scene.config, "restore", "--rollback", "--yes")
    harness.no_traceback(proc.stderr)
    if had_journal:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode == 1 and "nothing to roll back" in proc.stderr, proc.stderr
    if not scene.service.answers():  # killed while Redis was down and nothing was swapped
        scene.service.start()
    assert_recovered_old(scene)


def kill_restore(scene: Scene, point: str) -> str:
    run_killed_at(scene.config, point, "restore", scene.backup_id, "--yes")
    STATS["restore_kills"] += 1
    return assert_no_mix(scene, point)


def restore_again(scene: Scene) -> Data:
    """The next restore completes, or names `--rollback`; either way the backup ends up in.
    Returns the data Redis held right before the restore that completed (what a rollback
    brings back)."""
    before = contents(scene.service.port) if scene.service.ready() else None
    proc = cli(scene.config, "restore", scene.backup_id, "--yes")
    harness.no_traceback(proc.stderr)
    if proc.returncode != 0:
        assert proc.returncode == 1, proc.stderr[-3000:]
        error = harness.last_event(proc.stderr)["error"]
        assert "interrupted restore" in error and "--rollback" in error, error
        rollback(scene)
        before = scene.old
        proc = cli(scene.config, "restore", scene.backup_id, "--yes")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert contents(scene.service.port) == scene.new
    assert [p.startswith(".backupd-pre-restore-") for p in scene.service.restore_leftovers()] \
        == [True]
    assert before in (scene.old, scene.new)
    return before


def reset(scene: Scene, expected: Data) -> None:
    """Undo the completed restore (back to `expected`), then make the data old again."""
    proc = cli(scene.config, "restore", "--rollback", "--yes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert contents(scene.service.port) == expected
    assert scene.service.restore_leftovers() == []
    if expected != scene.old:
        assert make_old(scene.service) == scene.old


@pytest.mark.parametrize("point", FAST_POINTS)
def test_kill_restore_then_rollback(scene: Scene, point: str) -> None:
    kill_restore(scene, point)
    rollback(scene)


@pytest.mark.slow
def test_kill_restore_at_every_step(scene: Scene) -> None:
    """Every step recovered with --rollback; some recovered by the next restore."""
    states = {}
    for point in RESTORE_POINTS:
        states[point] = kill_restore(scene, point)
        rollback(scene)
    for point in NEXT_RESTORE_POINTS:
        kill_restore(scene, point)
        reset(scene, restore_again(scene))
    assert states["restore-stopped"] == "old" and states["restore-swapped"] == "restored"
    assert states["restore-moved"] == "aside"


@pytest.mark.slow
def test_kill_rollback(scene: Scene) -> None:
    """A rollback killed half-way is finished by the next rollback."""
    for point in ("rollback-stopped", "rollback-put-back"):
        proc = cli(scene.config, "restore", scene.backup_id, "--yes")
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_killed_at(scene.config, point, "restore", "--rollback", "--yes")
        STATS["restore_kills"] += 1
        assert_no_mix(scene, point)
        rollback(scene)


@pytest.mark.slow
def test_kill_restore_with_aof(tmp_path: Path, services: Callable[..., Service]) -> None:
    """appendonly yes: the RDB and the AOF directory are swapped together, never one alone."""
    scene = make_scene(tmp_path, services, aof=True)
    for point in ("restore-stopped", "restore-moved", "restore-swapped", "restore-started",
                  "restore-done"):
        kill_restore(scene, point)
        rollback(scene)
