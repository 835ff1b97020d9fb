"""Redis killed or restarted in the middle of a backup: during BGSAVE and during the copy.

During BGSAVE the backup must fail cleanly and promptly (exit 1, no traceback, nothing left
behind, not a backup of an old file); during the copy it must succeed with the snapshot it
opened (one complete file, read from one descriptor), whatever happens to dump.rdb meanwhile.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RedisServer, unzstd, wait_until, write_config
from tests.faults import harness
from tests.faults.harness import (
    cli,
    complete_local,
    fault_case,
    in_bgsave,
    kill_redis,
    last_event,
    leftovers,
    populate,
    redis_client,
    set_save_delay,
    spawn,
)

KEYS = 20_000
MARK_OLD, MARK_NEW = b"snapshot-marker-before", b"snapshot-marker-after"


@pytest.fixture
def slow_save(tmp_path: Path, redis_factory: Callable[..., RedisServer]
              ) -> tuple[RedisServer, Path]:
    server = redis_factory()
    populate(server.port, KEYS, 48, random_values=True)  # ~1.3 MiB: the copy mark is reached
    client = redis_client(server.port)
    client.set(MARK_OLD, b"1")
    client.close()
    config = write_config(tmp_path / "c.toml", server, tmp_path / "backups")
    return server, config


def assert_failed_cleanly(spawned: harness.Spawned, backups: Path, within: float) -> str:
    started = time.monotonic()
    code = spawned.wait(60)
    took = time.monotonic() - started
    _out, err = spawned.output()
    assert code == 1, err[-3000:]
    harness.no_traceback(err)
    assert took < within, f"the failure took {took:.1f}s to notice"
    assert complete_local(backups) == {}
    assert leftovers(backups) == []
    return str(last_event(err).get("error", ""))


@pytest.mark.parametrize("how", ["killed", "restarted"])
def test_redis_dies_during_bgsave(slow_save: tuple[RedisServer, Path], tmp_path: Path,
                                  how: str) -> None:
    fault_case(f"redis {how} during BGSAVE")
    server, config = slow_save
    set_save_delay(server.port, -1)  # ~1.6 s of saving
    spawned = spawn(config, "backup")
    wait_until(lambda: in_bgsave(server.port), 20, "the backup's BGSAVE")
    if how == "killed":
        kill_redis(server)
    else:  # a restart (policy `always`): SIGTERM kills the save child, then start again
        server.stop()
        server.start()
    error = assert_failed_cleanly(spawned, tmp_path / "backups", within=15)
    assert "Redis" in error, error
    if server.proc is None:
        server.start()
    proc = cli(config, "backup")  # Redis is back: the next run works
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("follow", [False, True], ids=["finished", "followed"])
@pytest.mark.parametrize("how", ["killed", "restarted-and-saved"])
def test_redis_dies_during_the_copy(slow_save: tuple[RedisServer, Path], tmp_path: Path,
                                    how: str, follow: bool) -> None:
    """A backup keeps the snapshot it opened, even when dump.rdb is replaced meanwhile. Read
    after the save (follow_save = false) it succeeds; read while Redis writes it, it may also
    fail cleanly: Redis died before it could confirm the save. Never the new data."""
    fault_case(f"redis {how} during the copy ({'followed' if follow else 'finished'} save)")
    server, config = slow_save
    marker = tmp_path / "paused"
    spawned = spawn(config, "backup", env={"BACKUPD_PAUSE_AT": "copy",
                                           "BACKUPD_PAUSE_FILE": str(marker),
                                           "BACKUPD_REDIS__FOLLOW_SAVE": str(follow).lower()})
    wait_until(lambda: marker.exists() or spawned.proc.poll() is not None, 30,
               "the backup to reach the copy")
    assert spawned.proc.poll() is None, spawned.output()
    if how == "killed":
        kill_redis(server)
    else:
        server.stop()
        server.start()
        client = redis_client(server.port)
        client.flushall()
        client.set(MARK_NEW, b"1")
        client.save()  # a new dump.rdb is renamed over the one being copied
        client.close()
    marker.unlink()
    if follow and spawned.wait(60) != 0:
        assert_failed_cleanly(spawned, tmp_path / "backups", within=15)
        return
    assert spawned.wait(60) == 0, spawned.output()
    spawned.output()
    (manifest,) = complete_local(tmp_path / "backups").values()
    assert manifest["keys"] == KEYS + 1
    ran = harness.cli_fast(config, "verify", manifest["id"], "--deep")
    assert ran.code == 0, ran.stdout
    artifact = tmp_path / "backups" / manifest["artifact"]
    raw = unzstd(artifact.read_bytes())
    assert MARK_OLD in raw and MARK_NEW not in raw
    assert json.dumps(manifest)  # a plain, complete manifest
