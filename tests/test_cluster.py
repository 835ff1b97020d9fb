"""Cluster backups end to end on a local Redis Cluster (3 primaries + 3 replicas): the real
CLI, real redis-server processes, moto for S3."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupd.cluster import slots as sl
from backupd.errors import IntegrityError, UsageError
from backupd.manifest import parse
from tests.cluster_topology import (
    LocalCluster,
    cluster_config,
    fill_cluster,
    local_cluster,
    start_cluster,
)
from tests.conftest import (
    PASSWORD,
    S3_ENV,
    S3_SECRET,
    RedisServer,
    Server,
    last_line,
    run_cli,
    s3_section,
)
from tests.test_offsite import closed_port, keys

KEYS = 600 + 10  # fill_cluster's strings and its hash-tagged group


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    made = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        fill_cluster(made)
        yield made
    finally:
        made.stop()


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = run_cli("-c", str(config), *args, env=S3_ENV)
    assert PASSWORD not in proc.stdout + proc.stderr
    assert S3_SECRET not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def backed_up(config: Path, backups: Path) -> dict[str, object]:
    code, out, err = cli(config, "backup")
    assert code == 0, err
    return dict(json.loads((backups / f"{last_line(out)}.json").read_text()))


def test_slots_hash_like_the_cluster(cluster: LocalCluster) -> None:
    assert sl.crc16(b"123456789") == 0x31C3
    client = cluster.any_client()
    for key in ("foo", "{user1000}.following", "a{}b", "{}{x}", "x{y", "{tag}", "é"):
        assert sl.keyslot(key.encode()) == client.execute_command("CLUSTER", "KEYSLOT", key)
    assert sl.gaps([(0, 10), (20, sl.SLOTS - 1)]) == [(11, 19)]
    assert sl.normalize([(5, 9), (0, 4)]) == [(0, 9)]


def test_backup_covers_every_slot_and_names_each_shard(cluster: LocalCluster,
                                                       tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    manifest = backed_up(cluster_config(tmp_path / "c.toml", cluster, backups), backups)
    facts = manifest["cluster"]
    assert isinstance(facts, dict)
    shards = facts["shards"]
    primaries = cluster.primaries()
    assert [(s["host"], s["port"]) for s in shards] == [("127.0.0.1", p.port) for p in primaries]
    assert [s["node_id"] for s in shards] == [
        p.client().execute_command("CLUSTER", "MYID") for p in primaries]
    assert {s["role"] for s in shards} == {"master"}
    assert sl.gaps(tuple(r) for s in shards for r in s["slots"]) == []
    assert facts["slots_covered"] == sl.SLOTS and facts["epoch"] >= 1
    assert 0 <= facts["spread_s"] < 10
    assert [s["keys"] for s in shards] == [p.client().dbsize() for p in primaries]
    assert [s["master_replid"] for s in shards] == [
        p.client().info("replication")["master_replid"] for p in primaries]
    assert manifest["keys"] == KEYS and manifest["upload"] == "none"
    for shard in shards:
        path = backups / shard["artifact"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_size == shard["stored_size"]
    assert sorted(os.listdir(backups)) == sorted(
        [".backupd.lock", f"{manifest['id']}.json", *[s["artifact"] for s in shards]])


def test_list_verify_and_drill_a_cluster_backup(cluster: LocalCluster, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups)
    backup_id = backed_up(config, backups)["id"]
    code, out, _ = cli(config, "list")
    assert code == 0 and "CLUSTER" in out and "3 shards, 16384 slots" in out
    listed = json.loads(cli(config, "list", "--json")[1])
    assert (listed[0]["shards"], listed[0]["slots_covered"]) == (3, sl.SLOTS)
    code, out, err = cli(config, "verify", "--deep")
    assert code == 0 and "redis-check-rdb" in out, out + err
    code, out, err = cli(config, "verify", "--drill")
    assert code == 0, out + err
    assert f"loaded 3 shards, {KEYS} keys, every key in its shard's slots" in out
    shard = backups / f"{backup_id}.shard-001.rdb.zst"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, _ = cli(config, "verify")
    assert code == 3 and f"shard 1 ({backup_id}.shard-001.rdb.zst)" in out


def test_a_missing_shard_breaks_the_backup_and_keeps_the_others(cluster: LocalCluster,
                                                                tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups)
    backup_id = backed_up(config, backups)["id"]
    (backups / f"{backup_id}.shard-002.rdb.zst").unlink()
    _, out, err = cli(config, "list")
    assert "no backups" in out and f"artifact {backup_id}.shard-002.rdb.zst" in err
    assert backed_up(config, backups)["id"] != backup_id  # the next run's leftover cleanup
    assert (backups / f"{backup_id}.shard-000.rdb.zst").exists()  # ... keeps what it can't read


def test_drill_names_a_key_outside_its_shards_slots(redis_server: RedisServer) -> None:
    from backupd.actions.restore.cluster_drill import misplaced_keys

    client = redis_server.client()
    client.set("foo", "1")  # slot 12182
    client.set("{user1000}.following", "2")  # slot 3443
    misplaced, scanned = misplaced_keys(client, [(0, 5460)])
    assert scanned == 2 and misplaced == [("foo", 12182)]


def test_from_replicas_in_sync(cluster: LocalCluster, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups,
                            redis_extra='prefer = "replica"')
    facts = backed_up(config, backups)["cluster"]
    assert isinstance(facts, dict)
    assert {s["role"] for s in facts["shards"]} == {"replica"}
    assert [s["port"] for s in facts["shards"]] == [
        cluster.replica_of(p).port for p in cluster.primaries()]
    assert [s["keys"] for s in facts["shards"]] == [p.client().dbsize()
                                                    for p in cluster.primaries()]


def test_upload_pending_retention_as_one_unit(cluster: LocalCluster, tmp_path: Path,
                                              moto_endpoint: str, bucket: str) -> None:
    backups = tmp_path / "backups"
    down = cluster_config(tmp_path / "down.toml", cluster, backups,
                          s3_section(f"http://127.0.0.1:{closed_port()}", bucket))
    code, out, err = cli(down, "backup")
    assert code == 1 and "local copy is safe" in err
    first = last_line(out)
    assert json.loads((backups / f"{first}.json").read_text())["upload"] == "pending"
    retention = "[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n"
    up = cluster_config(tmp_path / "up.toml", cluster, backups, s3_section(
        moto_endpoint, bucket) + "\n[s3.retention]\nkeep_last = 1\nkeep_daily = 0\n"
        "keep_weekly = 0\nkeep_monthly = 0\n" + retention)
    code, out, err = cli(up, "upload", "--pending")
    assert code == 0 and f"uploaded {first}" in out, err
    shard_keys = [f"redis/prod/{first}.shard-00{i}.rdb.zst" for i in range(3)]
    assert keys(moto_endpoint, bucket) == sorted([f"redis/prod/{first}.json", *shard_keys])
    code, out, err = cli(up, "verify", "--location", "s3", "--drill")
    assert code == 0 and "loaded 3 shards" in out, err
    code, out, err = cli(up, "backup")  # uploads, then retention deletes the first, whole
    assert code == 0, err
    second = last_line(out)
    assert keys(moto_endpoint, bucket) == sorted(
        [f"redis/prod/{second}.json",
         *[f"redis/prod/{second}.shard-00{i}.rdb.zst" for i in range(3)]])
    assert sorted(os.listdir(backups)) == sorted(
        [".backupd.lock", f"{second}.json",
         *[f"{second}.shard-00{i}.rdb.zst" for i in range(3)]])


def test_manifest_shards_are_parsed_strictly(cluster: LocalCluster, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    manifest = backed_up(cluster_config(tmp_path / "c.toml", cluster, backups), backups)
    backup_id = str(manifest["id"])
    good = json.dumps(manifest).encode()
    assert parse(good, backup_id).cluster is not None
    assert [p.artifact for p in parse(good, backup_id).parts()] == [
        f"{backup_id}.shard-00{i}.rdb.zst" for i in range(3)]
    for change in ({"artifact": "../../etc/passwd"}, {"index": 5}, {"slots": [[5, 2]]},
                   {"node_id": "x"}, {"keys": "1"}):
        broken = json.loads(good)
        broken["cluster"]["shards"][1].update(change)
        with pytest.raises(IntegrityError):
            parse(json.dumps(broken).encode(), backup_id)


@pytest.mark.parametrize(("extra", "message"), [
    ('source = "volume"', "must be 'replication'"),
    ('host = "10.0.0.1"', "exclude each other"),
    ('[redis.sentinel]\nhosts = ["127.0.0.1:26379"]\nmaster_name = "m"',
     "exclude each other"),
    ('[pitr]\nenabled = true', "'pitr.enabled' and 'redis.cluster.seeds' exclude each other"),
])
def test_cluster_config_is_checked(tmp_path: Path, extra: str, message: str) -> None:
    config = tmp_path / "c.toml"
    sections = extra if extra.startswith("[") else ""
    config.write_text(f"""
[redis]
source = "replication"
{extra if not sections else ""}

[redis.cluster]
seeds = ["127.0.0.1:7000"]

{sections}

[backup]
dir = "{tmp_path / 'b'}"
""".replace('source = "replication"\nsource = "volume"', 'source = "volume"'))
    code, _, err = cli(config, "config", "check")
    assert code == 2 and message in err, err


def test_config_check_describes_the_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    code, out, err = cli(cluster_config(tmp_path / "c.toml", cluster, tmp_path / "b"),
                         "config", "check")
    assert code == 0, err
    assert "# target: Redis Cluster via 2 seeds" in out and "3 shards, 16384 of 16384" in out
    assert "# ok: drill server" in out


@pytest.mark.matrix
def test_backup_and_drill_on_every_server(server_under_test: Server, tmp_path: Path) -> None:
    """Redis 7.0, Redis 8.2 and Valkey 8.1 clusters (CLUSTER SHARDS, RDB versions)."""
    with local_cluster(tmp_path / "cluster", binary=server_under_test.binary) as made:
        fill_cluster(made)
        backups = tmp_path / "backups"
        config = cluster_config(tmp_path / "c.toml", made, backups, extra=(
            f'[verify]\nredis_server = "{server_under_test.binary}"\n'
            f'redis_check_rdb = "{server_under_test.check_rdb}"\n'))
        manifest = backed_up(config, backups)
        assert manifest["rdb_version"] == server_under_test.rdb_version
        assert manifest["redis"]["server"] == server_under_test.kind  # type: ignore[index]
        code, out, err = cli(config, "verify", "--drill")
        assert code == 0 and f"{KEYS} keys, every key in its shard's slots" in out, out + err
        code, out, err = cli(config, "restore", str(manifest["id"]), "--yes")
        assert code == 0 and f"restored {KEYS} keys" in out, err


BACKUP_ACL = ["on", f">{PASSWORD}", "+ping", "+info", "+replconf", "+sync", "+psync",
              "+cluster|info", "+cluster|shards", "+cluster|slots", "+cluster|nodes",
              "+cluster|myid"]
RESTORE_ACL = ["+flushall", "+restore", "+dbsize", "+time", "~*"]


def test_the_readme_acl_is_enough_on_every_node(cluster: LocalCluster, tmp_path: Path) -> None:
    for node in cluster.running():
        node.client().acl_setuser("backup", reset=True)
        node.client().execute_command("ACL", "SETUSER", "backup", *BACKUP_ACL)
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups,
                            redis_extra='username = "backup"')
    try:
        backup_id = backed_up(config, backups)["id"]
        code, _, err = cli(config, "restore", str(backup_id), "--yes")
        assert code == 1 and "+flushall +restore +dbsize +time ~*" in err, err  # not yet
        assert backed_up(config, backups)["keys"] == KEYS  # refused before anything changed
        for node in cluster.running():
            node.client().execute_command("ACL", "SETUSER", "backup", *RESTORE_ACL)
        code, out, err = cli(config, "restore", str(backup_id), "--yes")
        assert code == 0 and f"restored {KEYS} keys" in out, err
    finally:
        for node in cluster.running():
            node.client().acl_deluser("backup")


def test_an_encrypted_cluster_backup_verifies_drills_and_restores_with_the_identity(
        cluster: LocalCluster, tmp_path: Path) -> None:
    from pyrage import x25519

    identity = x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(f"{identity}\n")
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups,
                            extra=f'age_recipients = ["{identity.to_public()}"]')
    backup_id = str(backed_up(config, backups)["id"])
    assert sorted(p.name for p in backups.glob("*.age")) == [
        f"{backup_id}.shard-00{i}.rdb.zst.age" for i in range(3)]
    code, out, _ = cli(config, "verify", backup_id)
    assert code == 0 and "give --identity-file" in out
    code, out, err = cli(config, "verify", backup_id, "--drill", "--identity-file", str(key))
    assert code == 0 and "loaded 3 shards" in out, out + err
    code, out, err = cli(config, "restore", backup_id, "--yes")
    assert code == 2 and "--identity-file" in err, err
    code, out, err = cli(config, "restore", backup_id, "--yes", "--identity-file", str(key))
    assert code == 0 and f"restored {KEYS} keys" in out, err
    assert str(identity) not in out + err


def test_selective_restore_and_rollback_are_refused_on_a_cluster(cluster: LocalCluster,
                                                                 tmp_path: Path) -> None:
    config = cluster_config(tmp_path / "c.toml", cluster, tmp_path / "b")
    for args in (["--keys", "key:*", "--yes"], ["--rollback", "--yes"]):
        code, _, err = cli(config, "restore", *args)
        assert code == 2 and "do not work on a cluster yet" in err, err


def test_a_tls_cluster_is_backed_up_and_restored_over_tls(tmp_path: Path) -> None:
    """TLS only (clients, replication, bus): the nodes' TLS ports from CLUSTER SHARDS, the
    certificate checked against the CA for each node as for one server."""
    from tests.topology import CA

    ca = CA(tmp_path / "ca")
    made = start_cluster(tmp_path / "cluster", replicas=0, ca=ca)
    try:
        fill_cluster(made)
        backups = tmp_path / "backups"
        config = cluster_config(tmp_path / "c.toml", made, backups, redis_extra=(
            f'tls = true\ntls_ca_file = "{ca.pem.cert}"'))
        manifest = backed_up(config, backups)
        assert manifest["keys"] == KEYS
        code, out, err = cli(config, "verify", "--drill")
        assert code == 0 and "loaded 3 shards" in out, out + err
        code, out, err = cli(config, "restore", str(manifest["id"]), "--yes")
        assert code == 0 and f"restored {KEYS} keys" in out, err
        plain = cluster_config(tmp_path / "plain.toml", made, backups)
        code, _, err = cli(plain, "backup")
        assert code == 1 and "no cluster seed answered" in err, err
    finally:
        made.stop()


def test_shard_names_are_ours_and_derived_from_the_id() -> None:
    from backupd.storage import layout

    backup_id = "20261203T120000Z-abc123"
    name = layout.shard_artifact_name(backup_id, 7, "zstd", True)
    assert name == f"{backup_id}.shard-007.rdb.zst.age"
    assert layout.owner(name) == backup_id and layout.is_ours_local(name)
    assert layout.is_artifact_name(name, backup_id, "zstd", True)
    for wrong in (f"{backup_id}.shard-7.rdb.zst.age", f"{backup_id}.shard-007.rdb.zst",
                  f"{backup_id}.shard-../x", f"{backup_id}.shard-00a.rdb.zst.age",
                  "20261203T120000Z-abc124.shard-007.rdb.zst.age"):
        assert not layout.is_artifact_name(wrong, backup_id, "zstd", True), wrong
    with pytest.raises(UsageError):
        layout.shard_artifact_name(backup_id, 1000, "zstd", False)


def test_metrics_show_shards_and_slot_coverage(cluster: LocalCluster, tmp_path: Path) -> None:
    from backupd.metrics import Metrics

    backups = tmp_path / "backups"
    raw = backed_up(cluster_config(tmp_path / "c.toml", cluster, backups), backups)
    metrics = Metrics()
    metrics.backup_committed(parse(json.dumps(raw).encode(), str(raw["id"])))
    text = metrics.exposition().decode()
    assert "backupd_backup_shards 3.0" in text
    assert "backupd_backup_slots_covered 16384.0" in text


def test_a_shard_missing_in_the_bucket_breaks_that_backup_there(
        cluster: LocalCluster, tmp_path: Path, moto_endpoint: str, bucket: str) -> None:
    import boto3

    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups,
                            s3_section(moto_endpoint, bucket))
    code, out, err = cli(config, "backup")
    assert code == 0, err
    backup_id = last_line(out)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
    s3.delete_object(Bucket=bucket, Key=f"redis/prod/{backup_id}.shard-001.rdb.zst")
    code, out, err = cli(config, "list", "--location", "s3")
    assert "no backups" in out and f"{backup_id}.shard-001.rdb.zst missing" in err, err
    code, out, err = cli(config, "prune")
    assert code == 0, err
    assert f"redis/prod/{backup_id}.shard-000.rdb.zst" in keys(moto_endpoint, bucket)


def test_config_check_of_an_unreachable_cluster_is_a_warning(tmp_path: Path) -> None:
    from tests.test_offsite import closed_port

    config = tmp_path / "c.toml"
    config.write_text(f'[redis]\nsource = "replication"\n[redis.cluster]\n'
                      f'seeds = ["127.0.0.1:{closed_port()}"]\n[backup]\ndir = "{tmp_path}/b"\n')
    code, out, err = cli(config, "config", "check")
    assert code == 0, err
    assert "WARNING: cannot read the slot map: no cluster seed answered" in out
