"""The snapshot handshake against a real redis-server: every race a naive wait falls for."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyrage
import pytest
import redis

from backupd import config as config_mod
from backupd import source
from backupd.actions.cycle import run_cycle
from backupd.errors import (
    ConfigError,
    InsufficientSpace,
    RedisAuthError,
    RedisUnavailable,
    SnapshotError,
)
from tests.conftest import PASSWORD, RedisServer, fill, unzstd, wait_until, write_config

ENV = {"REDIS_PASSWORD": PASSWORD}


def load(tmp_path: Path, server: RedisServer, extra: str = "") -> config_mod.Config:
    path = write_config(tmp_path / "config.toml", server, tmp_path / "backups", extra)
    (tmp_path / "backups").mkdir(exist_ok=True)
    return config_mod.load(path, env={})


Taken = tuple[bytes, "source.Snapshot | source.LiveSnapshot"]
Take = Callable[[config_mod.Config], Taken]


def take_finished(cfg: config_mod.Config) -> Taken:
    """As the pre-restore save does it: the finished dump file."""
    client = source.connect(cfg.redis, ENV)
    with source.snapshot(client, cfg.redis, Path(cfg.backup.dir)) as snap:
        data = snap.file.read()
    return data, snap


def take_live(cfg: config_mod.Config) -> Taken:
    """As `backupd backup` does it: read while Redis writes (when the save is slow enough)."""
    client = source.connect(cfg.redis, ENV)
    with source.follow_snapshot(client, cfg.redis, Path(cfg.backup.dir)) as snap:
        data = b"".join(iter(lambda: snap.read(1 << 16), b""))
    return data, snap


@pytest.fixture(params=["finished", "live"])
def take(request: pytest.FixtureRequest) -> Take:
    """Every handshake race holds for both ways of reading the snapshot."""
    return take_finished if request.param == "finished" else take_live


@pytest.fixture
def cfg(tmp_path: Path, redis_server: RedisServer) -> config_mod.Config:
    fill(redis_server, 200)
    return load(tmp_path, redis_server)


def test_snapshot_is_fresh_and_complete(cfg: config_mod.Config, redis_server: RedisServer,
                                        take: Take) -> None:
    redis_server.client().set("marker:first", "1")
    data, snap = take(cfg)
    assert data.startswith(b"REDIS0010") and b"marker:first" in data
    assert snap.server.keys == 202
    redis_server.client().set("marker:second", "2")
    data, _ = take(cfg)
    assert b"marker:second" in data, "the second backup must not reuse the first file"


def test_two_saves_in_the_same_second_both_fresh(cfg: config_mod.Config,
                                                 redis_server: RedisServer, take: Take) -> None:
    client = redis_server.client()
    for i in range(4):  # several saves within one LASTSAVE second: the counter tells them apart
        client.set("marker:round", f"round-{i}")
        data, _ = take(cfg)
        assert f"round-{i}".encode() in data


def test_joins_a_save_already_in_progress(cfg: config_mod.Config,
                                          redis_server: RedisServer, take: Take) -> None:
    client = redis_server.client()
    client.config_set("rdb-key-save-delay", 2000)  # 200 keys * 2 ms: a save of ~0.4 s
    client.bgsave()
    assert int(client.info("persistence")["rdb_bgsave_in_progress"]) == 1
    client.set("marker:after-first-save-started", "1")
    data, snap = take(cfg)
    # The running save forked before the marker existed: a backup of it would be stale.
    assert b"marker:after-first-save-started" in data
    assert snap.save_reply == "Background saving started"


def test_scheduled_behind_an_aof_rewrite(tmp_path: Path,
                                         redis_factory: Callable[..., RedisServer],
                                         take: Take) -> None:
    server = redis_factory("--appendonly", "yes")
    fill(server, 200)
    cfg = load(tmp_path, server)
    client = server.client()
    client.config_set("rdb-key-save-delay", 2000)
    client.bgrewriteaof()
    wait_until(lambda: int(client.info("persistence")["aof_rewrite_in_progress"]) == 1,
               5, "the AOF rewrite")
    client.set("marker:during-rewrite", "1")
    data, snap = take(cfg)
    assert snap.save_reply == "Background saving scheduled"
    assert b"marker:during-rewrite" in data


def test_save_killed_by_flushall_is_not_a_backup(cfg: config_mod.Config,
                                                 redis_server: RedisServer, take: Take) -> None:
    client = redis_server.client()
    old = take(cfg)[0]  # a dump.rdb exists: the trap is to back it up again
    client.config_set("rdb-key-save-delay", 20000)  # 200 keys * 20 ms = 4 s save
    errors: list[BaseException] = []

    def backup() -> None:
        try:
            take(cfg)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=backup)
    worker.start()
    wait_until(lambda: int(client.info("persistence")["rdb_bgsave_in_progress"]) == 1,
               10, "the save to start")
    client.flushall()  # with save "": kills the child and writes nothing
    worker.join(30)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], SnapshotError), errors
    assert "no backup was made of the old file" in str(errors[0])
    assert (Path(cfg.redis.data_dir) / "dump.rdb").read_bytes() == old


def test_failed_save_is_reported(tmp_path: Path,
                                 redis_factory: Callable[..., RedisServer], take: Take) -> None:
    server = redis_factory(user="65534")
    fill(server, 50)
    cfg = load(tmp_path, server)
    Path(server.dir).chmod(0o555)  # Redis runs as nobody: it cannot create temp-<pid>.rdb
    try:
        with pytest.raises(SnapshotError, match=r"rdb_last_bgsave_status is 'err'.*Redis log"):
            take(cfg)
    finally:
        Path(server.dir).chmod(0o755)


def test_wrong_data_dir_is_detected(tmp_path: Path, redis_server: RedisServer, take: Take) -> None:
    fill(redis_server, 20)
    elsewhere = tmp_path / "not-the-volume"
    elsewhere.mkdir()
    (elsewhere / "dump.rdb").write_bytes(b"stale")
    cfg = load(tmp_path, redis_server)
    cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, data_dir=str(elsewhere)))
    with pytest.raises(SnapshotError, match="did not change after a successful save"):
        take(cfg)


def test_timeout(cfg: config_mod.Config, redis_server: RedisServer, take: Take) -> None:
    client = redis_server.client()
    client.config_set("rdb-key-save-delay", 50000)  # 200 keys * 50 ms = 10 s
    short = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, save_timeout=0.5))
    with pytest.raises(SnapshotError, match="timed out"):
        take(short)
    client.config_set("rdb-key-save-delay", 0)


def test_wrong_password(cfg: config_mod.Config) -> None:
    with pytest.raises(RedisAuthError) as info:
        source.connect(cfg.redis, {"REDIS_PASSWORD": "not-the-password"})
    assert "not-the-password" not in str(info.value)


def test_missing_password_is_a_config_error(cfg: config_mod.Config) -> None:
    with pytest.raises(ConfigError, match="REDIS_PASSWORD"):
        source.connect(cfg.redis, {})


def test_server_down(tmp_path: Path, redis_server: RedisServer) -> None:
    cfg = load(tmp_path, redis_server)
    redis_server.stop()
    with pytest.raises(RedisUnavailable, match="cannot connect"):
        source.connect(cfg.redis, ENV)


def test_acl_user_with_minimal_permissions(tmp_path: Path, redis_server: RedisServer) -> None:
    fill(redis_server, 30)
    redis_server.client().acl_setuser(
        "backup", enabled=True, passwords=["+backup-user-pw-123"],
        commands=["+ping", "+info", "+bgsave", "+lastsave", "+time", "+config|get"])
    cfg = load(tmp_path, redis_server)
    cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, username="backup"))
    client = source.connect(cfg.redis, {"REDIS_PASSWORD": "backup-user-pw-123"})
    with source.snapshot(client, cfg.redis, Path(cfg.backup.dir)) as snap:
        assert snap.file.read(5) == b"REDIS"


def test_acl_user_without_bgsave(tmp_path: Path, redis_server: RedisServer) -> None:
    redis_server.client().acl_setuser(
        "weak", enabled=True, passwords=["+weak-user-pw-123"],
        commands=["+ping", "+info", "+time"])
    cfg = load(tmp_path, redis_server)
    cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, username="weak"))
    client = source.connect(cfg.redis, {"REDIS_PASSWORD": "weak-user-pw-123"})
    with pytest.raises(RedisAuthError, match=r"\+bgsave"), \
            source.snapshot(client, cfg.redis, Path(cfg.backup.dir)):
        pass


def test_refuses_before_bgsave_when_the_backup_dir_is_full(
        tmp_path: Path, redis_server: RedisServer) -> None:
    fill(redis_server, 200)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)], check=True)
    try:
        cfg = load(tmp_path, redis_server)
        cfg = dataclasses.replace(cfg, backup=dataclasses.replace(cfg.backup, dir=str(tiny)))
        saves = int(redis_server.client().info("persistence")["rdb_saves"])
        with pytest.raises(InsufficientSpace, match="not enough free space"):
            run_cycle(cfg, env=ENV)
        # No BGSAVE was attempted: a failed save would make Redis refuse writes (MISCONF).
        assert int(redis_server.client().info("persistence")["rdb_saves"]) == saves
        assert [p.name for p in tiny.iterdir()] == [".backupd.lock"]
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_copy_is_from_one_descriptor(cfg: config_mod.Config, redis_server: RedisServer) -> None:
    """A save landing mid-copy replaces the path, not the file being read."""
    client = source.connect(cfg.redis, ENV)
    with source.snapshot(client, cfg.redis, Path(cfg.backup.dir)) as snap:
        first = snap.file.read(10)
        redis_server.client().set("marker:late", "1")
        redis_server.client().save()  # renames a new dump.rdb over the path
        rest = snap.file.read()
    data = first + rest
    assert b"marker:late" not in data
    assert hashlib.sha256(data).hexdigest() != hashlib.sha256(
        (Path(cfg.redis.data_dir) / "dump.rdb").read_bytes()).hexdigest()


def test_loading_server_error_type() -> None:
    # redis-py maps -LOADING to BusyLoadingError, which the handshake waits on.
    assert issubclass(redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError)


def test_live_snapshot_is_read_while_redis_writes_it(cfg: config_mod.Config,
                                                     redis_server: RedisServer) -> None:
    """Reading overlaps the save (that is what makes backups faster), and the stream still
    ends with exactly the dump file Redis confirmed."""
    client = redis_server.client()
    client.config_set("rdb-key-save-delay", 5000)  # 200 keys * 5 ms: a save of ~1 s
    conn = source.connect(cfg.redis, ENV)
    with source.follow_snapshot(conn, cfg.redis, Path(cfg.backup.dir)) as snap:
        first = snap.read(1024)
        during = int(client.info("persistence")["rdb_bgsave_in_progress"])
        data = first + b"".join(iter(lambda: snap.read(1 << 16), b""))
    assert first.startswith(b"REDIS") and during == 1
    assert snap.followed and snap.size == len(data)
    assert data == (Path(cfg.redis.data_dir) / "dump.rdb").read_bytes()


@contextlib.contextmanager
def paused_backup(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`backupd backup` (config tmp_path/config.toml) held at its "snapshot" checkpoint: BGSAVE
    sent, nothing read yet. Deleting the yielded marker file lets it go on."""
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backupd", "--log-format", "json", "-c",
         str(tmp_path / "config.toml"), "backup"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**ENV, "PATH": os.environ["PATH"], "BACKUPD_PAUSE_AT": "snapshot",
             "BACKUPD_PAUSE_FILE": str(marker), **env})
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None, 30, "the pause")
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        yield proc, marker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("encrypted", [False, True], ids=["zstd", "zstd+age"])
@pytest.mark.parametrize("decoy", ["old-dump", "garbage"])
def test_a_decoy_temp_file_never_becomes_the_backup(tmp_path: Path, redis_server: RedisServer,
                                                    decoy: str, encrypted: bool) -> None:
    """Another temp-<pid>.rdb appearing during the save (a stale or foreign file, newer than
    Redis's) is followed first; the backup must still be Redis's new dump: a complete old RDB
    is caught by its inode, garbage by the RDB check, and the snapshot is read again (also
    through age, which must not swallow the signal to read again)."""
    identity = pyrage.x25519.Identity.generate()
    fill(redis_server, 200)
    extra = f'age_recipients = ["{identity.to_public()}"]\n' if encrypted else ""
    cfg = load(tmp_path, redis_server, extra)
    client = redis_server.client()
    data_dir = Path(cfg.redis.data_dir)
    client.save()
    old = (data_dir / "dump.rdb").read_bytes()
    client.set("marker:new", "1")
    client.config_set("rdb-key-save-delay", 5000)  # ~1 s: the save outlasts the pause
    backups = Path(cfg.backup.dir)
    with paused_backup(tmp_path) as (proc, marker):
        assert int(client.info("persistence")["rdb_bgsave_in_progress"]) == 1
        fake = data_dir / "temp-999999.rdb"
        fake.write_bytes(old if decoy == "old-dump" else b"NOT AN RDB" + os.urandom(50_000))
        future = time.time() + 3600  # newer than Redis's own temp file, which keeps growing
        os.utime(fake, (future, future))
        marker.unlink()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    (reread,) = [json.loads(line) for line in err.splitlines() if "snapshot_reread" in line]
    expected = "not the dump Redis kept" if decoy == "old-dump" else "not an RDB file"
    assert expected in reread["reason"], reread  # caught by the inode / by the RDB check
    (manifest_path,) = backups.glob("*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["keys"] == 202 and manifest["keys_exact"]
    stored = (backups / manifest["artifact"]).read_bytes()
    if encrypted:
        stored = pyrage.decrypt(stored, [identity])
    raw = unzstd(stored)
    assert b"marker:new" in raw and raw == (data_dir / "dump.rdb").read_bytes()


def test_backup_work_yields_the_cpu_to_redis(tmp_path: Path, cfg: config_mod.Config) -> None:
    """While a backup compresses, its threads run `backup.niceness` nicer than backupd
    started, so that Redis and its save child get the CPU first."""
    with paused_backup(tmp_path, BACKUPD_BACKUP__NICENESS="7") as (proc, marker):
        nice = {int(Path(f"/proc/{proc.pid}/task/{t}/stat").read_text().rsplit(")", 1)[1]
                    .split()[16]) for t in os.listdir(f"/proc/{proc.pid}/task")}
        marker.unlink()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert os.getpriority(os.PRIO_PROCESS, 0) + 7 in nice, nice
