"""Incomplete multipart uploads of ours (a process killed mid-upload) are S3 orphans: `prune`
shows them, `prune --orphans` aborts those older than a day; other uploads are never touched;
without s3:ListBucketMultipartUploads retention works as before.

Moto reports a fixed `Initiated` for every upload, so "a day later" is measured from the
`Initiated` the bucket reports, never from the wall clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import structlog
from botocore.exceptions import EndpointConnectionError
from moto import mock_aws

from backupd import manifest as mf
from backupd.actions.prune import prune_location
from backupd.errors import UsageError
from backupd.retention import Policy
from backupd.storage.s3 import S3Storage
from backupd.storage.s3 import storage as s3_mod
from tests.conftest import S3_ENV, S3_KEY_ID, S3_SECRET, run_cli, s3_section
from tests.test_storage_s3 import (
    BUCKET,
    KEY_ID,
    PREFIX,
    SECRET,
    T0,
    fake_response,
    make_backup,
    on,
    storage_for,
)

KEEP_5 = Policy(keep_last=5)
LIST_UPLOADS = "before-call.s3.ListMultipartUploads"


@pytest.fixture
def store(no_aws_config: None) -> Iterator[S3Storage]:
    with mock_aws():
        storage = storage_for()
        storage.client.create_bucket(Bucket=BUCKET)
        yield storage


def start_upload(client: Any, key: str, bucket: str = BUCKET) -> str:
    """An upload with one part that nobody completes (what a SIGKILL leaves); its id."""
    upload_id = str(client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1,
                       Body=b"x" * 1024)
    return upload_id


def in_progress(client: Any, bucket: str = BUCKET) -> dict[str, tuple[str, datetime]]:
    """{upload id: (key, initiated)} of every incomplete upload in the bucket."""
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {u["UploadId"]: (u["Key"], u["Initiated"]) for u in uploads}


def orphan_name(artifact: str, upload_id: str) -> str:
    return f"{artifact} (incomplete upload {upload_id[:12]})"


def committed(store: S3Storage, tmp_path: Path, count: int = 2) -> list[str]:
    """Backup ids stored and committed, newest first."""
    ids = []
    for i in range(count):
        path, manifest = make_backup(tmp_path, when=T0 + timedelta(hours=i))
        store.put(path, manifest)
        ids.append(manifest.id)
    return ids[::-1]


def test_old_upload_is_shown_by_prune_and_aborted_with_orphans(store: S3Storage,
                                                               tmp_path: Path) -> None:
    ids = committed(store, tmp_path)
    artifact = f"{mf.new_id(T0 + timedelta(hours=5))}.rdb.zst.age"
    upload_id = start_upload(store.client, PREFIX + artifact)
    _key, started = in_progress(store.client)[upload_id]
    later = max(started, mf.now_utc()) + timedelta(days=2)

    report = prune_location(store, KEEP_5, now=later)
    assert [(o.name, o.modified) for o in report.orphans] == [
        (orphan_name(artifact, upload_id), started)]
    assert report.ok and report.orphans_deleted == []
    assert upload_id in in_progress(store.client)  # shown, not aborted without --orphans

    report = prune_location(store, KEEP_5, now=later, orphans=True)
    assert report.ok, report
    assert report.orphans_deleted == [orphan_name(artifact, upload_id)]
    assert in_progress(store.client) == {}
    assert [m.id for m in store.listing().manifests] == ids
    assert store.listing().orphans == []


def test_young_upload_is_shown_but_never_aborted(store: S3Storage, tmp_path: Path) -> None:
    committed(store, tmp_path)
    artifact = f"{mf.new_id(T0 + timedelta(hours=5))}.rdb.zst"
    upload_id = start_upload(store.client, PREFIX + artifact)
    _key, started = in_progress(store.client)[upload_id]

    report = prune_location(store, KEEP_5, now=started + timedelta(hours=23), orphans=True)
    assert report.ok, report
    assert [o.name for o in report.orphans] == [orphan_name(artifact, upload_id)]
    assert report.orphans_deleted == []
    assert list(in_progress(store.client)) == [upload_id]  # it may still be in flight


def test_uploads_that_are_not_ours_are_never_listed_nor_aborted(store: S3Storage,
                                                                 tmp_path: Path) -> None:
    committed(store, tmp_path)
    other = mf.new_id(T0 - timedelta(days=1))
    under = ["notes.txt", f"sub/{other}.rdb.zst", f"{other}x.rdb", other]  # not ours
    outside = [f"redis/prod2/{other}.rdb.zst", f"redis/{other}.rdb.zst", f"{other}.rdb.zst"]
    uploads = {start_upload(store.client, key): key
               for key in [PREFIX + name for name in under] + outside}
    # An object named like an upload's orphan is neither an orphan nor deleted as one.
    lookalike = f"{other}.rdb (incomplete upload abcdefabcdef)"
    store.client.put_object(Bucket=BUCKET, Key=PREFIX + lookalike, Body=b"x")

    assert store.listing().orphans == []
    report = prune_location(store, KEEP_5, now=mf.now_utc() + timedelta(days=3650),
                            orphans=True)
    assert report.ok and report.orphans == [] and report.orphans_deleted == []
    for upload_id, key in uploads.items():
        if key.startswith(PREFIX):
            with pytest.raises(UsageError):
                store.delete_orphans([orphan_name(key.removeprefix(PREFIX), upload_id)])
    (root_upload,) = [i for i, key in uploads.items() if key == f"{other}.rdb.zst"]
    store.delete_orphans([orphan_name(f"{other}.rdb.zst", root_upload), lookalike])
    assert {i: key for i, (key, _) in in_progress(store.client).items()} == uploads
    store.client.head_object(Bucket=BUCKET, Key=PREFIX + lookalike)  # still there


def test_delete_orphans_aborts_exactly_the_named_upload(store: S3Storage,
                                                        tmp_path: Path) -> None:
    (backup_id,) = committed(store, tmp_path, count=1)
    stray = f"{mf.new_id(T0 + timedelta(hours=5))}.rdb.zst"
    store.client.put_object(Bucket=BUCKET, Key=PREFIX + stray, Body=b"half")
    artifact = f"{mf.new_id(T0 + timedelta(hours=6))}.rdb.zst"
    first = start_upload(store.client, PREFIX + artifact)
    second = start_upload(store.client, PREFIX + artifact)
    assert sorted(o.name for o in store.listing().orphans) == sorted(
        [stray, orphan_name(artifact, first), orphan_name(artifact, second)])

    with pytest.raises(UsageError):  # object names keep their rules; nothing is aborted
        store.delete_orphans([orphan_name(artifact, first), f"{backup_id}.json"])
    assert len(in_progress(store.client)) == 2
    result = store.delete_orphans([stray, orphan_name(artifact, first)])
    assert result.deleted == [stray, orphan_name(artifact, first)] and not result.failed
    assert list(in_progress(store.client)) == [second]
    assert [o.name for o in store.listing().orphans] == [orphan_name(artifact, second)]
    assert [m.id for m in store.listing().manifests] == [backup_id]


def test_uploads_are_listed_across_pages_and_an_ambiguous_name_aborts_nothing(
        store: S3Storage) -> None:
    """Two uploads whose ids start alike share a name: neither is aborted by it."""
    key = f"{PREFIX}{mf.new_id(T0)}.rdb.zst"
    pages = [{"Uploads": [{"Key": key, "UploadId": "abcdefghijkl-1", "Initiated": T0}],
              "IsTruncated": True, "NextKeyMarker": key, "NextUploadIdMarker": "abcdefghijkl-1"},
             {"Uploads": [{"Key": key, "UploadId": "abcdefghijkl-2", "Initiated": T0}],
              "IsTruncated": False}]
    asked: list[dict[str, Any]] = []
    aborted: list[str] = []
    on(store, "before-parameter-build.s3.ListMultipartUploads",
       lambda params, **_: asked.append(dict(params)))
    on(store, LIST_UPLOADS, lambda **_: fake_response(
        200, dict(pages[1 if "UploadIdMarker" in asked[-1] else 0])))
    on(store, "before-parameter-build.s3.AbortMultipartUpload",
       lambda params, **_: aborted.append(params["UploadId"]))

    name = orphan_name(key.removeprefix(PREFIX), "abcdefghijkl")
    assert [o.name for o in store.listing().orphans] == [name, name]
    assert [(p["Prefix"], p.get("KeyMarker")) for p in asked] == [(PREFIX, None),
                                                                  (PREFIX, key)]
    result = store.delete_orphans([name])
    assert result.deleted == [] and "several uploads" in result.failed[name]
    assert aborted == []


def denied(**_: Any) -> Any:
    return fake_response(403, {"Error": {"Code": "AccessDenied",
                                         "Message": f"Access Denied for {KEY_ID}"}})


def not_implemented(**_: Any) -> Any:  # an S3-compatible server without the operation
    return fake_response(501, {"Error": {"Code": "NotImplemented",
                                         "Message": f"no such API (key {SECRET})"}})


def unreachable(**_: Any) -> Any:
    raise EndpointConnectionError(endpoint_url=f"http://{KEY_ID}:{SECRET}@s3.example.com")


def test_a_refused_abort_is_reported_and_an_upload_gone_meanwhile_counts_as_aborted(
        store: S3Storage) -> None:
    kept = f"{mf.new_id(T0)}.rdb.zst"
    refused = start_upload(store.client, PREFIX + kept)
    gone = f"{mf.new_id(T0 + timedelta(hours=1))}.rdb.zst"
    finished = start_upload(store.client, PREFIX + gone)
    names = [o.name for o in store.listing().orphans]
    assert names == [orphan_name(kept, refused), orphan_name(gone, finished)]
    store.client.abort_multipart_upload(Bucket=BUCKET, Key=PREFIX + gone, UploadId=finished)
    on(store, "before-call.s3.AbortMultipartUpload", denied)

    result = store.delete_orphans(names)
    assert result.deleted == [orphan_name(gone, finished)]
    reason = result.failed[orphan_name(kept, refused)]
    assert "AccessDenied" in reason or "denied" in reason.lower(), reason
    assert KEY_ID not in reason and SECRET not in reason
    assert list(in_progress(store.client)) == [refused]  # still there, and said so


@pytest.mark.parametrize("fault", [denied, not_implemented, unreachable])
def test_uploads_that_cannot_be_listed_leave_retention_as_before(
        store: S3Storage, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, fault: Callable[..., Any]) -> None:
    monkeypatch.setattr(s3_mod, "_UPLOADS_UNLISTED", set())  # not warned yet in this process
    ids = committed(store, tmp_path, count=3)
    stray = f"{mf.new_id(T0 - timedelta(days=1))}.rdb.zst"
    store.client.put_object(Bucket=BUCKET, Key=PREFIX + stray, Body=b"half")
    start_upload(store.client, f"{PREFIX}{mf.new_id(T0)}.rdb.zst")
    on(store, LIST_UPLOADS, fault)

    with structlog.testing.capture_logs() as logged:
        listing = store.listing()
        store.listing()  # warned once: a daemon does not repeat it on every run
    assert listing.complete
    assert [m.id for m in listing.manifests] == ids
    assert [o.name for o in listing.orphans] == [stray]
    warnings = [str(e) for e in logged if e["log_level"] in ("warning", "error")]
    assert len(warnings) == 1 and "incomplete multipart uploads" in warnings[0], warnings
    assert SECRET not in warnings[0] and KEY_ID not in warnings[0]

    report = prune_location(store, Policy(keep_last=1), now=mf.now_utc() + timedelta(days=2),
                            orphans=True)
    assert report.ok and report.error is None, report
    assert sorted(report.deleted) == sorted(ids[1:]) and report.orphans_deleted == [stray]
    assert [m.id for m in store.listing().manifests] == ids[:1]
    assert len(in_progress(boto3.client("s3", region_name="us-east-1"))) == 1  # untouched


def test_prune_shows_the_incomplete_upload(tmp_path: Path, moto_endpoint: str,
                                           bucket: str) -> None:
    """What an operator sees: the CLI against a real S3 endpoint."""
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_KEY_ID,
                          aws_secret_access_key=S3_SECRET)
    artifact = f"{mf.new_id(T0)}.rdb.zst"
    upload_id = start_upload(client, f"redis/prod/{artifact}", bucket)
    start_upload(client, f"redis/other/{artifact}", bucket)
    config = tmp_path / "c.toml"  # prune --location s3 never talks to Redis
    config.write_text(f'[redis]\ndata_dir = "{tmp_path}/data"\n\n'
                      f'[backup]\ndir = "{tmp_path}/backups"\n' + s3_section(moto_endpoint, bucket))

    proc = run_cli("-c", str(config), "prune", "--location", "s3", env=S3_ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"  {'orphan':12} {orphan_name(artifact, upload_id)}" in proc.stdout.splitlines()
    assert proc.stdout.count("orphan") == 1
    proc = run_cli("-c", str(config), "prune", "--location", "s3", "--dry-run", "--json",
                   env=S3_ENV)
    assert [o["name"] for o in json.loads(proc.stdout)[0]["orphans"]] == [
        orphan_name(artifact, upload_id)]
    assert S3_SECRET not in proc.stdout + proc.stderr
    assert len(in_progress(client, bucket)) == 2
