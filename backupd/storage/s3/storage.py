"""S3 (and S3-compatible) storage: list, read, put, commit and delete backups under a prefix.

The names under the prefix are those of storage/layout.py; only keys directly under the prefix
(no further '/') that layout calls ours are ever listed, opened or deleted. Incomplete
multipart uploads of our keys (a process killed mid-upload) are orphans too. Errors become
StorageError through `Reasons` (errors.py): never a credential in a message.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import structlog
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from backupd import checkpoints
from backupd import manifest as mf
from backupd.config import S3Config
from backupd.errors import BackupMissing, IntegrityError, StorageError
from backupd.manifest import Manifest
from backupd.storage import layout
from backupd.storage.base import DeleteResult, Listing, Orphan
from backupd.storage.s3.client import endpoint_host, make_client
from backupd.storage.s3.deleting import Deleter
from backupd.storage.s3.errors import (
    BOTO_ERRORS,
    Reasons,
    error_code,
    is_missing_key,
)
from backupd.storage.s3.manifest_cache import MANIFESTS, Where
from backupd.storage.s3.multipart import CHECKSUMS, MiB, StreamingUpload, part_size
from backupd.streams import RawReader

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger("backupd.storage.s3")

MAX_CONCURRENCY = 4  # parallel part uploads (memory: a few parts in flight)
MANIFEST_READERS = 8  # parallel manifest GETs in listing()
META_ID = "backupd-id"
META_SHA256 = "backupd-sha256"

_UPLOADS_UNLISTED: set[str] = set()  # buckets whose uploads could not be listed (warned once)


@dataclass(frozen=True)
class Key:
    """An object under the prefix that is ours: `name` is the key without the prefix."""

    name: str
    backup_id: str
    size: int
    modified: datetime
    etag: str = ""


@dataclass(frozen=True)
class Upload:
    """An incomplete multipart upload of one of our keys (`name` is the key without prefix);
    `token` is the start of its id that its orphan's name carries."""

    name: str
    upload_id: str
    token: str
    initiated: datetime

    @property
    def orphan_name(self) -> str:
        return layout.upload_orphan_name(self.name, self.token)


class _Reader(RawReader):
    """A raw stream over a botocore StreamingBody that maps read errors to StorageError."""

    def __init__(self, body: Any, describe: Callable[[BaseException], str]) -> None:
        super().__init__()
        self._body = body
        self._describe = describe

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self._body.read(None if size is None or size < 0 else size)
        except BOTO_ERRORS as exc:
            raise StorageError(self._describe(exc)) from None
        return data

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


class S3Storage:
    """Backups in an S3 bucket under a prefix. Thread-safe (boto3 clients are)."""

    name = "s3"

    def __init__(self, cfg: S3Config, env: Mapping[str, str] | None = None,
                 client: S3Client | None = None) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        self.client: S3Client = client if client is not None else make_client(cfg, env)
        self.reasons = Reasons(cfg, os.environ if env is None else env,
                               lambda: self.endpoint_host)
        self._deleter = Deleter(self)

    @property
    def endpoint_host(self) -> str:
        """host[:port] of the endpoint, without scheme, userinfo or path."""
        return endpoint_host(self.client.meta.endpoint_url or self.cfg.endpoint_url)

    # -- keys --------------------------------------------------------------------------------

    def _manifest_key(self, backup_id: str) -> str:
        return self.prefix + layout.manifest_name(backup_id)

    def artifact_key(self, manifest: Manifest) -> str:
        layout.check_id(manifest.id)
        if not layout.is_artifact_name(manifest.artifact, manifest.id, manifest.compression,
                                       manifest.encrypted):
            raise IntegrityError(f"manifest {manifest.id}: artifact name "
                                 f"{manifest.artifact[:80]!r} does not match the id")
        return self.prefix + manifest.artifact

    def ours(self, operation: str, fields: tuple[str, ...], kind: str = "") -> list[
            tuple[str, Any]]:
        """(name, entry) of every entry of `fields` in every page of the listing `operation`
        whose key is ours, directly under the prefix. StorageError if the listing fails
        part-way: a partial listing is never returned."""
        found: list[tuple[str, Any]] = []
        try:
            paginator = self.client.get_paginator(cast(Any, operation))
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                           Delimiter="/"):
                for entry in (e for f in fields for e in page.get(f, [])):
                    key = entry.get("Key", "")
                    name = key[len(self.prefix):]
                    if key.startswith(self.prefix) and layout.owner(name) is not None:
                        found.append((name, entry))
        except BOTO_ERRORS as exc:
            raise self.reasons.error(f"cannot list {kind}bucket {self.bucket} prefix "
                                     f"{self.prefix!r}", exc) from None
        return found

    def scan(self) -> list[Key]:
        """Every object of ours directly under the prefix."""
        return [Key(name, name[:layout.ID_LEN], int(obj.get("Size", 0)),
                     obj.get("LastModified") or datetime.fromtimestamp(0, UTC),
                     str(obj.get("ETag", "")))
                for name, obj in self.ours("list_objects_v2", ("Contents",))]

    # -- reading -----------------------------------------------------------------------------

    def listing(self) -> Listing:
        """All backups (newest first), orphans and broken manifests.

        Raises StorageError when the bucket cannot be listed completely (never returns a
        partial listing); callers must then delete nothing. One bad manifest does not raise:
        it goes to `broken`. A manifest that could not be *read* (network, permissions, not a
        bad file) also goes to `broken` and sets `complete=False`.

        Keys of an id whose manifest exists but is broken are neither backups nor orphans, so
        that orphan cleanup never deletes the artifact of a backup it could not understand
        (e.g. a manifest written by a newer backupd).

        Incomplete multipart uploads of our keys are orphans as well (see `_upload_orphans`).
        """
        keys = self.scan()
        by_id: dict[str, dict[str, Key]] = {}
        for key in keys:
            by_id.setdefault(key.backup_id, {})[key.name] = key
        with_manifest = sorted(i for i, names in by_id.items() if layout.manifest_name(i) in names)
        listing = Listing()
        results: list[tuple[str, Manifest | None, str, bool]]
        if with_manifest:
            workers = min(MANIFEST_READERS, len(with_manifest))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(
                    lambda i: self._load_manifest(i, by_id[i][layout.manifest_name(i)]),
                    with_manifest))
        else:
            results = []
        loaded: dict[str, Manifest] = {}
        for backup_id, manifest, reason, readable in results:
            if manifest is None:
                listing.broken[backup_id] = reason
                listing.complete = listing.complete and readable
                continue
            problem = self._parts_problem(manifest, by_id[backup_id])
            if problem:
                listing.broken[backup_id] = problem
            else:
                loaded[backup_id] = manifest
        for backup_id, names in by_id.items():
            if backup_id in listing.broken:
                continue
            good = loaded.get(backup_id)
            for name, key in names.items():
                if good is not None and (name == layout.manifest_name(backup_id) or name in
                                         {part.artifact for part in good.parts()}):
                    continue
                if layout.parse_upload_orphan_name(name) is not None:
                    continue  # an object named like an upload's orphan is never an orphan
                listing.orphans.append(Orphan(name=name, modified=key.modified, size=key.size))
        listing.orphans += self._upload_orphans()
        listing.manifests = sorted(loaded.values(), key=lambda m: m.id, reverse=True)
        listing.orphans.sort(key=lambda o: o.name)
        return listing

    @staticmethod
    def _parts_problem(manifest: Manifest, keys: dict[str, Key]) -> str:
        """Why the stored artifacts (one, or a cluster backup's shards) are not the
        manifest's, or ""."""
        for part in manifest.parts():
            artifact = keys.get(part.artifact)
            if artifact is None:
                return f"artifact {part.artifact} missing"
            if artifact.size != part.stored_size:
                return (f"artifact {part.artifact} is {artifact.size} bytes, the manifest "
                        f"says {part.stored_size}")
        return ""

    def _upload_orphans(self) -> list[Orphan]:
        """Our incomplete multipart uploads as orphans (`modified` is when they started).
        No orphans but a warning when they cannot be listed: s3:ListBucketMultipartUploads is
        a permission of its own that older policies lack, and retention must work without it.
        The listing stays complete: an upload is never a backup."""
        try:
            uploads = self.uploads()
        except StorageError as exc:
            # Once per bucket and process: a daemon would repeat it on every run.
            report = log.debug if self.bucket in _UPLOADS_UNLISTED else log.warning
            _UPLOADS_UNLISTED.add(self.bucket)
            report("s3_uploads_unlisted", error=str(exc), hint="incomplete uploads are not "
                   "cleaned up (grant s3:ListBucketMultipartUploads or add an "
                   "AbortIncompleteMultipartUpload lifecycle rule)")
            return []
        return [Orphan(name=u.orphan_name, modified=u.initiated, size=0) for u in uploads]

    def uploads(self) -> list[Upload]:
        """Every incomplete multipart upload of ours directly under the prefix whose id and
        age are known (the age rule of orphan cleanup needs `Initiated`; an id needs a token
        that its orphan's name can carry)."""
        uploads: list[Upload] = []
        for name, entry in self.ours("list_multipart_uploads", ("Uploads",),
                                      "incomplete multipart uploads in "):
            upload_id, initiated = entry.get("UploadId", ""), entry.get("Initiated")
            token = layout.upload_token(upload_id)
            if initiated is not None and token is not None:
                uploads.append(Upload(name, upload_id, token, initiated))
        return uploads

    def _where(self, backup_id: str) -> Where:
        return Where(self.endpoint_host, self.bucket, self.prefix, backup_id)

    def _load_manifest(self, backup_id: str, key: Key) -> tuple[str, Manifest | None, str,
                                                                 bool]:
        """(id, manifest or None, why not, whether the failure is the file's fault). From the
        process's cache when this object (same ETag) was read before."""
        if key.size > mf.MAX_MANIFEST_BYTES:
            return backup_id, None, f"manifest is larger than {mf.MAX_MANIFEST_BYTES} bytes", True
        cached = MANIFESTS.get(self._where(backup_id), key.etag)
        if cached is not None:
            return backup_id, cached, "", True
        try:
            manifest = self._fetch_manifest(backup_id)
            MANIFESTS.put(self._where(backup_id), key.etag, manifest)
            return backup_id, manifest, "", True
        except IntegrityError as exc:
            return backup_id, None, str(exc), True
        except StorageError as exc:
            return backup_id, None, str(exc), False

    def _fetch_manifest(self, backup_id: str) -> Manifest:
        key = self._manifest_key(backup_id)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                data = body.read(mf.MAX_MANIFEST_BYTES + 1)
            finally:
                body.close()
        except BOTO_ERRORS as exc:
            error = self.reasons.error(f"cannot read the manifest of backup {backup_id}", exc,
                                       key)
            if is_missing_key(exc):
                raise BackupMissing(str(error)) from None
            raise error from None
        return mf.parse(data, expected_id=backup_id)

    def read_manifest(self, backup_id: str) -> Manifest:
        """The manifest of one backup: IntegrityError if unparsable, StorageError if absent or
        unreadable, UsageError if `backup_id` is not an id."""
        layout.check_id(backup_id)
        return self._fetch_manifest(backup_id)

    def artifact_problem(self, manifest: Manifest) -> str | None:
        """One HEAD: present, and of the size the manifest says (as `listing` checks)."""
        key = self.artifact_key(manifest)
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except BOTO_ERRORS as exc:
            if is_missing_key(exc):
                return f"artifact {manifest.artifact} missing"
            raise self.reasons.error(f"cannot check the artifact of backup {manifest.id}", exc,
                                     key) from None
        if size != manifest.stored_size:
            return (f"artifact {manifest.artifact} is {size} bytes, the manifest says "
                    f"{manifest.stored_size}")
        return None

    def open_artifact(self, manifest: Manifest) -> AbstractContextManager[BinaryIO]:
        """A streaming reader of the stored artifact; StorageError if it is missing. Read
        errors while streaming are raised as StorageError too."""
        key = self.artifact_key(manifest)
        return self._open(key, manifest.id)

    @contextmanager
    def _open(self, key: str, backup_id: str) -> Iterator[BinaryIO]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except BOTO_ERRORS as exc:
            raise self.reasons.error(f"cannot open the artifact of backup {backup_id}", exc,
                              key) from None
        raw = _Reader(resp["Body"], lambda exc: str(self.reasons.error(
            f"reading the artifact of backup {backup_id} failed", exc, key)))
        stream = io.BufferedReader(raw, buffer_size=MiB)
        try:
            yield stream
        finally:
            stream.close()

    # -- writing -----------------------------------------------------------------------------

    def _extra_args(self, manifest: Manifest) -> dict[str, Any]:
        return self.object_args(manifest.id, manifest.stored_sha256)

    def object_args(self, backup_id: str, sha256: str = "") -> dict[str, Any]:
        """Metadata, checksum algorithm, storage class and SSE of an artifact upload; `sha256`
        is empty when it is not known yet (a streamed upload)."""
        metadata = {META_ID: backup_id, **({META_SHA256: sha256} if sha256 else {})}
        extra: dict[str, Any] = {"Metadata": metadata}
        algorithm = CHECKSUMS[self.cfg.checksum]
        if algorithm:
            extra["ChecksumAlgorithm"] = algorithm
        if self.cfg.storage_class:
            extra["StorageClass"] = self.cfg.storage_class
        if self.cfg.sse:
            extra["ServerSideEncryption"] = self.cfg.sse
            if self.cfg.sse == "aws:kms" and self.cfg.sse_kms_key_id:
                extra["SSEKMSKeyId"] = self.cfg.sse_kms_key_id
        return extra

    def _retain_until(self) -> datetime:
        return datetime.now(UTC) + timedelta(days=self.cfg.object_lock_days)

    def put(self, artifact: Path, manifest: Manifest) -> None:
        """Upload the artifact, check it arrived (size and metadata; the SHA-256 itself when
        the server returns a full-object checksum), set Object Lock retention, then write the
        manifest (the commit). On failure nothing is committed and StorageError is raised; a
        stray artifact left behind is an orphan for `delete_orphans`. A cluster backup's
        shards (beside `artifact`) are uploaded and checked one by one, the manifest last."""
        parts = manifest.parts()
        if len(parts) > 1:
            action = f"upload of cluster backup {manifest.id} to bucket {self.bucket} failed"
            for part in parts:
                key, size, single = self._upload_file(artifact.with_name(part.artifact), part)
                self._verify(key, size, part, action, single_part=single)
                self._lock(key, part)
            checkpoints.reached("upload")
            self._put_manifest(manifest, action)
            return
        key, size, single = self._upload_file(artifact, manifest)
        action = f"upload of backup {manifest.id} to bucket {self.bucket} failed"
        self.commit(key, size, manifest, action, single_part=single)
        log.debug("s3_uploaded", id=manifest.id, size=size)

    def _upload_file(self, artifact: Path, manifest: Manifest) -> tuple[str, int, bool]:
        """Upload one artifact file: (its key, its size, whether it went in one part)."""
        key = self.artifact_key(manifest)
        try:
            size = artifact.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot read {artifact}: {exc.strerror}") from None
        if size != manifest.stored_size:
            raise IntegrityError(f"{artifact} is {size} bytes, the manifest of backup "
                                 f"{manifest.id} says {manifest.stored_size}")
        chunk = part_size(size)
        transfer = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                                  max_concurrency=MAX_CONCURRENCY,
                                  preferred_transfer_client="classic")
        action = f"upload of backup {manifest.id} to bucket {self.bucket} failed"
        try:
            # s3transfer retries parts and aborts the multipart upload when it fails.
            self.client.upload_file(Filename=str(artifact), Bucket=self.bucket, Key=key,
                                    ExtraArgs=self._extra_args(manifest), Config=transfer)
        except BOTO_ERRORS as exc:
            raise self.reasons.error(action, exc, key) from None
        return key, size, size < chunk

    def start_upload(self) -> StreamingUpload:
        """A multipart upload to feed while pack() writes the artifact (see StreamingUpload)."""
        return StreamingUpload(self)

    def commit(self, key: str, size: int, manifest: Manifest, action: str, *,
                single_part: bool, streamed: bool = False) -> None:
        """Check the uploaded object, set its Object Lock retention, then write the manifest
        (the commit). Whatever fails before the manifest leaves nothing committed."""
        self._verify(key, size, manifest, action, single_part=single_part, streamed=streamed)
        self._lock(key, manifest)
        checkpoints.reached("upload")
        self._put_manifest(manifest, action)

    def _lock(self, key: str, manifest: Manifest) -> None:
        """Object Lock retention on an uploaded artifact (removed again when that fails)."""
        if self.cfg.object_lock_days > 0:
            try:
                self.client.put_object_retention(
                    Bucket=self.bucket, Key=key,
                    Retention={"Mode": cast(Any, self.cfg.object_lock_mode),
                               "RetainUntilDate": self._retain_until()})
            except BOTO_ERRORS as exc:
                self._discard(key)
                raise self.reasons.error(f"setting Object Lock retention on backup {manifest.id} "
                                  "failed", exc, key) from None

    def _verify(self, key: str, size: int, manifest: Manifest, action: str,
                single_part: bool, streamed: bool = False) -> None:
        """Size and metadata of the stored object against the manifest. A streamed object
        was created before its SHA-256 was known: it carries the backup's id instead (S3
        checked each part's checksum, the manifest carries the SHA-256)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except BOTO_ERRORS as exc:
            raise self.reasons.error(action, exc, key) from None
        problem = ""
        metadata = head.get("Metadata", {})
        stored = metadata.get(META_SHA256)
        # Only a single-part PUT has a full-object SHA-256 (multipart: checksum of checksums).
        full_sha = head.get("ChecksumSHA256", "") if single_part else ""
        if head.get("ContentLength") != size:
            problem = f"the stored object is {head.get('ContentLength')} bytes, not {size}"
        elif streamed and metadata.get(META_ID) != manifest.id:
            problem = "the stored object's id metadata does not match the manifest"
        elif not streamed and stored != manifest.stored_sha256:
            problem = "the stored object's sha256 metadata does not match the manifest"
        elif (full_sha and "-" not in full_sha
              and full_sha != base64.b64encode(bytes.fromhex(manifest.stored_sha256)).decode()):
            problem = "the stored object's SHA-256 checksum does not match the manifest"
        if problem:
            self._discard(key)
            raise StorageError(f"S3: {action}: {problem}; the object was deleted")

    def _discard(self, key: str) -> None:
        """Best-effort removal of an uncommitted artifact (else it is an orphan)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except BOTO_ERRORS as exc:
            log.warning("s3_discard_failed", key=key, error=self.reasons.reason(exc, key))

    def _put_manifest(self, manifest: Manifest, action: str) -> None:
        key = self._manifest_key(manifest.id)
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": key, "Body": manifest.to_json(),
            "ContentType": "application/json",
            "Metadata": {META_ID: manifest.id},
        }
        algorithm = CHECKSUMS[self.cfg.checksum]
        if self.cfg.object_lock_days > 0:
            # Lock the commit marker too; Object Lock PUTs need a checksum header.
            args["ObjectLockMode"] = self.cfg.object_lock_mode
            args["ObjectLockRetainUntilDate"] = self._retain_until()
            algorithm = algorithm or "SHA256"
        if algorithm:
            args["ChecksumAlgorithm"] = algorithm
        extra = self._extra_args(manifest)
        args.update({k: extra[k] for k in ("StorageClass", "ServerSideEncryption",
                                           "SSEKMSKeyId") if k in extra})
        try:
            self.client.put_object(**args)
        except BOTO_ERRORS as exc:
            raise self.reasons.error(f"{action} (writing the manifest)", exc, key) from None

    # -- deleting ----------------------------------------------------------------------------

    def delete(self, backup_ids: Iterable[str]) -> DeleteResult:
        """Delete backups, manifests first (see Deleter.delete); their cached manifests go
        first of all, whatever the delete's outcome."""
        ids = list(backup_ids)
        MANIFESTS.drop(self._where(i) for i in ids)
        return self._deleter.delete(ids)

    def delete_orphans(self, names: Iterable[str]) -> DeleteResult:
        """Delete leftover objects and abort incomplete uploads (see Deleter.delete_orphans)."""
        return self._deleter.delete_orphans(names)

    def abort_multipart(self, key: str, upload_id: str) -> str | None:
        """Abort one multipart upload; why it failed, or None (also when it is gone
        already)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            return None if error_code(exc) == "NoSuchUpload" else self.reasons.reason(exc, key)
        except BOTO_ERRORS as exc:
            return self.reasons.reason(exc, key)
        return None

    # -- checks ------------------------------------------------------------------------------

    def check_access(self) -> None:
        """HeadBucket plus a one-key listing under the prefix; StorageError says what is wrong
        (missing bucket, access denied, rejected credentials, unreachable endpoint)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except BOTO_ERRORS as exc:
            raise self.reasons.error(f"cannot access bucket {self.bucket}", exc) from None
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except BOTO_ERRORS as exc:
            raise self.reasons.error(f"cannot list bucket {self.bucket} prefix {self.prefix!r}",
                              exc) from None
