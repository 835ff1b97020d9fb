"""Restore that cannot be fooled: what the restart really loads is checked before
and after, on real redis-server processes controlled like services (tests/test_restore.py)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anycrc
import pytest
import redis

from tests.conftest import PASSWORD, RedisServer, fill, free_port, run_cli, wait_until
from tests.test_restore import (
    CTL,
    Service,
    backup,
    contents,
    leftovers,
    populate,
    restore,
    rewrite,
    services,  # noqa: F401 - the fixture (parameters naming it: noqa F811)
    sha256,
    svc_setup,  # noqa: F401 - a fixture
)


def last_error(stderr: str) -> str:
    return str(json.loads(stderr.strip().splitlines()[-1])["error"])


@pytest.mark.parametrize("method", ["command", "shutdown"])
def test_runtime_aof_flag_does_not_decide_what_is_restored(
        tmp_path: Path, services: Callable[..., Service], method: str) -> None:  # noqa: F811
    """Case 1: started with appendonly yes, then CONFIG SET appendonly no: the restart loads
    the AOF directory, so it must hold the backup too."""
    service = services("--appendonly", "yes",
                       supervised="always" if method == "shutdown" else None)
    populate(service, "orig")
    client = service.client()
    client.config_set("appendonly", "no")
    client.close()
    rewrite(service, "backed-up", 120)
    expected = contents(service)
    config = service.config(tmp_path / "config.toml", tmp_path / "backups", method=method)
    backup_id = backup(config)
    rewrite(service, "newest", 80)

    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == expected
    base = service.dir / "appendonlydir" / "appendonly.aof.1.base.rdb"
    assert base.read_bytes() == (service.dir / "dump.rdb").read_bytes()


def assert_untouched(service: Service, run_id: str, before: dict[tuple[int, str], Any]) -> None:
    assert service.run_id() == run_id and contents(service) == before
    assert leftovers(service.dir) == []


@pytest.mark.parametrize("method", ["command", "shutdown"])
def test_backup_with_more_databases_than_the_target_is_refused(
        tmp_path: Path, services: Callable[..., Service], method: str) -> None:  # noqa: F811
    """Case 2: db 15 into `databases 4` would make Redis exit at startup, again and again."""
    origin = services(name="origin")
    populate(origin, "origin", 50)
    fill(origin.server, 10, db=15, prefix="high")
    backups = tmp_path / "backups"
    backup(origin.config(tmp_path / "origin.toml", backups))
    target = services("--databases", "4", name="target",
                      supervised="always" if method == "shutdown" else None)
    populate(target, "target", 30)
    config = target.config(tmp_path / "target.toml", backups, method=method)
    before, run_id = contents(target), target.run_id()
    for args in (["--dry-run"], ["--yes"]):
        proc = restore(config, *args)
        assert proc.returncode == 1, proc.stderr
        error = last_error(proc.stderr)
        assert "db15" in error and "`databases 4`" in error and "databases 16" in error
        assert "Nothing was stopped" in error
    assert_untouched(target, run_id, before)


def big_values(service: Service, megabytes: int) -> None:
    client = service.client()
    pipe = client.pipeline(transaction=False)
    for i in range(megabytes * 1000):
        pipe.set(f"big:{i}", f"{i:08d}" + "v" * 1000)
    pipe.execute()
    client.close()


def test_backup_larger_than_maxmemory_is_refused_or_evicts_and_rolls_back(
        tmp_path: Path, services: Callable[..., Service]) -> None:  # noqa: F811
    """Case 3: a 31 MB dataset into maxmemory 15mb + allkeys-lru."""
    origin = services(name="origin")
    big_values(origin, 31)
    backups = tmp_path / "backups"
    backup_id = backup(origin.config(tmp_path / "origin.toml", backups))
    manifest = json.loads((backups / f"{backup_id}.json").read_text())
    assert manifest["redis"]["used_memory"] > 31_000_000
    assert manifest["redis"]["maxmemory_policy"] == "noeviction"
    target = services("--maxmemory", "15mb", "--maxmemory-policy", "allkeys-lru",
                      name="target")
    populate(target, "target", 30)
    config = target.config(tmp_path / "target.toml", backups)
    before, run_id = contents(target), target.run_id()
    proc = restore(config, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = last_error(proc.stderr)
    assert "maxmemory 15.0 MiB" in error and "evict" in error and "--force-memory" in error
    assert_untouched(target, run_id, before)

    dry = restore(config, "--dry-run", "--force-memory")
    assert dry.returncode == 0, dry.stderr
    assert "WARNING  backup" in dry.stdout and "--force-memory given" in dry.stdout
    forced = restore(config, "--yes", "--force-memory")
    assert forced.returncode == 1, forced.stderr
    error = last_error(forced.stderr)
    assert "Redis evicted" in error and "allkeys-lru" in error and "rolled back" in error
    assert contents(target) == before and leftovers(target.dir) == []


def test_runtime_only_acl_user(tmp_path: Path, services: Callable[..., Service]) -> None:  # noqa: F811
    """Case 4: the restore's user was made with ACL SETUSER and is gone after the restart."""
    service = services()
    client = service.client()
    client.acl_setuser("restorer", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                       channels=["*"], commands=["+@all"])
    client.close()
    populate(service, "orig")
    backups = tmp_path / "backups"
    config = service.config(tmp_path / "config.toml", backups)
    config.write_text(config.read_text().replace("port =", 'username = "restorer"\nport ='))
    backup_id = backup(config)
    rewrite(service)
    dry = restore(config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "WARNING  Redis runs without a config file or aclfile" in dry.stdout
    assert "'restorer' exists only at runtime" in dry.stdout
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = last_error(proc.stderr)
    manifest = json.loads((backups / f"{backup_id}.json").read_text())
    assert sha256(service.dir / "dump.rdb") == manifest["raw_sha256"]
    assert f"the files of backup {backup_id} are in place" in error
    assert "'restorer'" in error and "exists only at runtime" in error
    assert "backupd restore --rollback" in error and PASSWORD not in proc.stderr
    (pre,) = leftovers(service.dir)
    assert pre in error


def test_config_renamed(tmp_path: Path, services: Callable[..., Service]) -> None:  # noqa: F811
    """Case 5: rename-command CONFIG "": one message naming what restore needs."""
    service = services("--rename-command", "CONFIG", "")
    populate(service, "orig")
    backups = tmp_path / "backups"
    config = service.config(tmp_path / "config.toml", backups)
    made = run_cli("-c", str(config), "backup", "--no-prune")
    assert made.returncode == 0, made.stderr
    assert "rename-command CONFIG" in made.stderr and "+config|get" not in made.stderr
    before, run_id = contents(service), service.run_id()
    for method in ("command", "shutdown"):
        proc = restore(config, "--yes", "--method", method)
        assert proc.returncode == 1, proc.stderr
        error = last_error(proc.stderr)
        assert "rename-command CONFIG" in error and "+config|get +config|set" in error
        assert "Nothing was stopped" in error and "unknown command" not in error
        assert json.loads(proc.stderr.strip().splitlines()[-1]).get("event") != \
            "unexpected_error"
    assert_untouched(service, run_id, before)
    # With the file names in the config, the command method restores without CONFIG.
    expected = backup_contents = contents(service)
    config.write_text(config.read_text().replace(
        "port =", 'dbfilename = "dump.rdb"\nappenddirname = "appendonlydir"\nport ='))
    rewrite(service)
    proc = restore(config, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == expected == backup_contents


# -- the check after the start: a restore never exits 0 unless the data is the backup --------


def test_keys_per_db_must_match(svc_setup: tuple[Service, Path, Path]) -> None:  # noqa: F811
    service, config, backups = svc_setup
    backup_id = backup(config)
    path = backups / f"{backup_id}.json"
    manifest = json.loads(path.read_text())
    assert manifest["keys_per_db"] == {"db0": 302, "db2": 21}
    manifest["keys_per_db"] = {"db0": 301, "db2": 22}  # same total: only per db tells
    manifest["keys_exact"] = True
    path.write_text(json.dumps(manifest))
    rewrite(service)
    before = contents(service)
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = last_error(proc.stderr)
    assert "db0 has 302 keys, the backup 301" in error and "db2 has 21 keys, the backup 22" \
        in error and "rolled back" in error
    assert contents(service) == before and leftovers(service.dir) == []


def renamed_keys(raw: bytes, old: bytes, new: bytes) -> bytes:
    """The same RDB with key names changed (same lengths), with a correct CRC."""
    body = raw[:-8].replace(old, new)
    crc: int = anycrc.Model("CRC64-REDIS").calc(body)
    return body + crc.to_bytes(8, "little")


def test_sampled_keys_must_exist(tmp_path: Path,
                                 svc_setup: tuple[Service, Path, Path]) -> None:  # noqa: F811
    """Redis restarts on other data with the same keys per db (here: the start command uses
    another dir): only the key sample tells."""
    service, config, backups = svc_setup
    backup_id = backup(config)
    manifest = json.loads((backups / f"{backup_id}.json").read_text())
    assert len(manifest["key_sample"]) == 16  # 8 of db0, 8 of db2
    decoy_dir = tmp_path / "decoy"
    decoy_dir.mkdir()
    raw = (service.dir / "dump.rdb").read_bytes()
    (decoy_dir / "dump.rdb").write_bytes(renamed_keys(raw, b"orig", b"fake"))
    decoy = RedisServer(decoy_dir, service.server.port, PASSWORD, [])
    start = [sys.executable, str(CTL), "start", str(service.pidfile), "--", *decoy.argv()]
    config.write_text(config.read_text().replace(
        "start_command = ", f"start_command = {json.dumps(start)}\nold_start = "))
    config.write_text(config.read_text().replace("old_start = ", "# "))
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = last_error(proc.stderr)
    assert "16 of 16 sampled keys" in error and "Redis loaded other data" in error
    assert "rolled back" in error


# -- a Redis that dies after the start: rolled back in seconds, not after start_timeout --------


@dataclass
class ConfServer(RedisServer):
    """A redis-server started from a config file (its first argument), as in production: the
    file can say something else than the running server (edited, not yet applied)."""

    conf: Path = Path("/nonexistent")

    def argv(self) -> list[str]:
        argv = super().argv()
        return [argv[0], str(self.conf), *argv[1:]]


@pytest.fixture
def conf_service(tmp_path: Path) -> Iterator[Callable[[bool], Service]]:
    made: list[Service] = []

    def make(supervised: bool) -> Service:
        data = tmp_path / "data"
        data.mkdir()
        conf = tmp_path / "redis.conf"
        conf.write_text("databases 16\n")
        service = Service(ConfServer(data, free_port(), PASSWORD, [], conf=conf))
        made.append(service)
        service.launch([] if supervised else None)
        return service

    yield make
    for service in made:
        service.remove()


@pytest.mark.parametrize("method", ["command", "shutdown"])
def test_crash_looping_target_is_rolled_back_fast(
        tmp_path: Path, conf_service: Callable[[bool], Service], method: str) -> None:
    """The config file the restart reads says `databases 4` (edited after Redis started with
    16): Redis loads db0 of the backup, meets db5 and exits, again and again under a restart
    policy. With the default start_timeout (5 min) the restore is rolled back in seconds."""
    service = conf_service(method == "shutdown")
    fill(service.server, 300_000, prefix="bulk")  # db0 loads long enough to answer -LOADING
    fill(service.server, 10, db=5, prefix="high")
    backups = tmp_path / "backups"
    config = service.config(tmp_path / "config.toml", backups, method=method,
                            start_timeout="5m")
    backup(config)
    rewrite(service, "current", 40)
    before = contents(service)
    assert isinstance(service.server, ConfServer)
    service.server.conf.write_text("databases 4\n")

    started = time.monotonic()
    proc = restore(config, "--yes")
    seconds = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    error = last_error(proc.stderr)
    assert seconds < 15, proc.stderr
    # Seen answering -LOADING and then gone, or (its load too short to see) never answering
    assert "exited" in error or "nothing new answered" in error
    assert "`databases` below 6" in error and "rolled back" in error
    assert "Redis answers with 41 keys" in error
    assert contents(service) == before and leftovers(service.dir) == []
    print(f"crash loop ({method}) rolled back in {seconds:.1f}s")


# -- rollback tells the truth ------------------------------------------------------------------


def corrupt_keys_per_db(backups: Path, backup_id: str) -> None:
    """The manifest disagrees with the RDB on keys per db: the restore fails after the start."""
    path = backups / f"{backup_id}.json"
    manifest = json.loads(path.read_text())
    manifest["keys_per_db"] = {db: n + 1 for db, n in manifest["keys_per_db"].items()}
    manifest["keys"] = sum(manifest["keys_per_db"].values())
    manifest["keys_exact"] = True
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("method", ["command", "shutdown"])
def test_rollback_with_runtime_aof_off_brings_back_the_last_writes(
        tmp_path: Path, services: Callable[..., Service], method: str) -> None:  # noqa: F811
    """Case 1, second run: the rollback must not bring back the AOF dir that Redis stopped
    writing at `CONFIG SET appendonly no` (the restart loads it, not the fresh snapshot)."""
    service = services("--appendonly", "yes",
                       supervised="always" if method == "shutdown" else None)
    populate(service, "orig")
    client = service.client()
    client.config_set("appendonly", "no")
    client.close()
    config = service.config(tmp_path / "config.toml", tmp_path / "backups", method=method)
    backup_id = backup(config)
    corrupt_keys_per_db(tmp_path / "backups", backup_id)
    rewrite(service, "current", 60)
    client = service.client()
    client.set("written-just-before", "must survive the rollback")
    client.close()
    before = contents(service)
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = last_error(proc.stderr)
    assert "rolled back" in error and "the data is as before" in error
    assert contents(service) == before and leftovers(service.dir) == []
    run_id = service.run_id()
    if method == "command":
        service.stop()
        service.start()
    else:
        client = service.client()
        with contextlib.suppress(redis.exceptions.ConnectionError):
            client.execute_command("SHUTDOWN", "NOSAVE")
        client.close()
        wait_until(lambda: service.answers() and service.run_id() != run_id, 20, "restart")
    assert contents(service) == before  # a restart (appendonly yes again) loads the same


def test_rollback_long_after_shows_what_it_discards(
        svc_setup: tuple[Service, Path, Path]) -> None:  # noqa: F811
    service, config, _ = svc_setup
    backup(config)
    rewrite(service)
    before = contents(service)
    assert restore(config, "--yes").returncode == 0
    proc = restore(config, "--rollback", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "including every write since the restore finished at" in proc.stdout
    assert " ago)" in proc.stdout and "the data is as before" in proc.stdout
    assert '"event": "rollback_discards_writes"' in proc.stderr
    assert contents(service) == before


def test_rollback_says_what_ran_before(tmp_path: Path,
                                       services: Callable[..., Service]) -> None:  # noqa: F811
    """Redis was running before the restore: a rollback that cannot bring it back says so
    (not "it was not running before")."""
    service = services(supervised="once")
    populate(service, "orig")
    config = service.config(tmp_path / "config.toml", tmp_path / "backups", method="shutdown",
                            start_timeout="2s")
    backup(config)
    assert restore(config, "--yes").returncode == 1  # no restart policy: Redis stays down
    proc = restore(config, "--rollback", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "Redis was running before the restore but did not come back" in proc.stdout
    assert "was not running before" not in proc.stdout


def test_acl_user_not_saved_to_the_aclfile(tmp_path: Path,
                                           services: Callable[..., Service]) -> None:  # noqa: F811
    """With an aclfile: a user made with ACL SETUSER is warned about until ACL SAVE writes it
    there."""
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default on >{PASSWORD} ~* &* +@all\n")
    service = services("--aclfile", str(acl))
    client = service.client()
    client.acl_setuser("restorer", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                       channels=["*"], commands=["+@all"])
    client.close()
    populate(service, "orig")
    config = service.config(tmp_path / "config.toml", tmp_path / "backups")
    config.write_text(config.read_text().replace("port =", 'username = "restorer"\nport ='))
    backup(config)
    dry = restore(config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"ACL user 'restorer' is not in Redis's aclfile {acl}" in dry.stdout
    assert "Run ACL SAVE first" in dry.stdout
    client = service.client()
    client.execute_command("ACL", "SAVE")
    client.close()
    dry = restore(config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "WARNING" not in dry.stdout
    proc = restore(config, "--yes")  # the saved user survives the restart
    assert proc.returncode == 0, proc.stderr


def test_redis_files_are_read_through_the_data_dir(tmp_path: Path) -> None:
    """Redis's aclfile inside its `dir` (/data in the container) is read from redis.data_dir."""
    from backupd.actions.restore.preflight import _read_local

    (tmp_path / "users.acl").write_text("user restorer on\n")
    for path in ("users.acl", "/data/users.acl"):
        assert _read_local(path, "/data", tmp_path) == "user restorer on\n"
    assert _read_local("/etc/redis/none.acl", "/data", tmp_path) is None
