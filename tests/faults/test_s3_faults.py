"""S3 faults through a fault-injecting proxy in front of moto (tests/faults/s3proxy.py).

Transient 500/503s, resets, stalls and lost responses are retried; an upload that keeps failing
leaves the local backup pending (and present, even with keep_local = false) and the next run
uploads it; a delete that fails is reported and done by a later run; nothing is deleted
locally that is not complete and checked in S3.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from backupd import config as config_mod
from backupd.actions.prune import prune_location
from backupd.manifest import now_utc
from backupd.retention import Policy
from backupd.storage.s3 import S3Storage
from tests.conftest import S3_ENV, RedisServer, write_config
from tests.faults import harness
from tests.faults.harness import (
    Bucket,
    assert_consistent,
    cli,
    complete_local,
    fault_case,
    last_event,
    populate,
    s3_conf,
)
from tests.faults.s3proxy import FaultProxy

KEEP_1 = "keep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n"


def setup_config(tmp_path: Path, server: RedisServer, proxy: FaultProxy, s3: Bucket,
                 **s3_options: object) -> tuple[Path, Path]:
    backups = tmp_path / "backups"
    config = write_config(tmp_path / "c.toml", server, backups,
                          s3_conf(proxy.url, s3.name, **s3_options))  # type: ignore[arg-type]
    return config, backups


def backup(config: Path, expect: int = 0) -> tuple[str, str]:
    proc = cli(config, "backup")
    harness.no_traceback(proc.stderr)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1], proc.stderr


@pytest.fixture
def server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    server = redis_factory()
    populate(server.port, 3000, 64)
    return server


def test_transient_faults_are_retried(tmp_path: Path, server: RedisServer, proxy: FaultProxy,
                                      s3: Bucket) -> None:
    config, backups = setup_config(tmp_path, server, proxy, s3, max_attempts=3,
                                   retention=KEEP_1)
    first, _ = backup(config)
    armed = {"put-artifact": "500", "put-manifest": "503", "head": "reset", "list": "stall",
             "get": "500", "delete-objects": "lost"}
    for op, action in armed.items():
        proxy.arm(action, op, stall=1.5)
        fault_case(f"s3: {action} once on {op}, retried")
    second, _ = backup(config)
    for op, action in armed.items():
        assert proxy.ops(action).count(op) == 1, (op, proxy.log)
        assert proxy.ops("forwarded").count(op) >= 1, (op, proxy.log)
    assert list(s3.complete()) == [second]  # uploaded, and the first one pruned
    assert complete_local(backups)[second]["upload"] == "done"
    assert_consistent(config, backups, bucket=s3)
    assert first in complete_local(backups)


FOREVER = [("put-artifact", "500"), ("put-manifest", "lost"), ("put-artifact", "corrupt"),
           *(pytest.param(*case, marks=pytest.mark.slow) for case in (
               ("put-artifact", "stall"), ("head", "reset"), ("put-manifest", "503")))]


@pytest.mark.parametrize(("op", "action"), FOREVER)
def test_failed_upload_stays_pending(tmp_path: Path, server: RedisServer, proxy: FaultProxy,
                                     s3: Bucket, op: str, action: str) -> None:
    """keep_local = false: the local copy is deleted only once S3 holds the checked backup."""
    fault_case(f"s3: {action} on every {op}: upload pending")
    config, backups = setup_config(tmp_path, server, proxy, s3, keep_local=False)
    proxy.arm(action, op, times=None, stall=1.5)
    backup_id, err = backup(config, expect=1)
    assert "pending" in last_event(err)["error"], err
    local = complete_local(backups)
    assert list(local) == [backup_id] and local[backup_id]["upload"] == "pending"
    in_s3 = s3.complete()
    if action == "lost":  # S3 did store it; only the answer was lost: local stays pending
        assert list(in_s3) == [backup_id]
    else:
        assert in_s3 == {}
    assert_consistent(config, backups, bucket=s3)
    proxy.clear()
    proc = cli(config, "upload", "--pending")
    assert proc.returncode == 0 and f"uploaded {backup_id}" in proc.stdout, proc.stderr
    assert complete_local(backups) == {}  # keep_local = false, now that S3 has it
    assert list(s3.complete()) == [backup_id]
    assert s3.orphans() == []
    ran = harness.cli_fast(config, "verify", backup_id, "--location", "s3")
    assert ran.code == 0, ran.stdout


def test_the_next_run_uploads_the_pending_backup_then_takes_its_own(
        tmp_path: Path, server: RedisServer, proxy: FaultProxy, s3: Bucket) -> None:
    """keep_local = false: the run that uploads a pending backup (whose local copy then goes)
    takes its own backup after it, with an id after the uploaded one."""
    fault_case("s3: a pending backup uploaded by the next run, keep_local = false")
    config, backups = setup_config(tmp_path, server, proxy, s3, keep_local=False)
    proxy.arm("500", "put-artifact", times=None)
    first, _ = backup(config, expect=1)
    proxy.clear()
    second, _ = backup(config)
    assert second > first
    assert complete_local(backups) == {}
    assert sorted(s3.complete()) == [first, second]
    assert s3.orphans() == []
    assert_consistent(config, backups, bucket=s3)


def test_corruption_in_transit_without_checksum_is_found_by_verify(
        tmp_path: Path, server: RedisServer, proxy: FaultProxy, s3: Bucket) -> None:
    """checksum = "none" (for stores that reject checksum headers): a body damaged on the way
    is not caught at upload (size and metadata match); `verify --location s3` finds it."""
    fault_case("s3: body corrupted on the way, no checksum header")
    config, _backups = setup_config(tmp_path, server, proxy, s3, checksum="none")
    proxy.arm("corrupt", "put-artifact")
    backup_id, _ = backup(config)
    assert list(s3.complete()) == [backup_id]
    ran = harness.cli_fast(config, "verify", backup_id, "--location", "s3")
    assert ran.code == 3 and "CORRUPT" in ran.stdout, ran.stdout
    ran = harness.cli_fast(config, "verify", backup_id, "--location", "local")
    assert ran.code == 0, ran.stdout  # the local copy (keep_local = true) is intact


def two_unpruned_backups(config: Path) -> tuple[str, str]:
    """Two backups taken with retention off; the config keeps its KEEP_1 policy afterwards."""
    text = config.read_text()
    config.write_text(text + "\n[schedule]\nprune = false\n")
    first, _ = backup(config)
    second, _ = backup(config)
    config.write_text(text)
    return first, second


@pytest.mark.slow  # the rail itself runs fast: test_storage_rails.py
def test_failed_delete_is_reported_and_retried(tmp_path: Path, server: RedisServer,
                                               proxy: FaultProxy, s3: Bucket) -> None:
    fault_case("s3: DeleteObjects fails: reported, retried by the next prune")
    config, _backups = setup_config(tmp_path, server, proxy, s3, retention=KEEP_1)
    first, second = two_unpruned_backups(config)
    proxy.arm("500", "delete-objects", times=None)
    proc = cli(config, "prune", "--location", "s3")
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout and first in proc.stdout, proc.stdout
    assert sorted(s3.complete()) == sorted([first, second])  # nothing half-deleted
    # A backup run prunes too: its prune failure must be reported, not swallowed.
    third, err = backup(config)
    failed = [e for e in harness.Ran(0, "", err).lines()
              if e.get("level") in ("warning", "error") and "prune" in str(e.get("event"))]
    assert failed and first in json.dumps(failed), err
    proxy.clear()
    proc = cli(config, "prune", "--location", "s3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(s3.complete()) == [third]
    assert s3.orphans() == []


@pytest.mark.slow  # the rail itself runs fast: test_storage_rails.py
def test_failed_listing_deletes_nothing_and_is_reported(
        tmp_path: Path, server: RedisServer, proxy: FaultProxy, s3: Bucket) -> None:
    fault_case("s3: listing fails during prune")
    config, _backups = setup_config(tmp_path, server, proxy, s3, retention=KEEP_1)
    first, _ = backup(config)
    proxy.arm("503", "list", times=None)
    second, err = backup(config)
    reported = [e for e in harness.Ran(0, "", err).lines()
                if e.get("level") in ("warning", "error") and "prune" in str(e.get("event"))]
    assert reported and "nothing deleted" in json.dumps(reported), err
    assert sorted(s3.complete()) == sorted([first, second])
    proxy.clear()
    proxy.arm("500", "get", times=None, match=lambda r: r.op == "get" and first in r.key)
    proc = cli(config, "prune", "--location", "s3")  # one manifest unreadable: incomplete
    assert proc.returncode == 1 and "nothing deleted" in proc.stdout, proc.stdout
    assert sorted(s3.complete()) == sorted([first, second])


@pytest.mark.slow
def test_artifact_delete_fails_after_manifest(tmp_path: Path, server: RedisServer,
                                              proxy: FaultProxy, s3: Bucket) -> None:
    """Manifests go first: when the artifacts' delete fails, what is left is an orphan,
    never a backup; `prune --orphans` removes it once it is old enough."""
    fault_case("s3: artifact delete fails after the manifest delete")
    config, _backups = setup_config(tmp_path, server, proxy, s3, retention=KEEP_1)
    first, second = two_unpruned_backups(config)
    proxy.arm("500", "delete-objects", times=None, skip=1)
    proc = cli(config, "prune", "--location", "s3")
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stdout
    assert list(s3.complete()) == [second]
    assert [k for k in s3.orphans() if first in k], s3.keys()
    proxy.clear()
    cfg = config_mod.load(config, env={})
    storage = S3Storage(cfg.s3, S3_ENV)
    later = now_utc() + timedelta(days=2)
    report = prune_location(storage, Policy.from_config(cfg.s3.retention), now=later,
                            orphans=True)
    assert report.ok and report.orphans_deleted, report
    assert s3.orphans() == [] and list(s3.complete()) == [second]


@pytest.mark.slow
def test_multipart_faults(tmp_path: Path, redis_factory: Callable[..., RedisServer],
                          proxy: FaultProxy, s3: Bucket) -> None:
    """An artifact over 8 MiB goes up in parts: a failed part is retried; a failed
    CompleteMultipartUpload leaves the backup pending and no upload in progress."""
    server = redis_factory()
    populate(server.port, 10, 1 << 20, random_values=True)  # ~10 MiB, incompressible
    config, backups = setup_config(tmp_path, server, proxy, s3, max_attempts=3)
    fault_case("s3: one multipart part fails, retried")
    proxy.arm("500", "multipart-part")
    first, _ = backup(config)
    assert proxy.ops("500") == ["multipart-part"] and list(s3.complete()) == [first]
    fault_case("s3: CompleteMultipartUpload fails: pending, upload aborted")
    proxy.arm("503", "multipart-complete", times=None)
    second, _err = backup(config, expect=1)
    assert complete_local(backups)[second]["upload"] == "pending"
    uploads = s3.client().list_multipart_uploads(Bucket=s3.name).get("Uploads", [])
    assert uploads == [], uploads
    proxy.clear()
    assert cli(config, "upload", "--pending").returncode == 0
    assert sorted(s3.complete()) == sorted([first, second])
    assert_consistent(config, backups, bucket=s3)
