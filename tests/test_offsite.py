"""Offsite copies end to end: the real CLI, a real redis-server and a real S3 HTTP endpoint."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import boto3
import pytest

from tests.conftest import (
    PASSWORD,
    S3_ENV,
    S3_KEY_ID,
    S3_SECRET,
    RedisServer,
    fill,
    last_line,
    run_cli,
    s3_section,
    write_config,
)


def s3(endpoint: str) -> object:
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY_ID,
                        aws_secret_access_key=S3_SECRET, region_name="us-east-1")


def keys(endpoint: str, bucket: str) -> list[str]:
    resp = s3(endpoint).list_objects_v2(Bucket=bucket)  # type: ignore[attr-defined]
    return sorted(o["Key"] for o in resp.get("Contents", []))


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = run_cli("-c", str(config), *args, env=S3_ENV)
    assert PASSWORD not in proc.stdout + proc.stderr
    assert S3_SECRET not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def offsite(tmp_path: Path, redis_server: RedisServer, moto_endpoint: str,
            bucket: str) -> tuple[Path, Path, str]:
    fill(redis_server, 300)
    backups = tmp_path / "backups"
    config = write_config(tmp_path / "c.toml", redis_server, backups,
                          s3_section(moto_endpoint, bucket))
    return config, backups, bucket


@pytest.mark.matrix
def test_backup_is_uploaded_with_its_manifest(offsite: tuple[Path, Path, str],
                                              moto_endpoint: str) -> None:
    config, backups, bucket = offsite
    foreign = s3(moto_endpoint)
    foreign.put_object(Bucket=bucket, Key="redis/prod/README", Body=b"not ours")  # type: ignore[attr-defined]
    code, out, err = cli(config, "backup")
    assert code == 0, err
    backup_id = last_line(out)
    assert keys(moto_endpoint, bucket) == sorted(
        ["redis/prod/README", f"redis/prod/{backup_id}.json",
         f"redis/prod/{backup_id}.rdb.zst"])
    remote = json.loads(foreign.get_object(  # type: ignore[attr-defined]
        Bucket=bucket, Key=f"redis/prod/{backup_id}.json")["Body"].read())
    assert remote["upload"] == "done" and remote["keys"] == 301
    local = json.loads((backups / f"{backup_id}.json").read_text())
    assert local["upload"] == "done"
    code, out, _ = cli(config, "list", "--json")
    assert json.loads(out)[0]["locations"] == ["local", "s3"]
    code, out, _ = cli(config, "verify", "--location", "s3")
    assert code == 0 and "rdb-crc:ok" in out


def test_outage_keeps_local_copy_pending_then_catches_up(
        tmp_path: Path, redis_server: RedisServer, moto_endpoint: str, bucket: str) -> None:
    fill(redis_server, 50)
    backups = tmp_path / "backups"
    down = write_config(tmp_path / "down.toml", redis_server, backups, s3_section(
        f"http://127.0.0.1:{closed_port()}", bucket))
    code, out, err = cli(down, "backup")
    assert code == 1
    assert "local copy is safe" in err
    first = last_line(out)
    assert json.loads((backups / f"{first}.json").read_text())["upload"] == "pending"
    code, out, err = cli(down, "backup")  # the pending one is retried first, and fails again
    second = last_line(out)
    up = write_config(tmp_path / "up.toml", redis_server, backups,
                      s3_section(moto_endpoint, bucket))
    code, out, err = cli(up, "list", "--json")
    assert [e["upload"] for e in json.loads(out)] == ["pending", "pending"]
    code, out, err = cli(up, "upload", "--pending")
    assert code == 0, err
    assert f"uploaded {first}" in out and f"uploaded {second}" in out
    assert f"redis/prod/{first}.json" in keys(moto_endpoint, bucket)
    code, out, err = cli(up, "upload", "--pending")
    assert code == 0 and "nothing pending" in out


def test_next_backup_uploads_pending_first(tmp_path: Path, redis_server: RedisServer,
                                           moto_endpoint: str, bucket: str) -> None:
    backups = tmp_path / "backups"
    down = write_config(tmp_path / "down.toml", redis_server, backups, s3_section(
        f"http://127.0.0.1:{closed_port()}", bucket))
    first = last_line(cli(down, "backup")[1])
    up = write_config(tmp_path / "up.toml", redis_server, backups,
                      s3_section(moto_endpoint, bucket))
    code, out, err = cli(up, "backup")
    assert code == 0, err
    second = last_line(out)
    names = keys(moto_endpoint, bucket)
    assert f"redis/prod/{first}.json" in names and f"redis/prod/{second}.json" in names


def test_keep_local_false(tmp_path: Path, redis_server: RedisServer, moto_endpoint: str,
                          bucket: str) -> None:
    backups = tmp_path / "backups"
    config = write_config(tmp_path / "c.toml", redis_server, backups, s3_section(
        moto_endpoint, bucket, "keep_local = false"))
    code, out, err = cli(config, "backup")
    assert code == 0, err
    backup_id = last_line(out)
    assert not list(backups.glob(f"{backup_id}*"))
    listed = json.loads(cli(config, "list", "--json")[1])
    assert listed[0]["id"] == backup_id and listed[0]["locations"] == ["s3"]


@pytest.mark.slow  # retention on a storage runs fast: test_storage_rails.py
def test_prune_on_both_sides_with_reasons(offsite: tuple[Path, Path, str],
                                          moto_endpoint: str) -> None:
    config, backups, bucket = offsite
    text = config.read_text()
    config.write_text(text + "\n[schedule]\nprune = false\n")
    ids = [last_line(cli(config, "backup")[1]) for _ in range(4)]
    config.write_text(text.replace("[s3]", "[retention]\nkeep_last = 3\nkeep_daily = 0\n"
                                   "keep_weekly = 0\nkeep_monthly = 0\n\n[s3]")
                      + "\n[s3.retention]\nkeep_last = 2\nkeep_daily = 0\nkeep_weekly = 0\n"
                      "keep_monthly = 0\n")
    code, out, _ = cli(config, "prune", "--dry-run")
    assert code == 0 and "would delete" in out
    assert len(keys(moto_endpoint, bucket)) == 8 and len(list(backups.glob("*.json"))) == 4
    code, out, err = cli(config, "prune", "--json")
    assert code == 0, err
    reports = {r["location"]: r for r in json.loads(out)}
    assert reports["local"]["deleted"] == [ids[0]]
    assert sorted(reports["s3"]["deleted"]) == sorted(ids[:2])
    kept = [b for b in reports["s3"]["backups"] if b["action"] == "keep"]
    assert [b["id"] for b in kept] == ids[:1:-1] and kept[0]["reasons"] == ["last"]
    assert keys(moto_endpoint, bucket) == sorted(
        f"redis/prod/{i}{ext}" for i in ids[2:] for ext in (".json", ".rdb.zst"))


@pytest.mark.slow  # the rail itself runs fast: test_storage_rails.py
def test_prune_keeps_pending_local_backups(tmp_path: Path, redis_server: RedisServer,
                                           bucket: str) -> None:
    backups = tmp_path / "backups"
    down = write_config(tmp_path / "down.toml", redis_server, backups, s3_section(
        f"http://127.0.0.1:{closed_port()}", bucket) + "\n[retention]\nkeep_last = 1\n"
        "keep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n")
    ids = [last_line(cli(down, "backup")[1]) for _ in range(2)]
    code, out, _ = cli(down, "prune", "--location", "local")
    assert code == 0
    assert "upload pending" in out
    assert all((backups / f"{i}.json").exists() for i in ids)
    code, out, _ = cli(down, "prune", "--location", "s3")
    assert code == 1 and "cannot list backups, nothing deleted" in out


def test_check_remote(offsite: tuple[Path, Path, str], tmp_path: Path,
                      redis_server: RedisServer, moto_endpoint: str) -> None:
    config, _, _ = offsite
    code, out, _ = cli(config, "config", "check", "--check-remote")
    assert code == 0 and "reachable" in out
    wrong = write_config(tmp_path / "w.toml", redis_server, tmp_path / "b",
                         s3_section(moto_endpoint, "no-such-bucket-here"))
    code, _, err = cli(wrong, "config", "check", "--check-remote")
    assert code == 1 and "does not exist" in err


def test_corrupt_remote_object_fails_verify(offsite: tuple[Path, Path, str],
                                            moto_endpoint: str) -> None:
    config, _, bucket = offsite
    backup_id = last_line(cli(config, "backup")[1])
    client = s3(moto_endpoint)
    key = f"redis/prod/{backup_id}.rdb.zst"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())  # type: ignore[attr-defined]
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))  # type: ignore[attr-defined]
    code, out, _ = cli(config, "verify", "--location", "s3", backup_id)
    assert code == 3 and "CORRUPT" in out


def test_a_daemon_cycle_gets_only_the_new_manifest_from_s3(
        tmp_path: Path, redis_server: RedisServer, moto_endpoint: str, bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`backupd run` is one process for many cycles: the manifests its earlier cycles read
    are not fetched again (without the cache, every cycle GETs every manifest)."""
    from backupd import config as config_mod
    from backupd.actions.cycle import run_cycle
    from backupd.storage.s3 import S3Storage
    from backupd.storage.s3.manifest_cache import MANIFESTS

    fill(redis_server, 50)
    path = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups",
                        s3_section(moto_endpoint, bucket))
    env = {**S3_ENV, "REDIS_PASSWORD": PASSWORD}
    cfg = config_mod.load(path, env=env)
    fetched: list[str] = []
    fetch = S3Storage._fetch_manifest

    def counted(self: S3Storage, backup_id: str) -> object:
        fetched.append(backup_id)
        return fetch(self, backup_id)

    monkeypatch.setattr(S3Storage, "_fetch_manifest", counted)
    per_cycle: list[tuple[int, int]] = []  # (GETs without the cache, with it)
    for _ in range(4):
        MANIFESTS.clear()  # as before: nothing kept between cycles
        fetched.clear()
        run_cycle(cfg, env=env)
        uncached = len(fetched)
        fetched.clear()
        run_cycle(cfg, env=env)
        per_cycle.append((uncached, len(fetched)))
    assert [with_cache for _, with_cache in per_cycle] == [1, 1, 1, 1]  # the new backup's
    assert [without for without, _ in per_cycle] == [1, 3, 5, 7]  # every backup in the bucket
