"""`restore.method = "replicaof"`: a live restore through a throwaway server, with no stop/start
and no file access; a failure after the REPLICAOF rolls back from the safety snapshot; a target
in cluster mode, or older than the throwaway server, is refused before anything changes."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import RedisServer, free_port, matrix_server, wait_until, write_config
from tests.faults import harness
from tests.faults.harness import cli, contents, fault_case, populate, spawn


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
