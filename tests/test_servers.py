"""Which server wrote a backup, which servers can load it, and README's table of both."""

from __future__ import annotations

import json
from pathlib import Path

import anycrc
import pytest

from backupd import manifest as mf
from backupd import servers
from backupd.errors import IntegrityError
from backupd.rdb import RdbChecker, writer_of
from backupd.servers import REDIS, VALKEY, ServerId
from tests.conftest import (
    REPO,
    SERVERS,
    RedisServer,
    Server,
    fill,
    matrix_server,
    run_cli,
    write_config,
)
from tests.test_restore import backup, contents, populate, restore, running_service


@pytest.mark.parametrize(("kind", "version", "rdb"), [
    (REDIS, "7.0.15", 10), (REDIS, "7.2.6", 11), (REDIS, "7.4.1", 12), (REDIS, "8.0.2", 12),
    (REDIS, "8.4.0", 12), (REDIS, "8.6.0", 13), (REDIS, "6.2.14", 9), (REDIS, "garbage", 0),
    (VALKEY, "7.2.5", 11), (VALKEY, "8.0.1", 11), (VALKEY, "8.1.8", 11), (VALKEY, "9.0.0", 80)])
def test_rdb_version_each_server_loads(kind: str, version: str, rdb: int) -> None:
    server = ServerId(kind, version)
    assert server.rdb_version == rdb
    assert server.can_load(rdb) and not server.can_load(rdb + 1)


def test_valkey_9_loads_its_own_and_older_rdbs_but_not_redis_74s() -> None:
    valkey9 = ServerId(VALKEY, "9.0.0")
    assert [v for v in (10, 11, 12, 13, 79, 80, 81) if valkey9.can_load(v)] == [10, 11, 80]
    assert valkey9.loads == "RDB versions up to 11 and 80..80"
    assert not ServerId(VALKEY, "8.1.8").can_load(12)  # Redis 7.4/8's RDB 12
    assert ServerId(REDIS, "8.2.3").can_load(11)  # Valkey 8's RDB 11


def test_valkey_is_known_by_server_name_not_by_redis_version() -> None:
    info = {"redis_version": "7.2.4", "server_name": "valkey", "valkey_version": "8.1.8"}
    assert servers.from_info(info) == ServerId(VALKEY, "8.1.8")
    assert servers.from_info({"redis_version": "8.2.3"}).label == "Redis 8.2.3"
    assert servers.from_version_output("Valkey server v=8.1.8 sha=0") == ServerId(VALKEY, "8.1.8")
    assert servers.from_version_output("redis-check-rdb 7.0.15") == ServerId(REDIS, "7.0.15")
    assert servers.from_version_output("no version here") is None


def rdb(magic: bytes, aux: bytes) -> bytes:
    data = magic + aux + b"\xfe\x00\xfb\x01\x00\x00\x01a\xc0\x01\xff"
    return data + anycrc.Model("CRC64-REDIS").calc(data).to_bytes(8, "little")


def aux(key: bytes, value: bytes) -> bytes:
    return b"\xfa" + bytes([len(key)]) + key + bytes([len(value)]) + value


def test_the_rdb_check_tells_the_engine_from_magic_and_aux_fields() -> None:
    checker = RdbChecker()
    checker.update(rdb(b"VALKEY080", aux(b"valkey-ver", b"9.0.0") + aux(b"ctime", b"1")))
    info = checker.finish()
    assert info.version == 80 and info.writer == ServerId(VALKEY, "9.0.0")
    assert writer_of(rdb(b"VALKEY080", b"")) == ServerId(VALKEY, "")  # the magic alone
    assert writer_of(rdb(b"REDIS0011", aux(b"valkey-ver", b"8.1.8"))) == ServerId(VALKEY, "8.1.8")
    assert writer_of(rdb(b"REDIS0012", aux(b"redis-ver", b"8.2.3"))) == ServerId(REDIS, "8.2.3")
    assert writer_of(rdb(b"REDIS0010", b"")) is None
    assert writer_of(b"not an rdb at all") is None


@pytest.mark.matrix
def test_each_server_writes_the_rdb_the_table_says(redis_server: RedisServer,
                                                   server_under_test: Server) -> None:
    fill(redis_server, 50)
    redis_server.client().save()
    checker = RdbChecker()
    checker.update((redis_server.dir / "dump.rdb").read_bytes())
    info = checker.finish()
    assert info.writer == ServerId(server_under_test.kind, server_under_test.version)
    assert info.version == server_under_test.rdb_version == info.writer.rdb_version
    row = [s for s in servers.SUPPORTED if server_under_test.version in s.tested]
    assert len(row) == 1 and row[0].rdb == str(info.version)  # README's table says so too
    assert row[0].server == ("Valkey" if server_under_test.kind == VALKEY else "Redis")


def test_readme_has_the_supported_servers_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Supported servers\n" in readme
    section = readme.split("## Supported servers\n", 1)[1]
    assert servers.supported_table() in section.split("\n## ", 1)[0], (
        "README's table differs from backupd/servers.py SUPPORTED; paste supported_table()")


def test_the_matrix_runs_every_server_of_the_table() -> None:
    tested = [s.tested for s in servers.SUPPORTED if s.tested[:1].isdigit()
              and "table" not in s.tested]
    assert len(tested) == len(SERVERS) == 3, [s.name for s in SERVERS]


def test_old_manifests_are_redis_and_an_unknown_server_is_refused(tmp_path: Path) -> None:
    body = {"id": "20260101T000000Z-abcdef", "created_at": "2026-01-01T00:00:00Z",
            "raw_size": 1, "raw_sha256": "0" * 64, "stored_size": 1, "stored_sha256": "0" * 64,
            "compression": "none", "encryption": "none",
            "artifact": "20260101T000000Z-abcdef.rdb", "redis": {"version": "7.0.15"}}
    assert mf.parse(json.dumps(body).encode()).redis.identity.label == "Redis 7.0.15"
    body["redis"] = {"version": "8.1.8", "server": "valkey"}
    assert mf.parse(json.dumps(body).encode()).redis.identity.label == "Valkey 8.1.8"
    body["redis"] = {"version": "1.0", "server": "memcached"}
    with pytest.raises(IntegrityError, match=r"redis\.server"):
        mf.parse(json.dumps(body).encode())


def last_error(stderr: str) -> str:
    return str(json.loads(stderr.strip().splitlines()[-1])["error"])


def test_valkey_backup_refused_by_redis_70_and_restored_into_redis_82(tmp_path: Path) -> None:
    valkey, redis82 = matrix_server("valkey-8.1"), matrix_server("redis-8.2")
    backups = tmp_path / "backups"
    with running_service(tmp_path, name="valkey", binary=valkey.binary) as origin:
        populate(origin, "v")
        expected = contents(origin)
        backup_id = backup(origin.config(tmp_path / "valkey.toml", backups))
    with running_service(tmp_path, name="old", binary=SERVERS[0].binary) as old:
        before = contents(old)
        proc = restore(old.config(tmp_path / "old.toml", backups), backup_id, "--yes")
        assert proc.returncode == 1, proc.stderr
        error = last_error(proc.stderr)
        assert "RDB version 11" in error and "Valkey 8.1.8" in error and \
            f"runs {SERVERS[0].label}, which loads RDB versions up to 10" in error
        assert "Nothing was stopped" in error and contents(old) == before
    with running_service(tmp_path, name="new", binary=redis82.binary) as new:
        proc = restore(new.config(tmp_path / "new.toml", backups), backup_id, "--yes")
        assert proc.returncode == 0, proc.stderr
        assert contents(new) == expected


def test_redis_8_rdb_12_refused_by_valkey_8(tmp_path: Path) -> None:
    valkey, redis82 = matrix_server("valkey-8.1"), matrix_server("redis-8.2")
    backups = tmp_path / "backups"
    with running_service(tmp_path, name="redis", binary=redis82.binary) as origin:
        populate(origin, "r")
        backup_id = backup(origin.config(tmp_path / "redis.toml", backups))
    with running_service(tmp_path, name="valkey", binary=valkey.binary) as target:
        before = contents(target)
        proc = restore(target.config(tmp_path / "valkey.toml", backups), backup_id, "--yes")
        assert proc.returncode == 1, proc.stderr
        error = last_error(proc.stderr)
        assert "RDB version 12 (written by Redis 8.2.3" in error
        assert "runs Valkey 8.1.8, which loads RDB versions up to 11" in error
        assert contents(target) == before


def test_drill_and_deep_verify_on_70_say_why_they_cannot_check_a_valkey_backup(
        tmp_path: Path) -> None:
    valkey = matrix_server("valkey-8.1")
    with running_service(tmp_path, name="valkey", binary=valkey.binary) as origin:
        populate(origin, "v")
        config = write_config(tmp_path / "c.toml", origin.server, tmp_path / "backups",
                              '[verify]\nredis_server = "redis-server"\n'
                              'redis_check_rdb = "redis-check-rdb"\n')
        backup_id = backup(config)
    proc = run_cli("-c", str(config), "verify", "--drill", backup_id)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"cannot drill: redis-server is {SERVERS[0].label}, unable to load this backup's RDB " \
        "(version 11" in proc.stdout and "written by Valkey 8.1.8" in proc.stdout
    proc = run_cli("-c", str(config), "verify", "--deep", backup_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deep check skipped: redis-check-rdb is Redis 7.0.15, which cannot read RDB " \
        "version 11 (written by Valkey 8.1.8)" in proc.stdout


def test_config_check_says_whether_the_drill_server_loads_what_production_writes(
        tmp_path: Path) -> None:
    redis82 = matrix_server("redis-8.2")
    with running_service(tmp_path, name="prod", binary=redis82.binary) as prod:
        fits = write_config(tmp_path / "fits.toml", prod.server, tmp_path / "b")
        proc = run_cli("-c", str(fits), "config", "check")
        assert proc.returncode == 0, proc.stderr
        assert f"# ok: drill server {redis82.binary} is Redis 8.2.3: it loads what Redis " \
            "8.2.3 writes (RDB 12)" in proc.stdout
        old = write_config(tmp_path / "old.toml", prod.server, tmp_path / "b",
                           '[verify]\nredis_server = "redis-server"\n')
        proc = run_cli("-c", str(old), "config", "check")
        assert proc.returncode == 0, proc.stderr
        assert f"# WARNING: drill server redis-server is {SERVERS[0].label}, which cannot load " \
            "what Redis 8.2.3 writes (RDB 12; it loads RDB versions up to 10)" in proc.stdout
    proc = run_cli("-c", str(old), "config", "check")  # production down: it cannot tell
    assert proc.returncode == 0 and "cannot tell whether it loads" in proc.stdout
