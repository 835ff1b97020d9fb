"""`redis.source = "replication"`: the snapshot read over the replication protocol, with no data
volume. A backup made so restores the very data (every server of the matrix, both framings);
every way the stream can go wrong ends in a prompt, clear failure that keeps nothing."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, RedisServer, unzstd, wait_until, write_config
from tests.faults import harness
from tests.faults.harness import (
    cli,
    complete_local,
    contents,
    fault_case,
    leftovers,
    populate,
    run_killed_at,
)
from tests.faults.replproxy import repl_proxy

DISKLESS = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
DISK = ("--repl-diskless-sync", "no")
FRAMINGS = {"eof": DISKLESS, "length": DISK}


def repl_config(tmp_path: Path, server: RedisServer, port: int | None = None,
                read_timeout: str = "10s", extra: str = "") -> Path:
    """A config with source = replication whose data_dir does not exist: nothing may need it."""
    config = write_config(tmp_path / "repl.toml", server, tmp_path / "backups", extra)
    text = config.read_text().replace(
        f'data_dir = "{server.dir}"',
        f'source = "replication"\ndata_dir = "{tmp_path / "no-such-volume"}"\n'
        f'read_timeout = "{read_timeout}"')
    if port is not None:
        text = text.replace(f"port = {server.port}", f"port = {port}")
    config.write_text(text)
    return config


def nothing_kept(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    assert complete_local(backups) == {}
    assert leftovers(backups) == [] if backups.exists() else True


def load(tmp_path: Path, redis_factory: Callable[..., RedisServer], manifest: dict[str, object],
         binary: str) -> RedisServer:
    """A new server started on the backup's RDB, as a restore would leave it."""
    raw = unzstd((tmp_path / "backups" / str(manifest["artifact"])).read_bytes())
    data = tmp_path / "restored"
    data.mkdir()
    (data / "dump.rdb").write_bytes(raw)
    return redis_factory("--dbfilename", "dump.rdb", name="restored", binary=binary)


@pytest.mark.matrix
@pytest.mark.parametrize("framing", sorted(FRAMINGS))
def test_a_replication_backup_restores_identical_data(
        tmp_path: Path, redis_factory: Callable[..., RedisServer], framing: str) -> None:
    server = redis_factory(*FRAMINGS[framing])
    populate(server.port, 30_000, 200, random_values=True)
    populate(server.port, 500, 16, prefix="other", db=3)
    expected = contents(server.port)
    ran = cli(repl_config(tmp_path, server), "backup")
    assert ran.returncode == 0, ran.stderr[-3000:]
    (manifest,) = complete_local(tmp_path / "backups").values()
    info = harness.info(server.port, "replication")
    assert manifest["source"] == "replication"
    assert manifest["keys"] == 30_500 and manifest["keys_per_db"] == {"db0": 30_000,
                                                                      "db3": 500}
    repl = manifest["replication"]
    assert repl["role"] == "master" and repl["framing"] == framing
    assert repl["master_replid"] == info["master_replid"]
    assert repl["repl_offset_exact"] and 0 <= repl["master_repl_offset"] <= int(
        info["master_repl_offset"])
    assert repl["rdb_only"] is True
    assert not (tmp_path / "no-such-volume").exists()
    assert contents(load(tmp_path, redis_factory, manifest, server.binary).port) == expected
    # rdb-only: the master forgot the "replica" once the RDB was sent.
    wait_until(lambda: int(harness.info(server.port, "replication")["connected_slaves"]) == 0,
               10, "the replication client to be gone")


def test_acl_without_sync_is_refused_naming_the_grants(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("replication source: ACL user without +sync")
    server = redis_factory(*DISKLESS)
    populate(server.port, 100)
    admin = server.client()
    admin.acl_setuser("backup", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                      commands=["+ping", "+info", "+config|get", "+replconf"])
    config = repl_config(tmp_path, server)
    config.write_text(config.read_text().replace("[redis]\n", '[redis]\nusername = "backup"\n'))
    ran = cli(config, "backup")
    assert ran.returncode == 1, ran.stderr[-2000:]
    harness.no_traceback(ran.stderr)
    assert "may not run SYNC" in ran.stderr and "+sync +replconf" in ran.stderr
    nothing_kept(tmp_path)
    admin.acl_setuser("backup", enabled=True, commands=["-replconf"])
    ran = cli(config, "backup")
    assert ran.returncode == 1 and "may not run REPLCONF" in ran.stderr
    admin.acl_setuser("backup", enabled=True, commands=["+replconf", "+sync"])  # +psync not needed
    ran = cli(config, "backup")
    assert ran.returncode == 0, ran.stderr[-2000:]
    (manifest,) = complete_local(tmp_path / "backups").values()
    assert manifest["keys"] == 100 and manifest["replication"]["repl_offset_exact"] is False
    assert "replication_no_psync" in ran.stderr


@pytest.mark.parametrize("mode", ["stall", "cut", "flip", "drop"])
@pytest.mark.parametrize("framing", sorted(FRAMINGS))
def test_a_broken_stream_fails_promptly_and_keeps_nothing(
        tmp_path: Path, redis_factory: Callable[..., RedisServer], mode: str,
        framing: str) -> None:
    fault_case(f"replication stream ({framing} framing): {mode} mid-transfer")
    server = redis_factory(*FRAMINGS[framing])
    populate(server.port, 20_000, 200, random_values=True)
    with repl_proxy(server.port, mode=mode, after=1_000_000, drop=1000) as proxy:
        started = time.monotonic()
        ran = cli(repl_config(tmp_path, server, proxy.port, read_timeout="1s"), "backup")
        took = time.monotonic() - started
    harness.no_traceback(ran.stderr)
    nothing_kept(tmp_path)
    if mode in ("stall", "cut") or (mode, framing) == ("drop", "length"):
        # (bytes missing from a stream of announced length: it never reaches its end)
        assert ran.returncode == 1, ran.stderr[-2000:]
        why = "the connection was closed" if mode == "cut" else \
            "not even a keepalive) for redis.read_timeout 1s"
        assert why in ran.stderr and "nothing was kept" in ran.stderr, ran.stderr[-1500:]
        assert took < 15
    else:  # corrupt, or bytes missing before the end mark: the RDB's CRC64 says so
        assert ran.returncode == 3, ran.stderr[-2000:]
        assert "checksum" in ran.stderr.lower() or "crc" in ran.stderr.lower()


def test_keepalives_keep_a_slow_disk_based_sync_alive(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    """A disk-based sync: the master sends bare newlines while its BGSAVE runs (here ~4 s,
    longer than read_timeout 2s): those count as life, the backup completes."""
    server = redis_factory(*DISK)
    populate(server.port, 2000)
    harness.set_save_delay(server.port, 2000)  # 2 ms per key
    ran = cli(repl_config(tmp_path, server, read_timeout="2s"), "backup")
    assert ran.returncode == 0, ran.stderr[-2000:]
    (manifest,) = complete_local(tmp_path / "backups").values()
    assert manifest["keys"] == 2000 and manifest["replication"]["framing"] == "length"
    assert manifest["duration_s"] > 2


def test_a_server_without_rdb_only_gets_a_full_sync_closed_after_the_rdb(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("replication source: server without REPLCONF rdb-only")
    server = redis_factory(*DISKLESS)
    populate(server.port, 1000)
    expected = contents(server.port)
    # The proxy renames the option: the real server answers as a pre-7.0 one does.
    with repl_proxy(server.port, rewrite=(b"rdb-only", b"rdb-xxxx")) as proxy:
        ran = cli(repl_config(tmp_path, server, proxy.port), "backup")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "replication_no_rdb_only" in ran.stderr
    (manifest,) = complete_local(tmp_path / "backups").values()
    assert manifest["replication"]["rdb_only"] is False
    assert contents(load(tmp_path, redis_factory, manifest, server.binary).port) == expected


def test_the_diskless_sync_delay_is_logged_with_the_hint(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "2")
    populate(server.port, 100)
    ran = cli(repl_config(tmp_path, server), "backup")
    assert ran.returncode == 0, ran.stderr[-2000:]
    events = {e.get("event"): e for e in map(_json, ran.stderr.splitlines()) if e}
    assert events["replication_sync_delay"]["seconds"] == 2
    assert "repl-diskless-sync-delay 0" in events["replication_sync_delay"]["hint"]
    assert events["replication_waited"]["seconds"] >= 1.5


def test_another_replicas_sync_in_progress_is_joined(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    """Disk-based: a second full sync that starts while one runs joins its BGSAVE (Redis
    attaches it), so both backups complete and hold the same snapshot."""
    server = redis_factory(*DISK)
    populate(server.port, 2000)
    harness.set_save_delay(server.port, 1000)
    first = repl_config(tmp_path, server)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = repl_config(second_dir, server)
    out: list[subprocess.CompletedProcess[str]] = []
    runner = threading.Thread(target=lambda: out.append(cli(first, "backup")))
    runner.start()
    wait_until(lambda: harness.in_bgsave(server.port), 20, "the first sync's save")
    ran = cli(second, "backup")
    runner.join(60)
    assert ran.returncode == 0 and out[0].returncode == 0, ran.stderr[-2000:]
    (one,) = complete_local(tmp_path / "backups").values()
    (two,) = complete_local(second_dir / "backups").values()
    assert one["raw_sha256"] == two["raw_sha256"]
    assert int(harness.info(server.port, "persistence")["rdb_saves"]) == 1


@pytest.mark.parametrize("stage", ["snapshot", "copy", "compress", "manifest"])
def test_killed_anywhere_over_the_stream_leaves_no_false_backup(
        tmp_path: Path, redis_factory: Callable[..., RedisServer], stage: str) -> None:
    server = redis_factory(*DISKLESS)
    populate(server.port, 5000)
    config = repl_config(tmp_path, server)
    run_killed_at(config, stage, "backup")
    assert complete_local(tmp_path / "backups") == {}
    ran = cli(config, "backup")
    assert ran.returncode == 0, ran.stderr[-2000:]
    (manifest,) = complete_local(tmp_path / "backups").values()
    assert manifest["keys"] == 5000 and leftovers(tmp_path / "backups") == []


def _json(line: str) -> dict[str, object]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
