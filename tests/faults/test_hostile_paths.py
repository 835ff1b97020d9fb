"""Hostile names: manifests and S3 keys with `../`, absolute paths, NUL and overlong names never
make backupd read, list, verify as ok, restore or delete anything outside the backup dir or the
S3 prefix; and what backupd cannot understand (a manifest of a newer format) is never deleted
as a leftover.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from backupd import config as config_mod
from backupd.actions.prune import prune_location
from backupd.errors import UsageError
from backupd.manifest import now_utc
from backupd.retention import Policy
from backupd.storage.local import LocalStorage
from backupd.storage.s3 import S3Storage
from tests.conftest import S3_ENV, RedisServer, s3_section, write_config
from tests.faults.harness import Bucket, cli, cli_fast, complete_local, fault_case, populate

KEEP_1 = "keep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n"
OTHER = "20300101T000000Z-abcdef"


@pytest.fixture
def server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    server = redis_factory()
    populate(server.port, 500, 40)
    return server


def two_backups(config: Path) -> list[str]:
    ids = []
    for _ in range(2):
        proc = cli(config, "backup", "--no-prune")
        assert proc.returncode == 0, proc.stderr
        ids.append(proc.stdout.strip().splitlines()[-1])
    return ids


def test_hostile_s3_keys_never_escape_the_prefix(tmp_path: Path, server: RedisServer,
                                                 s3: Bucket) -> None:
    fault_case("s3: hostile keys around the prefix")
    config = write_config(tmp_path / "c.toml", server, tmp_path / "backups",
                          s3_section(s3.endpoint, s3.name, "[s3.retention]\n" + KEEP_1))
    older, newer = two_backups(config)
    client = s3.client()
    p = s3.prefix

    def body(key: str) -> bytes:
        return bytes(client.get_object(Bucket=s3.name, Key=key)["Body"].read())

    good_manifest = json.loads(body(f"{p}{older}.json"))
    good_artifact = body(f"{p}{older}.rdb.zst")

    def manifest_for(backup_id: str, artifact: str) -> bytes:
        return json.dumps(dict(good_manifest, id=backup_id, artifact=artifact)).encode()

    foreign = {  # never ours: outside the prefix, or not directly under it
        f"redis/{OTHER}.json": manifest_for(OTHER, f"{OTHER}.rdb.zst"),
        f"redis/{OTHER}.rdb.zst": good_artifact,
        f"{p}../{OTHER}.json": manifest_for(OTHER, f"{OTHER}.rdb.zst"),
        f"{p}../{OTHER}.rdb.zst": good_artifact,
        f"{p}/{OTHER}.json": manifest_for(OTHER, f"{OTHER}.rdb.zst"),
        f"/{p}{OTHER}.json": manifest_for(OTHER, f"{OTHER}.rdb.zst"),
        f"redis/prodX/{OTHER}.json": manifest_for(OTHER, f"{OTHER}.rdb.zst"),
        f"{p}sub/{OTHER}.json": manifest_for(OTHER, f"{OTHER}.rdb.zst"),
        f"{p}{OTHER}.json/../../x": b"x",
        "etc/passwd": b"root:x:0:0",
    }
    hostile = {  # under the prefix, named like ours, pointing elsewhere
        f"{p}20300101T000001Z-aaaaaa.json": manifest_for("20300101T000001Z-aaaaaa",
                                                          f"../{OTHER}.rdb.zst"),
        f"{p}20300101T000002Z-bbbbbb.json": manifest_for("20300101T000002Z-bbbbbb",
                                                          "/etc/passwd"),
        f"{p}20300101T000003Z-cccccc.json": manifest_for("20300101T000003Z-cccccc\0",
                                                          "20300101T000003Z-cccccc.rdb.zst"),
        f"{p}20300101T000003Z-cccccc.rdb.zst": good_artifact,
        f"{p}20300101T000004Z-dddddd.json": manifest_for("20300101T000004Z-dddddd",
                                                          "x" * 2000),
    }
    orphans = {f"{p}20300101T000005Z-eeeeee.rdb\0x": b"nul",
               f"{p}20300101T000006Z-ffffff." + "a" * 900: b"overlong"}
    for key, data in {**foreign, **hostile, **orphans}.items():
        client.put_object(Bucket=s3.name, Key=key, Body=data)

    listed = cli_fast(config, "list", "--json", "--location", "s3")
    assert listed.code == 0, listed.stderr
    assert sorted(e["id"] for e in json.loads(listed.stdout)) == sorted([older, newer])
    verified = cli_fast(config, "verify", "--all", "--location", "s3")
    assert verified.code == 3 and not verified.crashed, verified.stdout
    assert verified.stdout.count("CORRUPT") == 4 and verified.stdout.count("ok ") == 2
    for broken in ("20300101T000001Z-aaaaaa", "20300101T000002Z-bbbbbb"):
        ran = cli_fast(config, "restore", broken, "--from", "s3", "--dry-run")
        assert ran.code == 3 and not ran.crashed, ran.stderr
    ran = cli_fast(config, "prune", "--location", "s3")
    assert ran.code == 0, ran.stdout + ran.stderr
    assert list(s3.complete()) == [newer]
    cfg = config_mod.load(config, env={})
    storage = S3Storage(cfg.s3, S3_ENV)
    report = prune_location(storage, Policy.from_config(cfg.s3.retention),
                            now=now_utc() + timedelta(days=2), orphans=True)
    names = {k[len(p):] for k in orphans}
    # The NUL key cannot go through DeleteObjects (not XML 1.0; S3 rejects it too, moto with
    # a 500 for the whole batch): reported as failed, never a crash, nothing else touched.
    assert set(report.orphans_deleted) | set(report.failed) == names, report
    assert report.orphans_deleted or report.failed
    remaining = set(s3.keys())
    for key, data in {**foreign, **hostile}.items():  # outside, or not understood: kept
        assert key in remaining and body(key) == data, key
    for name in ("../x", "/etc/passwd", f"{OTHER}/../../x", f"{OTHER}.json", "", "a" * 2000):
        with pytest.raises(UsageError):
            storage.delete_orphans([name])
    for name in ("../x", f"{OTHER}\0", f"{OTHER}/..", "a" * 2000):
        with pytest.raises(UsageError):
            storage.delete([name])
    assert set(s3.keys()) == remaining


def test_hostile_local_names_never_escape_the_backup_dir(tmp_path: Path,
                                                         server: RedisServer) -> None:
    fault_case("local: hostile names and ids")
    backups = tmp_path / "backups"
    config = write_config(tmp_path / "c.toml", server, backups)
    ids = two_backups(config)
    canary = tmp_path / "outside" / f"{OTHER}.rdb.zst"
    canary.parent.mkdir()
    canary.write_bytes(b"not yours")
    storage = LocalStorage(backups)
    names = ["../outside/" + canary.name, str(canary), f"{OTHER}/../../outside/{canary.name}",
             f"{OTHER}.rdb.zst\0", f"{OTHER}\0/../x", "x" * 300, f"{OTHER}." + "a" * 300, ""]
    result = storage.delete_orphans(names)
    assert result.deleted == [f"{OTHER}." + "a" * 300] or not result.deleted, result
    assert canary.read_bytes() == b"not yours"
    for selector in ("../../etc/passwd", "/etc/passwd", f"{OTHER}/../../x", f"{ids[0]}/..",
                     f"{ids[0]}\n", " " + ids[0], "a" * 5000):
        for args in (("verify", selector), ("restore", selector, "--dry-run")):
            ran = cli_fast(config, *args)
            assert ran.code == 2 and not ran.crashed, (args, ran.stderr)
    assert sorted(complete_local(backups)) == sorted(ids)
    assert canary.read_bytes() == b"not yours"


@pytest.mark.parametrize("damage", ["newer format", pytest.param(
    "one flipped byte", marks=pytest.mark.slow), pytest.param("truncated", marks=pytest.mark.slow)])
def test_a_manifest_not_understood_is_not_a_leftover(tmp_path: Path, server: RedisServer,
                                                     damage: str) -> None:
    """A manifest this backupd cannot read (written by a newer backupd, or damaged) does not
    make its artifact a leftover: the next backup must not delete it (it may be the only copy
    of that backup; the manifest can be repaired or read by the newer version)."""
    fault_case(f"local: manifest not understood ({damage}): its artifact kept")
    backups = tmp_path / "backups"
    config = write_config(tmp_path / "c.toml", server, backups,
                          "[retention]\n" + KEEP_1)
    first, _ = two_backups(config)
    path = backups / f"{first}.json"
    text = path.read_bytes()
    if damage == "newer format":
        path.write_bytes(json.dumps(dict(json.loads(text), format_version=2)).encode())
    elif damage == "one flipped byte":
        path.write_bytes(text.replace(b'"id"', b'"iD"', 1))
    else:
        path.write_bytes(text[: len(text) // 2])
    artifact = backups / f"{first}.rdb.zst"
    before = artifact.read_bytes()
    proc = cli(config, "backup")  # cleans leftovers, then prunes with keep_last = 1
    assert proc.returncode == 0, proc.stderr
    assert artifact.read_bytes() == before
    assert path.exists()
    ran = cli_fast(config, "verify", first)
    assert ran.code == 3, ran.stdout
    ran = cli_fast(config, "prune", "--json")
    report = json.loads(ran.stdout)[0]
    assert all(o["name"] != artifact.name for o in report["orphans"]), report
