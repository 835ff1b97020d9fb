"""`restore.method = "replicaof"`: a live restore through a throwaway server, with no stop/start
and no file access; a failure after the REPLICAOF rolls back from the safety snapshot; a target
in cluster mode, or older than the throwaway server, is refused before anything changes, one
that cannot reach the throwaway is released untouched; a restore SIGKILLed at any step leaves
old or new data, reported by `backup`/`restore` and undone by `restore --rollback`."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from backupd.actions.restore.live_journal import LIVE_DIR
from tests.conftest import RedisServer, free_port, matrix_server, wait_until, write_config
from tests.faults import harness
from tests.faults.harness import STATS, cli, contents, fault_case, populate, run_killed_at, spawn

Data = dict[tuple[int, bytes], bytes]
# Before anything changed; the journal saved; right after REPLICAOF; synced; released.
LIVE_POINTS = ("restore-fetch", "restore-staged", "restore-live-replicating",
               "restore-replicaof", "restore-live-synced", "restore-live-released")
FAST_LIVE_POINTS = ("restore-replicaof", "restore-live-synced")


def live_config(tmp_path: Path, server: RedisServer, extra: str = "") -> Path:
    return write_config(tmp_path / "live.toml", server, tmp_path / "backups",
                        '[restore]\nmethod = "replicaof"\nstart_timeout = "5s"\n' + extra)


def backed_up(tmp_path: Path, server: RedisServer) -> tuple[Path, dict[tuple[int, bytes], bytes]]:
    populate(server.port, 3000, 64, prefix="orig")
    populate(server.port, 50, 16, prefix="orig", db=2)
    expected = contents(server.port)
    config = live_config(tmp_path, server)
    ran = cli(config, "backup")
    assert ran.returncode == 0, ran.stderr[-2000:]
    client = server.client()
    client.flushall()
    client.set("written:after", "the backup")
    client.close()
    return config, expected


def test_replicaof_restore_replaces_the_data_live(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    client = server.client()
    client.config_set("masterauth", "the-targets-own")
    config, expected = backed_up(tmp_path, server)
    run_id = client.info("server")["run_id"]
    ran = cli(config, "restore", "latest", "--yes")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert contents(server.port) == expected
    assert client.info("server")["run_id"] == run_id  # never stopped
    assert client.info("replication")["role"] == "master"
    assert client.config_get("masterauth")["masterauth"] == "the-targets-own"
    assert "3050 keys (live, by replicaof)" in ran.stdout
    client.set("writable", "again")  # a master again


def test_a_failed_sync_rolls_back_from_the_safety_snapshot(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("replicaof restore: the throwaway server dies during the sync")
    server = redis_factory()
    config, _ = backed_up(tmp_path, server)
    before = contents(server.port)
    marker = tmp_path / "paused"
    spawned = spawn(config, "restore", "latest", "--yes",
                    env={"BACKUPD_PAUSE_AT": "restore-replicaof",
                         "BACKUPD_PAUSE_FILE": str(marker)})
    wait_until(lambda: marker.exists() or spawned.proc.poll() is not None, 60, "the pause")
    assert spawned.proc.poll() is None, spawned.output()[1][-2000:]
    (throwaway,) = [pid for pid in harness.children(spawned.proc.pid)
                    if "redis" in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(throwaway, signal.SIGKILL)
    marker.unlink()
    # The rollback goes the same path: it passes the same point, and goes on.
    wait_until(lambda: marker.exists() or spawned.proc.poll() is not None, 60, "the rollback")
    marker.unlink(missing_ok=True)
    code = spawned.wait(60)
    _, err = spawned.output()
    assert code == 1, err[-2000:]
    assert "the throwaway server stopped answering during the sync" in err
    assert "rolled back: the target has its previous data again" in err
    assert contents(server.port) == before
    assert server.client().info("replication")["role"] == "master"


def test_a_target_in_cluster_mode_is_refused(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    source = redis_factory(name="source")
    config, _ = backed_up(tmp_path, source)
    target = redis_factory("--cluster-enabled", "yes", "--cluster-config-file",
                           str(tmp_path / "nodes.conf"), "--cluster-port", str(free_port()),
                           name="cluster")
    config.write_text(config.read_text().replace(f"port = {source.port}",
                                                 f"port = {target.port}"))
    ran = cli(config, "restore", "latest", "--yes")
    assert ran.returncode == 1
    assert "cluster mode, where REPLICAOF is not allowed" in ran.stderr
    assert target.client().info("replication")["role"] == "master"


def test_a_throwaway_server_newer_than_the_target_is_refused(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    newer = matrix_server("redis-8.2")
    server = redis_factory()
    config, _ = backed_up(tmp_path, server)
    config.write_text(config.read_text().replace(
        "[restore]", f'[verify]\nredis_server = "{newer.binary}"\n[restore]'))
    ran = cli(config, "restore", "latest", "--yes")
    assert ran.returncode == 1, ran.stderr[-2000:]
    assert "newer than the target" in ran.stderr
    assert contents(server.port) == {(0, b"written:after"): b"the backup"}


def test_a_target_that_cannot_reach_the_throwaway_is_refused_untouched(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("replicaof restore: the target cannot reach the throwaway's address")
    server = redis_factory()
    config, _ = backed_up(tmp_path, server)
    client = server.client()
    client.config_set("masterauth", "the-targets-own")
    before = contents(server.port)
    marker = tmp_path / "paused"
    spawned = spawn(config, "restore", "latest", "--yes",
                    env={"BACKUPD_PAUSE_AT": "restore-live-replicating",
                         "BACKUPD_PAUSE_FILE": str(marker)})
    wait_until(lambda: marker.exists() or spawned.proc.poll() is not None, 60, "the pause")
    assert spawned.proc.poll() is None, spawned.output()[1][-2000:]
    # From here backupd needs no new connection to the target: no new descriptor for the
    # target, so its connection to the throwaway fails, as to a wrong announce host.
    assert server.proc is not None
    server_pid = server.proc.pid
    limits = resource.prlimit(server_pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server_pid, resource.RLIMIT_NOFILE, (lowest_free_fd(server_pid), limits[1]))
    try:
        marker.unlink()
        code = spawned.wait(60)
    finally:
        resource.prlimit(server_pid, resource.RLIMIT_NOFILE, limits)
    err = spawned.output()[1]
    assert code == 1, err[-2000:]
    assert "cannot reach that address" in err
    assert "restore.replicaof_announce_host" in err and "Nothing was changed" in err
    assert contents(server.port) == before
    assert client.info("replication")["role"] == "master"
    assert client.config_get("masterauth")["masterauth"] == "the-targets-own"
    assert not (tmp_path / "backups" / LIVE_DIR).exists()


def lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def wait_settled(port: int) -> None:
    """Until the target answers data commands (a replica may still load what it received)."""
    def settled() -> bool:
        try:
            return not int(harness.info(port, "persistence")["loading"])
        except redis.exceptions.BusyLoadingError:
            return False
    wait_until(settled, 60, "the target to finish loading")


def throwaway_gone(journal: Path) -> bool:
    host, port = json.loads(journal.read_text())["throwaway"].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def kill_live_restore_and_roll_back(tmp_path: Path, server: RedisServer, config: Path,
                                    old: Data, new: Data, point: str) -> None:
    run_killed_at(config, point, "restore", "latest", "--yes")
    STATS["restore_kills"] += 1
    live = tmp_path / "backups" / LIVE_DIR
    journal = live / "restore.json"
    wait_settled(server.port)
    data = contents(server.port)
    assert data in (old, new), f"{point}: the target holds a mix"
    if not journal.exists():  # killed before the REPLICAOF: nothing changed
        assert data == old, point
        assert server.client().info("replication")["role"] == "master", point
    else:
        assert stat.S_IMODE(live.stat().st_mode) == 0o700, point
        for path in (journal, live / "safety" / "dump.rdb"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, (point, path)
        assert "the-targets-own" in journal.read_text()  # what --rollback puts back
        wait_until(lambda: throwaway_gone(journal), 30, "the throwaway to die with backupd")
        backup = cli(config, "backup", "--no-prune")
        assert "interrupted live restore" in backup.stderr, (point, backup.stderr[-2000:])
        again = cli(config, "restore", "latest", "--yes")
        assert again.returncode == 1, (point, again.stderr[-2000:])
        assert "interrupted live restore" in again.stderr and "--rollback" in again.stderr
        if point == "restore-replicaof":
            assert "READ-ONLY replica of the throwaway server" in again.stderr, again.stderr
        rolled = cli(config, "restore", "--rollback", "--yes")
        harness.no_traceback(rolled.stderr)
        assert rolled.returncode == 0, (point, rolled.stderr[-3000:])
        assert "holds its previous data again" in rolled.stdout
        assert contents(server.port) == old, point
    client = server.client()
    assert client.info("replication")["role"] == "master", point
    assert client.config_get("masterauth")["masterauth"] == "the-targets-own", point
    assert not journal.exists(), point
    client.set("writable", "again")
    client.delete("writable")


def live_scene(tmp_path: Path, server: RedisServer) -> tuple[Path, Data, Data]:
    server.client().config_set("masterauth", "the-targets-own")
    populate(server.port, 20_000, 64, prefix="new", random_values=True)
    new = contents(server.port)
    config = live_config(tmp_path, server)
    ran = cli(config, "backup", "--no-prune")
    assert ran.returncode == 0, ran.stderr[-2000:]
    client = server.client()
    client.flushall()
    client.close()
    populate(server.port, 500, 32, prefix="old")
    return config, contents(server.port), new


@pytest.mark.parametrize("point", FAST_LIVE_POINTS)
def test_kill_a_live_restore_then_roll_back(
        tmp_path: Path, redis_factory: Callable[..., RedisServer], point: str) -> None:
    server = redis_factory()
    config, old, new = live_scene(tmp_path, server)
    kill_live_restore_and_roll_back(tmp_path, server, config, old, new, point)


@pytest.mark.slow
def test_kill_a_live_restore_anywhere(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    """At every step: old or new data, never a mix; the leftover detected and repaired."""
    server = redis_factory()
    config, old, new = live_scene(tmp_path, server)
    for point in LIVE_POINTS:
        kill_live_restore_and_roll_back(tmp_path, server, config, old, new, point)
