"""Restore from S3 (a real moto HTTP endpoint): an encrypted, compressed backup that exists
only in the bucket is found there, decrypted with --identity-file and restored."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyrage
import pytest

from tests.conftest import (
    PASSWORD,
    S3_ENV,
    S3_SECRET,
    Server,
    last_line,
    run_cli,
    s3_section,
    write_config,
)
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
