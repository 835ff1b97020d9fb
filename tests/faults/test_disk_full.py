"""Full disks, on real tmpfs mounts: the backup dir, and Redis's data dir.

A full backup dir gives a clean error (exit 1, no traceback), leaves no partial backup or temp
file behind and does not touch older backups; the free-space check refuses before BGSAVE when
the space is visibly short. A full Redis data dir is refused before BGSAVE too, or (when the
dump file on disk is too stale to show it) reported as a failed snapshot.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer, free_port, wait_until, write_config
from tests.faults import harness
from tests.faults.harness import (
    cli,
    complete_local,
    fault_case,
    free_bytes,
    in_bgsave,
    info,
    last_event,
    leftovers,
    populate,
    redis_client,
    snapshot_dir,
    tmpfs,
)

MiB = 1 << 20
PAGE = 4096


def older_backup(tmp_path: Path, server: RedisServer, into: Path) -> str:
    """Make one small backup elsewhere and copy it into `into`: an older backup to protect."""
    config = write_config(tmp_path / "older.toml", server, tmp_path / "older")
    proc = cli(config, "backup")
    assert proc.returncode == 0, proc.stderr
    for path in (tmp_path / "older").iterdir():
        if not path.name.startswith("."):
            shutil.copy2(path, into / path.name)
    return proc.stdout.strip().splitlines()[-1]


def add_random(server: RedisServer, mib: int) -> None:
    """`mib` MiB of incompressible values, not saved: dump.rdb on disk stays small."""
    populate(server.port, mib, MiB, prefix="big", random_values=True)


def assert_untouched(backups: Path, before: dict[str, str], older: str,
                     config: Path, allowed: frozenset[str] = frozenset()) -> None:
    lock = harness.LOCK
    assert {k: v for k, v in snapshot_dir(backups).items() if k != lock} == {
        k: v for k, v in before.items() if k != lock}
    assert set(leftovers(backups)) <= set(allowed), leftovers(backups)
    assert list(complete_local(backups)) == [older]
    ran = harness.cli_fast(config, "verify", "--all")
    assert ran.code == 0, ran.stdout


@pytest.fixture
def mounted(scratch: Path) -> Iterator[Callable[[str, int], Path]]:
    with contextlib.ExitStack() as stack:
        yield lambda name, size: stack.enter_context(tmpfs(scratch / name, size))


def test_backup_dir_too_small_refused_before_bgsave(
        tmp_path: Path, redis_server: RedisServer,
        mounted: Callable[[str, int], Path]) -> None:
    fault_case("disk: backup dir visibly too small")
    backups = mounted("small", 8 * MiB)
    populate(redis_server.port, 2000, 64)
    older = older_backup(tmp_path, redis_server, backups)
    config = write_config(tmp_path / "c.toml", redis_server, backups)
    before, saves = snapshot_dir(backups), info(redis_server.port)["rdb_saves"]
    proc = cli(config, "backup")
    assert proc.returncode == 1
    harness.no_traceback(proc.stderr)
    assert "not enough free space" in last_event(proc.stderr)["error"]
    assert info(redis_server.port)["rdb_saves"] == saves  # refused before BGSAVE
    assert_untouched(backups, before, older, config)


def test_backup_dir_fills_mid_write(tmp_path: Path, redis_server: RedisServer,
                                    mounted: Callable[[str, int], Path]) -> None:
    """The dump on disk is small and stale, so the check passes; the artifact does not fit."""
    fault_case("disk: backup dir fills while the artifact is written")
    backups = mounted("mid", 24 * MiB)
    populate(redis_server.port, 2000, 64)
    older = older_backup(tmp_path, redis_server, backups)
    add_random(redis_server, 30)
    config = write_config(tmp_path / "c.toml", redis_server, backups)
    before, free = snapshot_dir(backups), free_bytes(backups)
    proc = cli(config, "backup")
    assert proc.returncode == 1, proc.stderr
    harness.no_traceback(proc.stderr)
    assert "No space left on device" in last_event(proc.stderr)["error"]
    assert_untouched(backups, before, older, config)
    assert free_bytes(backups) == free  # nothing of the failed backup stays
    wait_until(lambda: not in_bgsave(redis_server.port), 30, "Redis's save to end")
    client = redis_client(redis_server.port)
    client.flushall()
    populate(redis_server.port, 1000, 64)
    client.save()  # the dump file shows the smaller dataset again
    client.close()
    proc = cli(config, "backup")  # room again: the next run works
    assert proc.returncode == 0, proc.stderr
    assert len(complete_local(backups)) == 2


def test_manifest_does_not_fit(tmp_path: Path, redis_server: RedisServer,
                               mounted: Callable[[str, int], Path]) -> None:
    """The artifact fits to the last page and the manifest does not: no backup and no
    orphaned artifact either (it would hold the space until the next run)."""
    fault_case("disk: the manifest write fails with ENOSPC")
    backups = mounted("exact", 48 * MiB)
    populate(redis_server.port, 2000, 64)
    older = older_backup(tmp_path, redis_server, backups)
    small_dump = (redis_server.dir / "dump.rdb").read_bytes()
    add_random(redis_server, 20)
    client = redis_client(redis_server.port)
    client.save()
    client.close()
    size = (redis_server.dir / "dump.rdb").stat().st_size  # what the backup's save will write
    (redis_server.dir / "dump.rdb").write_bytes(small_dump)  # stale again: the check passes
    config = write_config(tmp_path / "c.toml", redis_server, backups, 'compression = "none"')
    (backups / "other").mkdir()
    filler = free_bytes(backups) - -(-size // PAGE) * PAGE
    (backups / "other" / "filler").write_bytes(b"\0" * filler)
    assert free_bytes(backups) == -(-size // PAGE) * PAGE
    before = snapshot_dir(backups)
    proc = cli(config, "backup")
    assert proc.returncode == 1, proc.stderr
    harness.no_traceback(proc.stderr)
    assert "manifest" in last_event(proc.stderr)["error"], proc.stderr
    assert_untouched(backups, before, older, config, allowed=frozenset({"other"}))


def test_redis_data_dir_too_small_refused_before_bgsave(
        tmp_path: Path, mounted: Callable[[str, int], Path]) -> None:
    """A BGSAVE that fails makes Redis refuse writes (MISCONF) when it has save points:
    the check on Redis's data volume must refuse first."""
    fault_case("disk: Redis data dir visibly too small")
    data = mounted("redis-small", 24 * MiB)
    server = RedisServer(data, free_port(), options=["--save", "3600 1"])
    server.start()
    try:
        add_random(server, 12)
        client = redis_client(server.port)
        client.save()  # 12 MiB dump + 16 MiB margin > 24 MiB
        client.close()
        config = write_config(tmp_path / "c.toml", server, tmp_path / "backups")
        saves = info(server.port)["rdb_saves"]
        proc = cli(config, "backup")
        assert proc.returncode == 1
        harness.no_traceback(proc.stderr)
        error = last_event(proc.stderr)["error"]
        assert "not enough free space" in error and str(data) in error, error
        assert info(server.port)["rdb_saves"] == saves
        client = redis_client(server.port)
        assert client.set("still", "writable")  # no MISCONF
        client.close()
        assert not (tmp_path / "backups").exists() or complete_local(tmp_path / "backups") == {}
    finally:
        client = redis_client(server.port)
        client.config_set("save", "")  # no shutdown save: it would not fit either
        client.close()
        server.stop()


def test_redis_data_dir_fills_during_bgsave(tmp_path: Path,
                                            mounted: Callable[[str, int], Path]) -> None:
    fault_case("disk: Redis data dir fills during BGSAVE")
    data = mounted("redis-full", 24 * MiB)
    server = RedisServer(data, free_port())
    server.start()
    try:
        populate(server.port, 100, 64)
        client = redis_client(server.port)
        client.save()  # a small, stale dump: the check passes
        client.close()
        add_random(server, 30)
        config = write_config(tmp_path / "c.toml", server, tmp_path / "backups")
        proc = cli(config, "backup")
        assert proc.returncode == 1
        harness.no_traceback(proc.stderr)
        error = last_event(proc.stderr)["error"]
        assert "rdb_last_bgsave_status is 'err'" in error, error
        assert complete_local(tmp_path / "backups") == {}
        assert leftovers(tmp_path / "backups") == []
    finally:
        server.stop()
