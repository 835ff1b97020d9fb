"""S3Storage against moto (in-process, and one real HTTP endpoint via ThreadedMotoServer)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.exceptions import EndpointConnectionError
from botocore.retries.standard import ExponentialBackoff
from botocore.stub import Stubber
from moto import mock_aws
from moto.server import ThreadedMotoServer

from backupd import config as config_mod
from backupd import manifest as mf
from backupd.config import S3Config
from backupd.errors import BackupMissing, ConfigError, IntegrityError, StorageError, UsageError
from backupd.manifest import Manifest, RedisFacts
from backupd.storage.base import Storage
from backupd.storage.s3 import S3Storage, make_client, part_size
from backupd.storage.s3.manifest_cache import ManifestCache, Where

BUCKET = "backupd-test"
PREFIX = "redis/prod/"
KEY_ID = "AKIAFAKEKEYID0000001"
SECRET = "fake+Secret/Value0123456789abcdefSECRET"
ENV = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
MiB = 1024 * 1024


# -- helpers -------------------------------------------------------------------------------


def make_backup(tmp: Path, size: int = 1000, when: datetime = T0,
                compression: str = "zstd", encrypted: bool = True) -> tuple[Path, Manifest]:
    """A random artifact file and a manifest that matches it."""
    backup_id = mf.new_id(when)
    name = mf.artifact_name(backup_id, compression, encrypted)
    path = tmp / name
    data = os.urandom(size)
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    manifest = Manifest(
        id=backup_id, created_at=mf.format_time(when), trigger="manual", tag="",
        redis=RedisFacts(version="7.4.0", host="redis", port=6379, role="master"),
        rdb_version=12, rdb_checksum="ok", keys=3, keys_per_db={"0": 3},
        raw_size=size, raw_sha256=digest, stored_size=size, stored_sha256=digest,
        compression=compression, encryption="age" if encrypted else "none", artifact=name,
        age_recipients=["age1example"] if encrypted else [], upload="done",
    )
    return path, manifest


def cfg(**overrides: Any) -> S3Config:
    values: dict[str, Any] = {"bucket": BUCKET, "prefix": PREFIX, "region": "us-east-1"}
    values.update(overrides)
    return S3Config(**values)


def keys(client: Any, prefix: str = "") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def fake_response(status: int, parsed: dict[str, Any]) -> tuple[AWSResponse, dict[str, Any]]:
    """A (http, parsed) pair a `before-call` handler returns instead of sending a request."""
    parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": status, "HTTPHeaders": {}})
    return AWSResponse("http://fake/", status, HTTPHeaders(), None), parsed


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def aws_env(no_aws_config: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def moto(aws_env: None) -> Iterator[None]:
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield


def storage_for(config: S3Config | None = None) -> S3Storage:
    return S3Storage(config or cfg(), env=ENV)


@pytest.fixture
def store(moto: None) -> S3Storage:
    return storage_for()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep botocore's 5 standard-mode attempts but drop the backoff sleeps."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def on(storage: S3Storage, event: str, handler: Callable[..., Any]) -> None:
    storage.client.meta.events.register(event, handler)


# -- pure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 8 * MiB, 80 * 1024**3, 5 * 1024**4])
def test_part_size_keeps_parts_under_the_limit(size: int) -> None:
    chunk = part_size(size)
    assert chunk >= 8 * MiB
    assert chunk <= 5 * 1024**3  # S3's largest part
    assert math.ceil(size / chunk) <= 9000 < 10000


def test_s3storage_satisfies_the_protocol(store: S3Storage) -> None:
    backend: Storage = store
    assert backend.name == "s3"


def test_make_client_config_and_credentials() -> None:
    s3cfg = cfg(endpoint_url="http://127.0.0.1:9", addressing_style="path",
                access_key_id_env="MY_KEY", secret_access_key_env="MY_SECRET",
                connect_timeout=3.0, read_timeout=7.0)
    client = make_client(s3cfg, {"MY_KEY": "AKIAMINE", "MY_SECRET": "s3cr3t"})
    meta = client.meta
    conf: Any = meta.config
    assert meta.endpoint_url == "http://127.0.0.1:9"
    assert meta.region_name == "us-east-1"
    # s3.max_attempts counts every attempt (botocore's total_max_attempts).
    assert conf.retries == {"mode": "standard", "total_max_attempts": 5}
    assert conf.s3 == {"addressing_style": "path"}
    assert (conf.connect_timeout, conf.read_timeout) == (3.0, 7.0)
    assert conf.request_checksum_calculation == "when_required"
    assert conf.response_checksum_validation == "when_required"
    creds = client._request_signer._credentials  # type: ignore[attr-defined]
    assert (creds.access_key, creds.secret_key) == ("AKIAMINE", "s3cr3t")


def test_make_client_without_endpoint_uses_aws(aws_env: None) -> None:
    client = make_client(cfg(region="eu-west-1"), {})
    assert "amazonaws.com" in client.meta.endpoint_url


def s3_env(**keys: str) -> dict[str, str]:
    """The environment of a config with [s3] set to `keys` (bucket and prefix given)."""
    values = {"bucket": BUCKET, "prefix": PREFIX, **keys}
    return {f"BACKUPD_S3__{key.upper()}": value for key, value in values.items()}


def test_half_credentials_are_a_config_error() -> None:
    env = s3_env(access_key_id_env="MY_KEY", secret_access_key_env="MY_SECRET")
    with pytest.raises(ConfigError, match="MY_KEY is set but MY_SECRET is not") as err:
        config_mod.load(None, env={**env, "MY_KEY": "AKIAHALF"})
    assert "AKIAHALF" not in str(err.value)


# -- roundtrip -----------------------------------------------------------------------------


def test_put_list_read_open_roundtrip(store: S3Storage, tmp_path: Path) -> None:
    old_path, old = make_backup(tmp_path, 5000, T0)
    new_path, new = make_backup(tmp_path, 7000, T0 + timedelta(hours=1),
                                compression="gzip", encrypted=False)
    store.put(old_path, old)
    store.put(new_path, new)

    listing = store.listing()
    assert listing.complete
    assert [m.id for m in listing.manifests] == [new.id, old.id]  # newest first
    assert listing.manifests == [new, old]
    assert listing.orphans == []
    assert listing.broken == {}
    assert store.read_manifest(old.id) == old
    with store.open_artifact(new) as stream:
        assert stream.read() == new_path.read_bytes()
    with store.open_artifact(old) as stream:
        assert stream.read(100) == old_path.read_bytes()[:100]

    client = store.client
    assert keys(client) == {f"{PREFIX}{old.artifact}", f"{PREFIX}{old.id}.json",
                            f"{PREFIX}{new.artifact}", f"{PREFIX}{new.id}.json"}
    head = client.head_object(Bucket=BUCKET, Key=PREFIX + old.artifact, ChecksumMode="ENABLED")
    assert head["Metadata"] == {"backupd-id": old.id, "backupd-sha256": old.stored_sha256}
    assert head["ChecksumSHA256"]
    man = client.head_object(Bucket=BUCKET, Key=f"{PREFIX}{old.id}.json")
    assert man["ContentType"] == "application/json"


def test_put_extra_args(moto: None, tmp_path: Path) -> None:
    store = storage_for(cfg(storage_class="STANDARD_IA", sse="AES256", checksum="crc32"))
    seen: dict[str, Any] = {}
    on(store, "before-parameter-build.s3.PutObject",
       lambda params, **kw: seen.setdefault(params["Key"], dict(params)))
    path, man = make_backup(tmp_path)
    store.put(path, man)
    artifact = seen[PREFIX + man.artifact]
    assert artifact["ChecksumAlgorithm"] == "CRC32"
    assert artifact["StorageClass"] == "STANDARD_IA"
    assert artifact["ServerSideEncryption"] == "AES256"
    assert artifact["Metadata"] == {"backupd-id": man.id, "backupd-sha256": man.stored_sha256}
    head = store.client.head_object(Bucket=BUCKET, Key=PREFIX + man.artifact)
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ServerSideEncryption"] == "AES256"


def test_put_without_checksum_sends_no_checksum_header(moto: None, tmp_path: Path) -> None:
    store = storage_for(cfg(checksum="none"))
    seen: list[dict[str, Any]] = []
    on(store, "before-send.s3.PutObject", lambda request, **kw: seen.append(dict(request.headers)))
    path, man = make_backup(tmp_path)
    store.put(path, man)
    assert seen
    assert not [h for headers in seen for h in headers if h.lower().startswith("x-amz-checksum")]
    assert store.listing().manifests == [man]


def test_multipart_upload_roundtrip(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path, 8 * MiB + 1234)
    parts: list[int] = []
    on(store, "before-parameter-build.s3.UploadPart",
       lambda params, **kw: parts.append(params["PartNumber"]))
    store.put(path, man)
    assert sorted(parts) == [1, 2]
    assert store.listing().manifests == [man]
    with store.open_artifact(man) as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == man.stored_sha256


def test_put_rejects_size_mismatch_before_upload(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path, 100)
    with pytest.raises(IntegrityError):
        store.put(path, dataclasses.replace(man, stored_size=101))
    assert keys(store.client) == set()


@pytest.mark.parametrize("field", ["ContentLength", "Metadata", "ChecksumSHA256"])
def test_put_verification_failure_deletes_the_object(store: S3Storage, tmp_path: Path,
                                                     field: str) -> None:
    def tamper(parsed: dict[str, Any], **kw: Any) -> None:
        if field == "ContentLength":
            parsed["ContentLength"] = 1
        elif field == "ChecksumSHA256":
            parsed["ChecksumSHA256"] = "AAAA" + parsed["ChecksumSHA256"][4:]
        else:
            parsed["Metadata"]["backupd-sha256"] = "0" * 64

    on(store, "after-call.s3.HeadObject", tamper)
    path, man = make_backup(tmp_path)
    with pytest.raises(StorageError, match="was deleted"):
        store.put(path, man)
    assert keys(store.client) == set()  # neither artifact nor manifest


# -- layout and isolation ------------------------------------------------------------------


def test_prefix_isolation(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    store.put(path, man)
    other_id = mf.new_id(T0 - timedelta(days=1))
    foreign = [
        f"{PREFIX}notes.txt",
        f"redis/prod2/{other_id}.json",
        f"redis/prod2/{other_id}.rdb.zst",
        f"{PREFIX}sub/{other_id}.json",
        f"{PREFIX}sub/{other_id}.rdb.zst",
        f"{PREFIX}{other_id}x.rdb.zst",
        f"{PREFIX}{other_id}",
        f"{PREFIX}20261399T999999Z-zzzzzz.rdb",
        f"{other_id}.json",
        f"redis/{other_id}.rdb.zst",
    ]
    client = store.client
    for key in foreign:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"{}")

    listing = store.listing()
    assert listing.manifests == [man]
    assert listing.orphans == []
    assert listing.broken == {}

    assert store.delete([man.id, other_id]).deleted == [man.id, other_id]
    assert store.listing().manifests == []
    assert keys(client) == set(foreign)
    with pytest.raises(UsageError):
        store.delete_orphans([f"sub/{other_id}.rdb.zst"])
    with pytest.raises(UsageError):
        store.delete_orphans(["notes.txt"])
    assert keys(client) == set(foreign)


def test_invalid_ids_are_refused(store: S3Storage) -> None:
    for bad in ("../etc", "20260301T120000Z-abcdeg", "", "x/20260301T120000Z-abcdef"):
        with pytest.raises(UsageError):
            store.read_manifest(bad)
        with pytest.raises(UsageError):
            store.delete([bad])


def test_artifact_without_manifest_is_an_orphan(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path, 321)
    client = store.client
    client.upload_file(str(path), BUCKET, PREFIX + man.artifact)
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{man.id}.rdb.zst.age.tmp", Body=b"x")
    listing = store.listing()
    assert listing.manifests == []
    assert listing.broken == {}
    assert [(o.name, o.size) for o in listing.orphans] == [
        (man.artifact, 321), (f"{man.id}.rdb.zst.age.tmp", 1)]
    assert all(o.modified.tzinfo is not None for o in listing.orphans)

    result = store.delete_orphans(o.name for o in listing.orphans)
    assert result.deleted == [man.artifact, f"{man.id}.rdb.zst.age.tmp"]
    assert keys(client) == set()


def test_delete_orphans_refuses_manifests_and_committed_backups(store: S3Storage,
                                                                tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    store.put(path, man)
    with pytest.raises(UsageError):
        store.delete_orphans([f"{man.id}.json"])
    result = store.delete_orphans([man.artifact])  # committed since the listing
    assert result.deleted == []
    assert man.artifact in result.failed
    assert store.listing().manifests == [man]


def test_manifest_without_artifact_is_broken(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    store.put(path, man)
    store.client.delete_object(Bucket=BUCKET, Key=PREFIX + man.artifact)
    listing = store.listing()
    assert listing.manifests == []
    assert listing.orphans == []
    assert listing.broken == {man.id: f"artifact {man.artifact} missing"}
    assert listing.complete
    with pytest.raises(StorageError, match="does not exist"):
        store.open_artifact(man).__enter__()


def test_artifact_of_wrong_size_is_broken(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path, 100)
    store.put(path, man)
    store.client.put_object(Bucket=BUCKET, Key=PREFIX + man.artifact, Body=b"short")
    assert "5 bytes" in store.listing().broken[man.id]
    assert store.artifact_problem(store.read_manifest(man.id)) == store.listing().broken[man.id]


def test_an_unreadable_manifest_or_artifact_is_not_a_missing_backup(store: S3Storage,
                                                                    tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    store.put(path, man)
    denied = {"Error": {"Code": "InternalError", "Message": "We encountered an error"}}
    on(store, "before-call.s3.HeadObject", lambda **kw: fake_response(500, denied))
    with pytest.raises(StorageError, match="cannot check the artifact") as err:
        store.artifact_problem(man)
    assert not isinstance(err.value, BackupMissing)
    on(store, "before-call.s3.GetObject", lambda **kw: fake_response(500, denied))
    with pytest.raises(StorageError, match="cannot read the manifest") as err:
        store.read_manifest(man.id)
    assert not isinstance(err.value, BackupMissing)


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"id": "x"}', b"x" * (MiB + 10)])
def test_corrupt_manifest_is_broken_and_keeps_its_artifact(store: S3Storage, tmp_path: Path,
                                                           body: bytes) -> None:
    path, man = make_backup(tmp_path)
    good_path, good = make_backup(tmp_path, when=T0 + timedelta(minutes=5))
    store.put(path, man)
    store.put(good_path, good)
    store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{man.id}.json", Body=body)
    listing = store.listing()
    assert listing.manifests == [good]
    assert list(listing.broken) == [man.id]
    assert "manifest" in listing.broken[man.id]
    assert listing.orphans == []  # the artifact of a broken backup is not an orphan
    assert listing.complete
    if len(body) < MiB:
        with pytest.raises(IntegrityError):
            store.read_manifest(man.id)


def test_unreadable_manifest_makes_the_listing_incomplete(store: S3Storage,
                                                          tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    store.put(path, man)
    on(store, "before-call.s3.GetObject", lambda **kw: fake_response(
        500, {"Error": {"Code": "InternalError", "Message": "We encountered an error"}}))
    listing = store.listing()
    assert listing.manifests == []
    assert man.id in listing.broken
    assert not listing.complete


def test_read_manifest_and_open_missing(store: S3Storage, tmp_path: Path) -> None:
    _, man = make_backup(tmp_path)
    with pytest.raises(BackupMissing, match="does not exist"):
        store.read_manifest(man.id)
    with pytest.raises(StorageError, match="does not exist"), store.open_artifact(man):
        pass


def test_list_failure_raises(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    store.put(path, man)
    on(store, "before-call.s3.ListObjectsV2", lambda **kw: fake_response(
        500, {"Error": {"Code": "InternalError", "Message": "boom"}}))
    with pytest.raises(StorageError, match="cannot list bucket"):
        store.listing()
    with pytest.raises(StorageError):
        store.delete([man.id])  # nothing is deleted on an incomplete listing
    assert len(keys(boto3.client("s3", region_name="us-east-1"))) == 2


# -- deleting ------------------------------------------------------------------------------


def test_delete_removes_both_manifest_first_and_only_those(store: S3Storage,
                                                           tmp_path: Path) -> None:
    backups = [make_backup(tmp_path, when=T0 + timedelta(hours=i)) for i in range(3)]
    for path, man in backups:
        store.put(path, man)
    batches: list[list[str]] = []
    on(store, "before-parameter-build.s3.DeleteObjects", lambda params, **kw: batches.append(
        [o["Key"] for o in params["Delete"]["Objects"]]))
    drop = [backups[0][1].id, backups[2][1].id]
    result = store.delete(drop)
    assert result.deleted == drop
    assert (result.locked, result.failed) == ([], {})
    assert batches == [
        [f"{PREFIX}{i}.json" for i in drop],
        [PREFIX + backups[0][1].artifact, PREFIX + backups[2][1].artifact],
    ]
    assert store.listing().manifests == [backups[1][1]]
    assert store.delete(drop).deleted == drop  # already gone: nothing to do


def test_delete_batches_at_most_1000_keys(store: S3Storage) -> None:
    client = store.client
    ids = sorted({mf.new_id(T0 + timedelta(seconds=i)) for i in range(1001)})
    for backup_id in ids:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{backup_id}.rdb", Body=b"")
    sizes: list[int] = []
    on(store, "before-parameter-build.s3.DeleteObjects",
       lambda params, **kw: sizes.append(len(params["Delete"]["Objects"])))
    orphans = store.listing().orphans
    assert len(orphans) == 1001
    result = store.delete_orphans(o.name for o in orphans)
    assert len(result.deleted) == 1001
    assert sizes == [1000, 1]
    assert keys(client) == set()


def test_delete_reports_per_key_errors(store: S3Storage, tmp_path: Path) -> None:
    backups = [make_backup(tmp_path, when=T0 + timedelta(hours=i)) for i in range(3)]
    for path, man in backups:
        store.put(path, man)
    (_, a), (_, b), (_, c) = backups

    def inject(parsed: dict[str, Any], **kw: Any) -> None:
        parsed["Errors"] = [
            {"Key": f"{PREFIX}{a.id}.json", "Code": "InternalError",
             "Message": "We encountered an internal error. Please try again."},
            {"Key": f"{PREFIX}{b.artifact}", "Code": "AccessDenied",
             "Message": "Access Denied because object protected by object lock."},
        ]

    on(store, "after-call.s3.DeleteObjects", inject)
    result = store.delete([a.id, b.id, c.id])
    assert result.deleted == [c.id]
    assert result.locked == [b.id]
    assert list(result.failed) == [a.id]
    assert "InternalError" in result.failed[a.id]
    # a's manifest delete "failed": its artifact was not touched.
    assert PREFIX + a.artifact in keys(store.client)


def test_delete_request_failure_is_per_id(store: S3Storage, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    store.put(path, man)
    on(store, "before-call.s3.DeleteObjects", lambda **kw: fake_response(
        403, {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}))
    result = store.delete([man.id])
    assert result.deleted == []
    assert "access denied to bucket" in result.failed[man.id]
    assert store.listing().manifests == [man]


def test_missing_content_md5_falls_back_to_single_deletes(store: S3Storage,
                                                          tmp_path: Path) -> None:
    backups = [make_backup(tmp_path, when=T0 + timedelta(hours=i)) for i in range(2)]
    for path, man in backups:
        store.put(path, man)
    bulk: list[int] = []
    single: list[str] = []

    def reject(**kw: Any) -> Any:
        bulk.append(1)
        return fake_response(400, {"Error": {
            "Code": "MissingContentMD5",
            "Message": "Missing required header for this request: Content-MD5"}})

    on(store, "before-call.s3.DeleteObjects", reject)
    on(store, "before-parameter-build.s3.DeleteObject",
       lambda params, **kw: single.append(params["Key"]))
    ids = [m.id for _, m in backups]
    assert store.delete(ids).deleted == ids
    assert bulk == [1]  # remembered: later batches go one by one straight away
    man0, man1 = backups[0][1], backups[1][1]
    assert single == [f"{PREFIX}{man0.id}.json", f"{PREFIX}{man1.id}.json",
                      PREFIX + man0.artifact, PREFIX + man1.artifact]
    assert keys(store.client) == set()


def test_missing_content_md5_with_stubber(aws_env: None) -> None:
    """The R2/B2 shape of the error, replayed with botocore's Stubber (no moto)."""
    store = storage_for(cfg(endpoint_url="https://acct.r2.example.com"))
    backup_id = mf.new_id(T0)
    now = datetime.now(UTC)
    with Stubber(store.client) as stub:
        stub.add_response("list_objects_v2", {"KeyCount": 2, "IsTruncated": False, "Contents": [
            {"Key": f"{PREFIX}{backup_id}.json", "Size": 10, "LastModified": now},
            {"Key": f"{PREFIX}{backup_id}.rdb.zst", "Size": 10, "LastModified": now}]},
            {"Bucket": BUCKET, "Prefix": PREFIX, "Delimiter": "/"})
        stub.add_client_error("delete_objects", service_error_code="MissingContentMD5",
                              service_message="Missing required header: Content-MD5",
                              http_status_code=400)
        stub.add_response("delete_object", {},
                          {"Bucket": BUCKET, "Key": f"{PREFIX}{backup_id}.json"})
        stub.add_client_error("delete_object", service_error_code="AccessDenied",
                              service_message="Object is WORM protected and cannot be "
                                              "overwritten: object lock retention",
                              http_status_code=403)
        result = store.delete([backup_id])
        stub.assert_no_pending_responses()
    assert result.locked == [backup_id]


def test_object_lock_retention_is_enforced_and_reported(aws_env: None, tmp_path: Path) -> None:
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(
            Bucket=BUCKET, ObjectLockEnabledForBucket=True)
        store = storage_for(cfg(object_lock_days=3, object_lock_mode="GOVERNANCE"))
        retention: list[dict[str, Any]] = []
        on(store, "before-parameter-build.s3.PutObjectRetention",
           lambda params, **kw: retention.append(params))
        path, man = make_backup(tmp_path)
        store.put(path, man)
        assert retention[0]["Key"] == PREFIX + man.artifact
        assert retention[0]["Retention"]["Mode"] == "GOVERNANCE"
        until = retention[0]["Retention"]["RetainUntilDate"]
        assert timedelta(days=2.9) < until - datetime.now(UTC) < timedelta(days=3.1)

        result = store.delete([man.id])
        assert result.locked == [man.id]
        assert (result.deleted, result.failed) == ([], {})
        assert store.listing().manifests == [man]  # still whole: not hidden behind a marker


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["server-error", "connection-lost"])
def test_interrupted_multipart_upload_leaves_nothing(store: S3Storage, tmp_path: Path,
                                                     failure: str) -> None:
    path, man = make_backup(tmp_path, 2 * 8 * MiB + 100)  # 3 parts of 8 MiB
    lock = threading.Lock()
    calls = 0

    def fail_second_part(**kw: Any) -> Any:
        nonlocal calls
        with lock:
            calls += 1
            if calls != 2:
                return None
        if failure == "connection-lost":
            raise EndpointConnectionError(endpoint_url="https://AKIAUSER:pw@s3.example/x")
        return fake_response(500, {"Error": {"Code": "InternalError", "Message": "injected"}})

    on(store, "before-call.s3.UploadPart", fail_second_part)
    with pytest.raises(StorageError, match=f"upload of backup {man.id}") as err:
        store.put(path, man)
    assert SECRET not in str(err.value)
    assert "pw@" not in str(err.value)
    client = store.client
    assert keys(client) == set()  # no artifact, no manifest
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert store.listing().orphans == []


def test_endpoint_down(aws_env: None, fast_retries: None, tmp_path: Path) -> None:
    port = closed_port()
    store = storage_for(cfg(endpoint_url=f"http://127.0.0.1:{port}", addressing_style="path",
                            connect_timeout=1.0, read_timeout=1.0))
    attempts: list[int] = []
    on(store, "before-send.s3", lambda **kw: attempts.append(1))
    path, man = make_backup(tmp_path)
    expected = f"cannot reach the S3 endpoint 127.0.0.1:{port}"
    for action in (store.listing, store.check_access, lambda: store.put(path, man),
                   lambda: store.read_manifest(man.id)):
        with pytest.raises(StorageError, match=expected) as err:
            action()
        assert SECRET not in str(err.value)
        assert KEY_ID not in str(err.value)
        assert err.value.__suppress_context__
    assert len(attempts) == 4 * 5  # each call: s3.max_attempts = 5 attempts in all


def test_endpoint_userinfo_never_appears(aws_env: None, fast_retries: None) -> None:
    port = closed_port()
    store = storage_for(cfg(endpoint_url=f"http://minio:Pa55wordXyz@127.0.0.1:{port}"))
    assert store.endpoint_host == f"127.0.0.1:{port}"
    with pytest.raises(StorageError, match=f"endpoint 127.0.0.1:{port}") as err:
        store.check_access()
    assert "Pa55wordXyz" not in str(err.value)
    assert "minio" not in str(err.value)


@pytest.mark.parametrize("url", [f"http://user:{SECRET}@127.0.0.1:9000", "s3.example.com",
                                 "ftp://host", "http://host:port"])
def test_bad_endpoint_url_is_a_config_error(url: str) -> None:
    # An unencoded '/' in the userinfo makes the URL unparsable: still no secret in the error.
    with pytest.raises(ConfigError, match=r"s3\.endpoint_url") as err:
        config_mod.load(None, env=s3_env(endpoint_url=url))
    assert SECRET.split("/")[0] not in str(err.value)


def test_wrong_bucket(moto: None, tmp_path: Path) -> None:
    store = storage_for(cfg(bucket="no-such-bucket-here"))
    path, man = make_backup(tmp_path)
    for action in (store.listing, store.check_access, lambda: store.put(path, man)):
        with pytest.raises(StorageError, match="bucket no-such-bucket-here does not exist"):
            action()


def test_check_access_ok(store: S3Storage) -> None:
    store.check_access()


@pytest.mark.parametrize(("code", "status", "expected"), [
    ("InvalidAccessKeyId", 403, "the S3 credentials were rejected"),
    ("SignatureDoesNotMatch", 403, "the S3 credentials were rejected"),
    ("AccessDenied", 403, f"access denied to bucket {BUCKET} (check the IAM policy)"),
    ("NoSuchBucket", 404, f"bucket {BUCKET} does not exist"),
    ("SlowDown", 503, "SlowDown: please reduce"),
])
def test_error_mapping(aws_env: None, code: str, status: int, expected: str) -> None:
    store = storage_for()
    message = f"please reduce your request rate (key {KEY_ID})"
    with Stubber(store.client) as stub:
        stub.add_response("head_bucket", {})
        stub.add_client_error("list_objects_v2", service_error_code=code,
                              service_message=message, http_status_code=status)
        with pytest.raises(StorageError) as err:
            store.check_access()
    assert expected in str(err.value)
    assert KEY_ID not in str(err.value)


@pytest.mark.parametrize(("status", "expected"), [
    ("404", f"bucket {BUCKET} does not exist"),
    ("403", f"access denied to bucket {BUCKET}"),
])
def test_head_bucket_status_mapping(aws_env: None, status: str, expected: str) -> None:
    store = storage_for()
    with Stubber(store.client) as stub:
        stub.add_client_error("head_bucket", service_error_code=status,
                              http_status_code=int(status))
        with pytest.raises(StorageError, match=expected):
            store.check_access()


# -- a real HTTP endpoint ------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def http_store(moto_server: str) -> S3Storage:
    reset = f"{moto_server}/moto-api/reset"  # the local test server
    urllib.request.urlopen(urllib.request.Request(reset, method="POST"), timeout=10).close()  # noqa: S310
    config = cfg(endpoint_url=moto_server, addressing_style="path",
                 access_key_id_env="BK_KEY", secret_access_key_env="BK_SECRET")
    store = S3Storage(config, env={"BK_KEY": KEY_ID, "BK_SECRET": SECRET})
    store.client.create_bucket(Bucket=BUCKET)
    return store


def test_http_endpoint_roundtrip(http_store: S3Storage, tmp_path: Path) -> None:
    small_path, small = make_backup(tmp_path, 4096)
    big_path, big = make_backup(tmp_path, 8 * MiB + 17, T0 + timedelta(hours=1))
    http_store.check_access()
    http_store.put(small_path, small)
    http_store.put(big_path, big)
    listing = http_store.listing()
    assert listing.manifests == [big, small]
    with http_store.open_artifact(big) as stream:
        digest = hashlib.sha256()
        while chunk := stream.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == big.stored_sha256
    assert http_store.delete([small.id]).deleted == [small.id]
    assert http_store.listing().manifests == [big]
    assert http_store.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_http_endpoint_wrong_bucket(moto_server: str) -> None:
    config = cfg(bucket="missing-bucket", endpoint_url=moto_server, addressing_style="path")
    store = S3Storage(config, env=ENV)
    with pytest.raises(StorageError, match="bucket missing-bucket does not exist"):
        store.check_access()



# -- the process's manifest cache ----------------------------------------------------------


def manifest_gets(storage: S3Storage) -> list[str]:
    """The ids whose manifest `storage` GETs from now on."""
    gets: list[str] = []
    on(storage, "before-parameter-build.s3.GetObject", lambda params, **kw: gets.append(
        params["Key"].removeprefix(PREFIX).removesuffix(".json"))
        if params["Key"].endswith(".json") else None)
    return gets


def test_each_manifest_is_read_once_per_process(store: S3Storage, tmp_path: Path) -> None:
    backups = [make_backup(tmp_path, 100, T0 + timedelta(minutes=i)) for i in range(20)]
    for path, man in backups:
        store.put(path, man)
    first = manifest_gets(store)
    listed = store.listing()
    assert sorted(first) == sorted(m.id for _, m in backups)
    cycle = storage_for()  # each cycle builds its storages anew
    again = manifest_gets(cycle)
    assert cycle.listing() == listed and again == []
    path, new = make_backup(tmp_path, 100, T0 + timedelta(hours=1))
    cycle.put(path, new)
    assert cycle.listing().manifests[0] == new and again == [new.id]  # only the new one


def test_a_manifest_rewritten_deleted_or_unreadable_is_read_again(store: S3Storage,
                                                                   tmp_path: Path) -> None:
    (path, man), (other_path, other) = make_backup(tmp_path), make_backup(
        tmp_path, when=T0 + timedelta(minutes=1))
    store.put(path, man)
    store.put(other_path, other)
    gets = manifest_gets(store)
    store.listing()
    store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{man.id}.json", Body=b"{not json")
    gets.clear()
    for _ in range(2):  # another ETag: read again; corrupt: never cached
        assert man.id in store.listing().broken
    assert gets == [man.id, man.id]
    store.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}{man.id}.json", Body=man.to_json())
    fresh_path, fresh = make_backup(tmp_path, when=T0 + timedelta(minutes=2))
    store.put(fresh_path, fresh)
    failing = {"on": True}
    on(store, "before-call.s3.GetObject", lambda **kw: fake_response(
        500, {"Error": {"Code": "InternalError", "Message": "boom"}}) if failing["on"] else None)
    assert fresh.id in store.listing().broken  # unreadable: not cached either
    failing["on"] = False
    gets.clear()
    # The original bytes again are the object read first (same ETag): from the cache.
    assert store.listing().manifests == [fresh, other, man] and gets == [fresh.id]
    assert store.delete([other.id]).deleted == [other.id]
    store.put(other_path, other)  # the same object again: the delete dropped its entry
    gets.clear()
    assert store.listing().manifests == [fresh, other, man] and gets == [other.id]


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    cache = ManifestCache(capacity=2)
    mans = [make_backup(tmp_path, when=T0 + timedelta(minutes=i))[1] for i in range(3)]
    where = [Where("endpoint", BUCKET, PREFIX, m.id) for m in mans]
    cache.put(where[0], "etag", mans[0])
    cache.put(where[1], "etag", mans[1])
    assert cache.get(where[0], "etag") == mans[0]  # now the most recently used
    cache.put(where[2], "etag", mans[2])
    assert len(cache) == 2 and cache.get(where[1], "etag") is None
    assert cache.get(where[0], "another etag") is None and cache.get(where[0], "") is None
    cache.drop([where[0]])
    assert cache.get(where[0], "etag") is None and cache.get(where[2], "etag") == mans[2]
    cache.clear()
    assert len(cache) == 0
