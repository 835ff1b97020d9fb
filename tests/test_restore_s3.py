"""Restore from S3 (a real moto HTTP endpoint): an encrypted, compressed backup that exists
only in the bucket is found there, decrypted with --identity-file and restored."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import pyrage
import pytest

from tests.conftest import (
    PASSWORD,
    S3_ENV,
    S3_KEY_ID,
    S3_SECRET,
    Server,
    last_line,
    run_cli,
    s3_section,
    write_config,
)
from tests.faults.s3proxy import FaultProxy
from tests.test_restore import Service, contents, populate, rewrite, running_service


@pytest.fixture
def service(tmp_path: Path, server_under_test: Server) -> Iterator[Service]:
    with running_service(tmp_path, stop_timeout=30, binary=server_under_test.binary) as svc:
        yield svc


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = run_cli("-c", str(config), *args, env=S3_ENV, timeout=120)
    assert PASSWORD not in proc.stdout + proc.stderr and S3_SECRET not in proc.stdout + proc.stderr
    return proc


@pytest.mark.matrix
def test_encrypted_compressed_restore_from_s3(tmp_path: Path, service: Service,
                                              moto_endpoint: str, bucket: str) -> None:
    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "restore.key"
    key_file.write_text(f"# created for the test\n{identity}\n")
    backups = tmp_path / "backups"
    extra = (f'age_recipients = ["{identity.to_public()}"]\ncompression = "zstd"\n'
             + s3_section(moto_endpoint, bucket, "keep_local = false")
             + f'\n[restore]\nmethod = "command"\nstart_timeout = "20s"\n'
             f"stop_command = {json.dumps(service.stop_command())}\n"
             f"start_command = {json.dumps(service.start_command())}\n")
    config = write_config(tmp_path / "config.toml", service.server, backups, extra)
    populate(service, "orig")
    expected = contents(service)
    made = cli(config, "backup", "--no-prune")
    assert made.returncode == 0, made.stderr
    backup_id = last_line(made.stdout)
    assert not list(backups.glob(f"{backup_id}*"))  # only in the bucket
    rewrite(service)

    no_key = cli(config, "restore", "--yes")
    assert no_key.returncode == 2 and "--identity-file" in no_key.stderr

    dry = cli(config, "restore", "--dry-run", "--identity-file", str(key_file))
    assert dry.returncode == 0, dry.stderr
    assert f"{backup_id} [s3]" in dry.stdout and "zstd, encrypted" in dry.stdout

    proc = cli(config, "restore", "--yes", "--identity-file", str(key_file))
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == expected
    assert str(identity) not in proc.stdout + proc.stderr

    wrong = tmp_path / "wrong.key"
    wrong.write_text(f"{pyrage.x25519.Identity.generate()}\n")
    bad = cli(config, "restore", backup_id, "--from", "s3", "--yes", "--identity-file",
              str(wrong))
    assert bad.returncode == 3 and "cannot decrypt" in bad.stderr
    assert contents(service) == expected


def requests_of(proxy: FaultProxy) -> list[str]:
    """The S3 requests since the last clear: get/head name what they read."""
    return [f"{e.op} {'manifest' if e.key.endswith('.json') else 'artifact'}"
            if e.op in ("get", "head") else e.op for e in proxy.log]


def test_a_restore_of_an_id_reads_its_manifest_instead_of_listing_the_bucket(
        tmp_path: Path, proxy: FaultProxy, bucket: str) -> None:
    backups = tmp_path / "backups"
    with running_service(tmp_path, stop_timeout=30) as service:
        extra = (s3_section(proxy.url, bucket, "keep_local = false")
                 + f'\n[restore]\nmethod = "command"\n'
                 f"stop_command = {json.dumps(service.stop_command())}\n"
                 f"start_command = {json.dumps(service.start_command())}\n")
        config = write_config(tmp_path / "config.toml", service.server, backups, extra)
        populate(service, "orig")
        made = [last_line(cli(config, "backup", "--no-prune").stdout) for _ in range(3)]
        assert len(set(made)) == 3

        proxy.clear()
        latest = cli(config, "restore", "--dry-run", "--from", "s3")
        assert latest.returncode == 0, latest.stderr
        listed = requests_of(proxy)  # the listing: every manifest and the open uploads
        assert sorted(listed) == sorted(["list", *["get manifest"] * 3, "multipart-list",
                                         "get artifact"])
        for where in (("--from", "s3"), ()):  # nothing local: local is looked at, then S3
            proxy.clear()
            direct = cli(config, "restore", made[0], "--dry-run", *where)
            assert direct.returncode == 0, direct.stderr
            assert f"{made[0]} [s3]" in direct.stdout
            assert requests_of(proxy) == ["get manifest", "head artifact", "get artifact"]

        gone = made[0][:-1] + ("0" if made[0][-1] != "0" else "1")
        proxy.clear()
        missing = cli(config, "restore", gone, "--dry-run")
        assert missing.returncode == 1 and f"backup {gone} does not exist" in missing.stderr
        assert requests_of(proxy) == ["get manifest"]

        client = boto3.client("s3", endpoint_url=proxy.url, aws_access_key_id=S3_KEY_ID,
                              aws_secret_access_key=S3_SECRET, region_name="us-east-1")
        artifact = next(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]
                        if o["Key"].split("/")[-1].startswith(made[1] + ".rdb"))
        client.delete_object(Bucket=bucket, Key=artifact)
        corrupt = cli(config, "restore", made[1], "--dry-run")
        assert corrupt.returncode == 3
        assert f"backup {made[1]} in s3 is corrupt: artifact" in corrupt.stderr
