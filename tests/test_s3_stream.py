"""The S3 upload that runs while pack() writes the artifact (S3Storage.start_upload).

In process against moto (mock_aws) for the mechanics, then end to end: the real CLI, a real
redis-server and moto's HTTP server, behind the fault proxy where a test needs to see or break
requests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import structlog
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.retries.standard import ExponentialBackoff
from moto import mock_aws

from backupd import manifest as mf
from backupd import pipeline
from backupd.config import S3Config
from backupd.errors import IntegrityError, StorageError
from backupd.manifest import Manifest, RedisFacts
from backupd.storage.s3 import (
    META_ID,
    META_SHA256,
    MIN_PART_SIZE,
    S3Storage,
    StreamingUpload,
    stream_part_size,
)
from backupd.storage.s3.multipart import READ_CAP, FileRange
from tests.conftest import (
    PASSWORD,
    S3_ENV,
    S3_KEY_ID,
    S3_SECRET,
    RedisServer,
    last_line,
    run_cli,
    s3_section,
    wait_until,
    write_config,
)
from tests.faults.s3proxy import FaultProxy, Request
from tests.test_rdb import make_rdb

MiB = 1024 * 1024
BUCKET = "stream-test"
PREFIX = "redis/prod/"
SIZE = 2 * MIN_PART_SIZE + 3 * MiB  # two full parts and a tail


# -- in process (mock_aws) ---------------------------------------------------------------------


@pytest.fixture
def store(no_aws_config: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    with mock_aws():
        cfg = S3Config(bucket=BUCKET, prefix=PREFIX, region="us-east-1", max_attempts=2)
        storage = S3Storage(cfg, env=S3_ENV)
        storage.client.create_bucket(Bucket=BUCKET)
        yield storage


class Calls:
    """Counts the S3 operations a storage's client made (after-call: they succeeded)."""

    def __init__(self, storage: S3Storage) -> None:
        self.count: dict[str, int] = {}
        self._lock = threading.Lock()
        storage.client.meta.events.register("after-call.s3", self._seen)

    def _seen(self, event_name: str, **_: Any) -> None:
        with self._lock:
            op = event_name.rsplit(".", 1)[-1]
            self.count[op] = self.count.get(op, 0) + 1

    def __getitem__(self, op: str) -> int:
        with self._lock:
            return self.count.get(op, 0)


def uploads(storage: S3Storage) -> list[Any]:
    return list(storage.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def objects(storage: S3Storage) -> list[str]:
    resp = storage.client.list_objects_v2(Bucket=BUCKET)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def packed(tmp_path: Path, raw: bytes, stream: StreamingUpload | None,
           compression: str = "none") -> tuple[Path, Manifest]:
    """pack() `raw` into a new artifact, with `stream` following; the matching manifest."""
    backup_id = mf.new_id(mf.now_utc())
    name = mf.artifact_name(backup_id, compression, False)
    result = pipeline.pack(io.BytesIO(raw), tmp_path / name, compression=compression, level=1,
                           recipients=[], follower=stream)
    manifest = Manifest(
        id=backup_id, created_at=mf.format_time(mf.id_time(backup_id)), trigger="manual",
        tag="", redis=RedisFacts(version="7.0.15", host="redis", port=6379, role="master"),
        rdb_version=result.rdb.version, rdb_checksum=result.rdb.checksum, keys=1,
        keys_per_db={"db0": 1}, raw_size=result.raw.size, raw_sha256=result.raw.sha256,
        stored_size=result.stored.size, stored_sha256=result.stored.sha256,
        compression=compression, encryption="none", artifact=name, age_recipients=[],
        upload="done")
    return tmp_path / name, manifest


def test_part_sizes_reach_s3_limits() -> None:
    sizes = [stream_part_size(n) for n in range(1, 10_001)]
    assert sizes[0] == sizes[999] == MIN_PART_SIZE and sizes[1000] == 2 * MIN_PART_SIZE
    assert max(sizes) <= 5 * 1024**3  # S3's largest part
    assert sum(sizes) >= 5 * 1024**4  # 10,000 parts hold S3's largest object


def test_file_range_is_a_seekable_body_of_its_bytes_only(tmp_path: Path) -> None:
    data = os.urandom(3 * READ_CAP)
    path = tmp_path / "f"
    path.write_bytes(data)
    with path.open("rb") as fh:
        body = FileRange(fh.fileno(), 100, 2 * READ_CAP)
        assert body.seek(0, io.SEEK_END) == 2 * READ_CAP and body.read(10) == b""
        body.seek(0)
        assert body.read(10 * READ_CAP) == data[100:100 + READ_CAP]  # capped
        assert body.read() == data[100 + READ_CAP:100 + 2 * READ_CAP]
        body.seek(5)
        assert body.tell() == 5 and body.read(3) == data[105:108]
        short = FileRange(fh.fileno(), len(data) - 4, 8)  # the file ends too early
        assert short.read(8) == data[-4:]
        with pytest.raises(OSError, match="ends before"):
            short.read(8)


@pytest.mark.parametrize("compression", ["none", "zstd"])  # writes from a stage / this thread
def test_parts_go_up_while_packing_and_commit_at_finish(store: S3Storage, tmp_path: Path,
                                                        compression: str) -> None:
    calls = Calls(store)
    stream = store.start_upload()
    artifact, manifest = packed(tmp_path, make_rdb(os.urandom(SIZE)), stream, compression)
    # Before finish: both full parts are (or are going) up; nothing is visible yet.
    wait_until(lambda: calls["UploadPart"] == 2, what="the two full parts")
    assert objects(store) == [] and len(uploads(store)) == 1
    stream.finish(artifact, manifest)
    key = PREFIX + manifest.artifact
    assert objects(store) == sorted([key, f"{PREFIX}{manifest.id}.json"])
    assert calls["UploadPart"] == 3 and calls["CompleteMultipartUpload"] == 1
    assert calls["PutObject"] == 1  # the manifest only: no second upload
    assert store.client.head_object(Bucket=BUCKET, Key=key, PartNumber=1)["PartsCount"] == 3
    head = store.client.head_object(Bucket=BUCKET, Key=key)
    assert head["Metadata"] == {META_ID: manifest.id}  # the SHA-256 was not known yet
    body = store.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == artifact.read_bytes()
    assert hashlib.sha256(body).hexdigest() == manifest.stored_sha256
    assert uploads(store) == [] and store.listing().manifests == [manifest]


def test_small_artifact_is_put_whole(store: S3Storage, tmp_path: Path) -> None:
    calls = Calls(store)
    stream = store.start_upload()
    artifact, manifest = packed(tmp_path, make_rdb(os.urandom(MiB)), stream)
    stream.finish(artifact, manifest)
    assert calls["CreateMultipartUpload"] == 0 and calls["PutObject"] == 2
    head = store.client.head_object(Bucket=BUCKET, Key=PREFIX + manifest.artifact)
    assert head["Metadata"] == {META_ID: manifest.id, META_SHA256: manifest.stored_sha256}


def fail_parts_of(stream: StreamingUpload, storage: S3Storage) -> None:
    """UploadPart fails (500, every attempt) for the streamed upload, not for later ones."""
    def fail(params: dict[str, Any], **_: Any) -> Any:
        if params["query_string"].get("uploadId") == stream._upload_id:
            return (AWSResponse("http://fake/", 500, HTTPHeaders(), None),
                    {"Error": {"Code": "InternalError", "Message": "injected"},
                     "ResponseMetadata": {"HTTPStatusCode": 500, "HTTPHeaders": {}}})
        return None
    storage.client.meta.events.register("before-call.s3.UploadPart", fail)


def test_failed_part_falls_back_to_uploading_the_file(store: S3Storage, tmp_path: Path) -> None:
    stream = store.start_upload()
    fail_parts_of(stream, store)
    artifact, manifest = packed(tmp_path, make_rdb(os.urandom(SIZE)), stream)
    with structlog.testing.capture_logs() as logged:
        stream.finish(artifact, manifest)
    text = str([e for e in logged if e["log_level"] == "warning"])
    assert "streamed upload of backup" in text and "InternalError" in text
    head = store.client.head_object(Bucket=BUCKET, Key=PREFIX + manifest.artifact)
    assert head["Metadata"][META_SHA256] == manifest.stored_sha256  # put() did it
    assert uploads(store) == [] and store.listing().manifests == [manifest]


def test_failed_stream_and_failed_put_raise_as_put_does(store: S3Storage,
                                                        tmp_path: Path) -> None:
    stream = store.start_upload()
    fail_parts_of(stream, store)
    artifact, manifest = packed(tmp_path, make_rdb(os.urandom(SIZE)), stream)
    store.client.meta.events.register(  # the fallback's own upload fails too
        "before-call.s3.CompleteMultipartUpload",
        lambda **_: (AWSResponse("http://fake/", 503, HTTPHeaders(), None),
                     {"Error": {"Code": "SlowDown", "Message": "injected"},
                      "ResponseMetadata": {"HTTPStatusCode": 503, "HTTPHeaders": {}}}))
    with pytest.raises(StorageError, match=f"upload of backup {manifest.id}"):
        stream.finish(artifact, manifest)
    assert objects(store) == [] and uploads(store) == []


class SlowEnd(io.RawIOBase):
    """`data`, then (before its end) waits until `ready()`, then fails or ends."""

    def __init__(self, data: bytes, ready: Any, fail: bool) -> None:
        self._data, self._pos, self._ready, self._fail = data, 0, ready, fail

    def read(self, size: int = -1, /) -> bytes:
        if self._pos >= len(self._data):
            wait_until(self._ready, what="a streamed part")
            if self._fail:
                raise OSError(5, "Input/output error")
            return b""
        chunk = self._data[self._pos:self._pos + (size if size > 0 else MiB)]
        self._pos += len(chunk)
        return chunk


@pytest.mark.parametrize("failure", ["read-error", "bad-rdb"])
def test_pack_failure_aborts_the_upload(store: S3Storage, tmp_path: Path, failure: str) -> None:
    calls = Calls(store)
    stream = store.start_upload()
    truncated = make_rdb(os.urandom(SIZE))[:-9]  # no EOF opcode, no CRC
    source = SlowEnd(truncated, lambda: calls["UploadPart"] >= 1,
                     fail=failure == "read-error")
    error = StorageError if failure == "read-error" else IntegrityError
    with pytest.raises(error):
        pipeline.pack(source, tmp_path / "20260301T120000Z-abcdef.rdb", compression="none",
                      level=0, recipients=[], follower=stream)
    assert calls["CreateMultipartUpload"] == 1 and calls["AbortMultipartUpload"] == 1
    assert uploads(store) == [] and objects(store) == []
    assert os.listdir(tmp_path) == []


def test_abort_after_pack_leaves_nothing(store: S3Storage, tmp_path: Path) -> None:
    """What the cycle does when the backup fails after pack (read-back, local manifest)."""
    calls = Calls(store)
    stream = store.start_upload()
    packed(tmp_path, make_rdb(os.urandom(SIZE)), stream)
    stream.abort()
    stream.abort()  # idempotent
    assert calls["AbortMultipartUpload"] == (1 if calls["CreateMultipartUpload"] else 0)
    assert uploads(store) == [] and objects(store) == []


def test_follower_of_a_foreign_name_streams_nothing(store: S3Storage, tmp_path: Path) -> None:
    calls = Calls(store)
    stream = store.start_upload()
    with (tmp_path / "x").open("wb+") as fh:
        stream.opened(fh.fileno(), "../not-a-backup.rdb")
        fh.write(b"x" * SIZE)
        stream.written(SIZE)
    stream.abort()
    assert calls.count == {}


# -- end to end (CLI, redis-server, moto server) -----------------------------------------------


def client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY_ID,
                        aws_secret_access_key=S3_SECRET, region_name="us-east-1")


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = run_cli("-c", str(config), *args, env=S3_ENV)
    assert PASSWORD not in proc.stdout + proc.stderr
    assert S3_SECRET not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def big_redis(redis_server: RedisServer) -> RedisServer:
    """About 19 MiB of incompressible values: two full parts and a tail after zstd."""
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(SIZE // MiB):
        pipe.set(f"blob:{i}", os.urandom(MiB))
    pipe.execute()
    return redis_server


def setup(tmp_path: Path, server: RedisServer, url: str, bucket: str,
          extra: str = "") -> tuple[Path, Path]:
    backups = tmp_path / "backups"
    return write_config(tmp_path / "c.toml", server, backups,
                        s3_section(url, bucket, extra)), backups


def test_backup_streams_its_parts(tmp_path: Path, big_redis: RedisServer, moto_endpoint: str,
                                  bucket: str, proxy: FaultProxy) -> None:
    config, backups = setup(tmp_path, big_redis, proxy.url, bucket)
    code, out, err = cli(config, "backup")
    assert code == 0, err[-3000:]
    backup_id = last_line(out)
    ops = proxy.ops("forwarded")
    assert "put-artifact" not in ops and ops.count("multipart-create") == 1
    assert ops.count("multipart-part") == 3 and ops.count("multipart-complete") == 1
    local = json.loads((backups / f"{backup_id}.json").read_text())
    assert local["upload"] == "done"
    s3 = client(moto_endpoint)
    key = f"redis/prod/{local['artifact']}"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == (backups / local["artifact"]).read_bytes()
    assert hashlib.sha256(body).hexdigest() == local["stored_sha256"]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    code, out, _ = cli(config, "verify", backup_id, "--location", "s3")
    assert code == 0 and "rdb-crc:ok" in out, out


def first_upload_parts(request: Request, first: list[str]) -> bool:
    """The parts of the first multipart upload the proxy sees (the streamed one)."""
    if request.op != "multipart-part":
        return False
    upload_id = request.query["uploadId"][0]
    if not first:
        first.append(upload_id)
    return upload_id == first[0]


def test_part_failure_falls_back_to_the_file(tmp_path: Path, big_redis: RedisServer,
                                             moto_endpoint: str, bucket: str,
                                             proxy: FaultProxy) -> None:
    config, backups = setup(tmp_path, big_redis, proxy.url, bucket)
    first: list[str] = []
    proxy.arm("500", times=None, match=lambda r: first_upload_parts(r, first))
    code, out, err = cli(config, "backup")
    assert code == 0, err[-3000:]
    assert "streamed upload of backup" in err
    backup_id = last_line(out)
    assert json.loads((backups / f"{backup_id}.json").read_text())["upload"] == "done"
    assert "multipart-abort" in proxy.ops("forwarded")
    s3 = client(moto_endpoint)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    code, out, _ = cli(config, "verify", backup_id, "--location", "s3")
    assert code == 0, out


def test_failing_parts_leave_the_backup_pending(tmp_path: Path, big_redis: RedisServer,
                                                moto_endpoint: str, bucket: str,
                                                proxy: FaultProxy) -> None:
    config, backups = setup(tmp_path, big_redis, proxy.url, bucket)
    proxy.arm("500", "multipart-part", times=None)
    code, out, err = cli(config, "backup")
    assert code == 1 and "pending" in err, err[-3000:]
    backup_id = last_line(out)
    assert json.loads((backups / f"{backup_id}.json").read_text())["upload"] == "pending"
    s3 = client(moto_endpoint)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("Contents", []) == []
    proxy.clear()
    code, out, err = cli(config, "upload", "--pending")
    assert code == 0 and f"uploaded {backup_id}" in out, err[-3000:]
    code, out, _ = cli(config, "verify", backup_id, "--location", "s3")
    assert code == 0, out
