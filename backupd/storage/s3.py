"""S3 (and S3-compatible) storage backend.

Layout under the configured prefix (which ends with '/'):

    <prefix><id>.json              the manifest: written last, the commit marker
    <prefix><id>.rdb[.zst][.age]   the artifact (`Manifest.artifact`)

Only keys directly under the prefix (no further '/') whose name is a valid backup id followed by
'.' are ours. Anything else in the bucket is never listed, opened or deleted. Incomplete multipart
uploads of our keys (a process killed mid-upload) are orphans too, named
"<name> (incomplete upload <first 12 characters of the upload id>)".

Every botocore / boto3 error is turned into StorageError with a message for the operator that
never contains the access key, the secret key or the userinfo of the endpoint URL.
"""

from __future__ import annotations

import base64
import builtins
import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from backupd import checkpoints
from backupd import manifest as mf
from backupd.config import S3Config
from backupd.errors import (
    BackupdError,
    ConfigError,
    IntegrityError,
    StorageError,
    UsageError,
)
from backupd.manifest import Manifest
from backupd.storage.base import DeleteResult, Listing, Orphan

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        MultipartUploadTypeDef,
        ObjectIdentifierTypeDef,
        ObjectTypeDef,
    )

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART_SIZE = 8 * MiB
MAX_PARTS_TARGET = 9000  # S3 allows 10,000 parts; keep a margin
MAX_DELETE_BATCH = 1000  # DeleteObjects limit
MAX_CONCURRENCY = 4  # parallel part uploads (memory: a few parts in flight)
MANIFEST_READERS = 8  # parallel manifest GETs in list()
ID_LEN = 23  # len("YYYYMMDDTHHMMSSZ-xxxxxx")
META_ID = "backupd-id"
META_SHA256 = "backupd-sha256"
UPLOAD_TOKEN = 12  # leading characters of an upload id that name its orphan

_Failures = list[tuple[str, str, str]]  # (name, code, message); in S3Storage `list` is a method
_Target = tuple[str, str | None]  # (name relative to the prefix, version id)
LOCKED = "locked"
_BOTO_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError, Boto3Error)
_CHECKSUMS = {"sha256": "SHA256", "crc32": "CRC32", "none": ""}
_TOKEN = re.compile(rf"[A-Za-z0-9._~+=/-]{{1,{UPLOAD_TOKEN}}}")  # an orphan's upload id start
_UPLOADS_UNLISTED: set[str] = set()  # buckets whose uploads could not be listed (warned once)
_UPLOAD_NAME = re.compile(rf"(?P<name>.+) \(incomplete upload (?P<token>{_TOKEN.pattern})\)")


def part_size(size: int) -> int:
    """Multipart chunk size for a file of `size` bytes: at least 8 MiB, and large enough that
    the upload needs at most 9,000 parts (S3's limit is 10,000)."""
    return max(MIN_PART_SIZE, -(-max(size, 0) // MAX_PARTS_TARGET))


def make_client(cfg: S3Config, env: Mapping[str, str] | None = None) -> S3Client:
    """An S3 client for `cfg`: explicit credentials from the env vars named in the config when
    they are set, otherwise the default AWS credential chain (env, profile, IMDS, IRSA...)."""
    env = os.environ if env is None else env
    key_id = env.get(cfg.access_key_id_env, "") if cfg.access_key_id_env else ""
    secret = env.get(cfg.secret_access_key_env, "") if cfg.secret_access_key_env else ""
    if bool(key_id) != bool(secret):
        present, missing = ((cfg.access_key_id_env, cfg.secret_access_key_env) if key_id
                            else (cfg.secret_access_key_env, cfg.access_key_id_env))
        raise ConfigError(f"S3 credentials: environment variable {present} is set but "
                          f"{missing} is not; set both or neither")
    config = Config(
        s3={"addressing_style": cast(Any, cfg.addressing_style)},
        retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    kwargs: dict[str, Any] = {"region_name": cfg.region or None, "config": config}
    if cfg.endpoint_url:
        _check_endpoint(cfg.endpoint_url)
        kwargs["endpoint_url"] = cfg.endpoint_url
    if key_id:
        kwargs["aws_access_key_id"] = key_id
        kwargs["aws_secret_access_key"] = secret
    try:
        # A session per client: boto3's default session is not thread-safe to create.
        client: S3Client = boto3.session.Session().client("s3", **kwargs)
        return client
    except ValueError:
        # botocore rejects a malformed endpoint URL with a message that quotes it.
        raise ConfigError("key 's3.endpoint_url': not a valid URL (expected e.g. "
                          "https://s3.example.com)") from None
    except _BOTO_ERRORS as exc:
        raise ConfigError(f"cannot create the S3 client: {type(exc).__name__}") from None


def _check_endpoint(url: str) -> None:
    """ConfigError (without the URL, which may hold credentials) unless `url` is http(s)."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a bad port (or an unencoded '/' in userinfo)
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError("key 's3.endpoint_url': expected an http(s) URL such as "
                          "https://s3.example.com (percent-encode reserved characters)")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))


def _is_lock_error(code: str, message: str) -> bool:
    text = message.lower()
    if code == "ObjectLocked":
        return True
    if code in ("AccessDenied", "InvalidRequest", "403"):
        return "lock" in text or "retention" in text or "legal hold" in text
    return False


def _is_missing_md5(code: str, message: str) -> bool:
    return code == "MissingContentMD5" or (
        code in ("InvalidRequest", "InvalidArgument", "BadDigest")
        and "content-md5" in message.lower())


@dataclass(frozen=True)
class _Key:
    """An object under the prefix that is ours: `name` is the key without the prefix."""

    name: str
    backup_id: str
    size: int
    modified: datetime


def _our_name(name: str) -> str | None:
    """The backup id a name (key without prefix) belongs to, or None if it is not ours."""
    if "/" in name or len(name) <= ID_LEN or name[ID_LEN] != ".":
        return None
    backup_id = name[:ID_LEN]
    return backup_id if mf.is_valid_id(backup_id) else None


@dataclass(frozen=True)
class _Upload:
    """An incomplete multipart upload of one of our keys (`name` is the key without prefix)."""

    name: str
    upload_id: str
    initiated: datetime

    @property
    def token(self) -> str:
        return self.upload_id[:UPLOAD_TOKEN]

    @property
    def orphan_name(self) -> str:
        return f"{self.name} (incomplete upload {self.token})"


def _parse_upload_name(text: str) -> tuple[str, str] | None:
    """(name, token) of an `_Upload.orphan_name` of ours, or None: such a name is never taken
    for an object's, so that deleting an orphan cannot hit the wrong kind of thing."""
    match = _UPLOAD_NAME.fullmatch(text)
    if match is None or _our_name(match["name"]) is None:
        return None
    return match["name"], match["token"]


class _Reader(io.RawIOBase):
    """A raw stream over a botocore StreamingBody that maps read errors to StorageError."""

    def __init__(self, body: Any, describe: Callable[[BaseException], str]) -> None:
        super().__init__()
        self._body = body
        self._describe = describe

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except _BOTO_ERRORS as exc:
            raise StorageError(self._describe(exc)) from None
        view[: len(data)] = data
        return len(data)

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
        if not cfg.bucket:
            raise ConfigError("key 's3.bucket': expected a bucket name, got ''")
        if cfg.prefix and (not cfg.prefix.endswith("/") or cfg.prefix.startswith("/")):
            raise ConfigError(f"key 's3.prefix': expected a prefix ending with '/', "
                              f"got {cfg.prefix!r}")
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        self.client: S3Client = client if client is not None else make_client(cfg, env)
        env = os.environ if env is None else env
        # Values that must never reach a message: redacted defensively from server messages.
        secrets = [env.get(cfg.access_key_id_env or "", ""),
                   env.get(cfg.secret_access_key_env or "", "")]
        try:
            parts = urlsplit(cfg.endpoint_url)
            secrets += [parts.username or "", parts.password or ""]
        except ValueError:
            pass
        self._secrets = sorted({v for v in secrets if len(v) >= 4}, key=len, reverse=True)
        self._single_deletes = False  # set after a server rejected DeleteObjects (Content-MD5)

    # -- errors ------------------------------------------------------------------------------

    @property
    def endpoint_host(self) -> str:
        """host[:port] of the endpoint, without scheme, userinfo or path."""
        url = self.client.meta.endpoint_url or self.cfg.endpoint_url
        try:
            parts = urlsplit(url)
            host = parts.hostname or "(unparsable URL)"
            return f"{host}:{parts.port}" if parts.port else host
        except ValueError:
            return "(unparsable URL)"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]

    def _reason(self, exc: BaseException, key: str | None = None) -> str:
        """What went wrong, for the operator; never contains credentials or endpoint userinfo."""
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__
        if isinstance(exc, ClientError):
            code, message = _code(exc), _message(exc)
            if code == "NoSuchBucket" or (code == "404" and key is None):
                return f"bucket {self.bucket} does not exist"
            if code in ("NoSuchKey", "404"):
                return f"object {key} does not exist"
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                        "ExpiredToken", "InvalidClientTokenId"):
                return "the S3 credentials were rejected"
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                return f"access denied to bucket {self.bucket} (check the IAM policy)"
            if code in ("PermanentRedirect", "301", "IllegalLocationConstraintException"):
                return (f"bucket {self.bucket} is in another region than the configured "
                        f"{self.cfg.region!r}")
            return self._scrub(f"{code}: {message}" if message else code)
        if isinstance(exc, ReadTimeoutError):
            return f"the S3 endpoint {self.endpoint_host} did not answer in time"
        if isinstance(exc, ConnectionError):  # EndpointConnectionError, ConnectTimeoutError...
            return f"cannot reach the S3 endpoint {self.endpoint_host}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return (f"no S3 credentials found (set {self.cfg.access_key_id_env} and "
                    f"{self.cfg.secret_access_key_env}, or use an instance/role profile)")
        if isinstance(exc, BotoCoreError):
            # botocore messages may quote the endpoint URL: report the error kind only.
            return f"{type(exc).__name__} talking to {self.endpoint_host}"
        return type(exc).__name__

    def _error(self, action: str, exc: BaseException, key: str | None = None) -> StorageError:
        return StorageError(f"S3: {action}: {self._reason(exc, key)}")

    # -- keys --------------------------------------------------------------------------------

    def _manifest_key(self, backup_id: str) -> str:
        return f"{self.prefix}{mf.check_id(backup_id)}.json"

    def _artifact_key(self, manifest: Manifest) -> str:
        mf.check_id(manifest.id)
        expected = mf.artifact_name(manifest.id, manifest.compression, manifest.encrypted) \
            if manifest.compression in mf.COMPRESSION_EXT else None
        if manifest.artifact != expected:
            raise IntegrityError(f"manifest {manifest.id}: artifact name "
                                 f"{manifest.artifact[:80]!r} does not match the id")
        return self.prefix + manifest.artifact

    def _scan(self) -> list[_Key]:
        """Every object of ours directly under the prefix. Raises StorageError if the listing
        fails part-way: a partial listing is never returned."""
        keys: list[_Key] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                           Delimiter="/"):
                for obj in page.get("Contents", []):
                    key = self._our_key(obj)
                    if key is not None:
                        keys.append(key)
        except _BOTO_ERRORS as exc:
            raise self._error(f"cannot list bucket {self.bucket} prefix {self.prefix!r}",
                              exc) from None
        return keys

    def _our_key(self, obj: ObjectTypeDef) -> _Key | None:
        key = obj.get("Key", "")
        if not key.startswith(self.prefix):
            return None
        name = key[len(self.prefix):]
        backup_id = _our_name(name)
        if backup_id is None:
            return None
        modified = obj.get("LastModified") or datetime.fromtimestamp(0, UTC)
        return _Key(name, backup_id, int(obj.get("Size", 0)), modified)

    # -- reading -----------------------------------------------------------------------------

    def list(self) -> Listing:
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
        keys = self._scan()
        by_id: dict[str, dict[str, _Key]] = {}
        for key in keys:
            by_id.setdefault(key.backup_id, {})[key.name] = key
        with_manifest = sorted(i for i, names in by_id.items() if f"{i}.json" in names)
        listing = Listing()
        results: list[tuple[str, Manifest | None, str, bool]]
        if with_manifest:
            workers = min(MANIFEST_READERS, len(with_manifest))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(
                    lambda i: self._load_manifest(i, by_id[i][f"{i}.json"].size),
                    with_manifest))
        else:
            results = []
        loaded: dict[str, Manifest] = {}
        for backup_id, manifest, reason, readable in results:
            if manifest is None:
                listing.broken[backup_id] = reason
                listing.complete = listing.complete and readable
                continue
            artifact = by_id[backup_id].get(manifest.artifact)
            if artifact is None:
                listing.broken[backup_id] = f"artifact {manifest.artifact} missing"
            elif artifact.size != manifest.stored_size:
                listing.broken[backup_id] = (f"artifact {manifest.artifact} is {artifact.size} "
                                             f"bytes, the manifest says {manifest.stored_size}")
            else:
                loaded[backup_id] = manifest
        for backup_id, names in by_id.items():
            if backup_id in listing.broken:
                continue
            good = loaded.get(backup_id)
            for name, key in names.items():
                if good is not None and name in (f"{backup_id}.json", good.artifact):
                    continue
                if _parse_upload_name(name) is not None:
                    continue  # an object named like an upload's orphan is never an orphan
                listing.orphans.append(Orphan(name=name, modified=key.modified, size=key.size))
        listing.orphans += self._upload_orphans()
        listing.manifests = sorted(loaded.values(), key=lambda m: m.id, reverse=True)
        listing.orphans.sort(key=lambda o: o.name)
        return listing

    def _upload_orphans(self) -> builtins.list[Orphan]:
        """Our incomplete multipart uploads as orphans (`modified` is when they started).
        No orphans but a warning when they cannot be listed: s3:ListBucketMultipartUploads is
        a permission of its own that older policies lack, and retention must work without it.
        The listing stays complete: an upload is never a backup."""
        try:
            uploads = self._uploads()
        except StorageError as exc:
            # Once per bucket and process: a daemon would repeat it on every run.
            level = logging.DEBUG if self.bucket in _UPLOADS_UNLISTED else logging.WARNING
            _UPLOADS_UNLISTED.add(self.bucket)
            log.log(level, "%s; incomplete uploads are not cleaned up (grant "
                    "s3:ListBucketMultipartUploads or add an AbortIncompleteMultipartUpload "
                    "lifecycle rule)", exc)
            return []
        return [Orphan(name=u.orphan_name, modified=u.initiated, size=0) for u in uploads]

    def _uploads(self) -> builtins.list[_Upload]:
        """Every incomplete multipart upload of ours directly under the prefix. Raises
        StorageError if the listing fails part-way."""
        uploads: builtins.list[_Upload] = []
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                           Delimiter="/"):
                for entry in page.get("Uploads", []):
                    upload = self._our_upload(entry)
                    if upload is not None:
                        uploads.append(upload)
        except _BOTO_ERRORS as exc:
            raise self._error(f"cannot list incomplete multipart uploads in bucket "
                              f"{self.bucket} prefix {self.prefix!r}", exc) from None
        return uploads

    def _our_upload(self, entry: MultipartUploadTypeDef) -> _Upload | None:
        """The upload if its key is ours, and its id and age are known (the age rule of orphan
        cleanup needs `Initiated`; an id needs a token that its orphan's name can carry)."""
        key, upload_id = entry.get("Key", ""), entry.get("UploadId", "")
        initiated = entry.get("Initiated")
        name = key[len(self.prefix):]
        if (not key.startswith(self.prefix) or _our_name(name) is None or initiated is None
                or _TOKEN.fullmatch(upload_id[:UPLOAD_TOKEN]) is None):
            return None
        return _Upload(name, upload_id, initiated)

    def _load_manifest(self, backup_id: str, size: int) -> tuple[str, Manifest | None, str,
                                                                  bool]:
        """(id, manifest or None, why not, whether the failure is the file's fault)."""
        if size > mf.MAX_MANIFEST_BYTES:
            return backup_id, None, f"manifest is larger than {mf.MAX_MANIFEST_BYTES} bytes", True
        try:
            return backup_id, self._fetch_manifest(backup_id), "", True
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
        except _BOTO_ERRORS as exc:
            raise self._error(f"cannot read the manifest of backup {backup_id}", exc,
                              key) from None
        return mf.parse(data, expected_id=backup_id)

    def read_manifest(self, backup_id: str) -> Manifest:
        """The manifest of one backup: IntegrityError if unparsable, StorageError if absent or
        unreadable, UsageError if `backup_id` is not an id."""
        mf.check_id(backup_id)
        return self._fetch_manifest(backup_id)

    def open_artifact(self, manifest: Manifest) -> AbstractContextManager[BinaryIO]:
        """A streaming reader of the stored artifact; StorageError if it is missing. Read
        errors while streaming are raised as StorageError too."""
        key = self._artifact_key(manifest)
        return self._open(key, manifest.id)

    @contextmanager
    def _open(self, key: str, backup_id: str) -> Iterator[BinaryIO]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except _BOTO_ERRORS as exc:
            raise self._error(f"cannot open the artifact of backup {backup_id}", exc,
                              key) from None
        raw = _Reader(resp["Body"], lambda exc: str(self._error(
            f"reading the artifact of backup {backup_id} failed", exc, key)))
        stream = io.BufferedReader(raw, buffer_size=MiB)
        try:
            yield stream
        finally:
            stream.close()

    # -- writing -----------------------------------------------------------------------------

    def _extra_args(self, manifest: Manifest) -> dict[str, Any]:
        return self._object_args(manifest.id, manifest.stored_sha256)

    def _object_args(self, backup_id: str, sha256: str = "") -> dict[str, Any]:
        """Metadata, checksum algorithm, storage class and SSE of an artifact upload; `sha256`
        is empty when it is not known yet (a streamed upload)."""
        metadata = {META_ID: backup_id, **({META_SHA256: sha256} if sha256 else {})}
        extra: dict[str, Any] = {"Metadata": metadata}
        algorithm = _CHECKSUMS[self.cfg.checksum]
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
        stray artifact left behind is an orphan for `delete_orphans`."""
        key = self._artifact_key(manifest)
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
        except _BOTO_ERRORS as exc:
            raise self._error(action, exc, key) from None
        self._commit(key, size, manifest, action, single_part=size < chunk)
        log.debug("uploaded backup %s to s3 (%d bytes, %d-byte parts)", manifest.id, size, chunk)

    def start_upload(self) -> StreamingUpload:
        """A multipart upload to feed while pack() writes the artifact (see StreamingUpload)."""
        return StreamingUpload(self)

    def _commit(self, key: str, size: int, manifest: Manifest, action: str, *,
                single_part: bool, streamed: bool = False) -> None:
        """Check the uploaded object, set its Object Lock retention, then write the manifest
        (the commit). Whatever fails before the manifest leaves nothing committed."""
        self._verify(key, size, manifest, action, single_part=single_part, streamed=streamed)
        if self.cfg.object_lock_days > 0:
            try:
                self.client.put_object_retention(
                    Bucket=self.bucket, Key=key,
                    Retention={"Mode": cast(Any, self.cfg.object_lock_mode),
                               "RetainUntilDate": self._retain_until()})
            except _BOTO_ERRORS as exc:
                self._discard(key)
                raise self._error(f"setting Object Lock retention on backup {manifest.id} "
                                  "failed", exc, key) from None
        checkpoints.reached("upload")
        self._put_manifest(manifest, action)

    def _verify(self, key: str, size: int, manifest: Manifest, action: str,
                single_part: bool, streamed: bool = False) -> None:
        """Size and metadata of the stored object against the manifest. A streamed object
        was created before its SHA-256 was known: it carries the backup's id instead (S3
        checked each part's checksum, the manifest carries the SHA-256)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except _BOTO_ERRORS as exc:
            raise self._error(action, exc, key) from None
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
        except _BOTO_ERRORS as exc:
            log.warning("could not delete uncommitted S3 object %s: %s", key,
                        self._reason(exc, key))

    def _put_manifest(self, manifest: Manifest, action: str) -> None:
        key = self._manifest_key(manifest.id)
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": key, "Body": manifest.to_json(),
            "ContentType": "application/json",
            "Metadata": {META_ID: manifest.id},
        }
        algorithm = _CHECKSUMS[self.cfg.checksum]
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
        except _BOTO_ERRORS as exc:
            raise self._error(f"{action} (writing the manifest)", exc, key) from None

    # -- deleting ----------------------------------------------------------------------------

    def delete(self, backup_ids: Iterable[str]) -> DeleteResult:
        """Delete backups: every manifest first (one batch per 1000 keys), then the artifacts
        and other keys of the ids whose manifest is gone, so an interrupted delete leaves
        orphans, never a manifest without its artifact. A missing backup counts as deleted.

        With `object_lock_days > 0` (a versioned bucket) every version of the backup's keys is
        deleted by VersionId, so that retention is enforced and reported (`locked`, and the
        backup stays complete and listed) instead of hidden behind a delete marker.
        Per-id outcomes go to the result; StorageError is raised only when the bucket cannot
        be listed (nothing was deleted then). UsageError for a non-id, before any deletion."""
        ids = list(dict.fromkeys(mf.check_id(i) for i in backup_ids))
        result = DeleteResult()
        if not ids:
            return result
        owned: dict[str, builtins.list[_Target]] = {i: [] for i in ids}
        for target in self._targets():
            backup_id = target[0][:ID_LEN]
            if backup_id in owned:
                owned[backup_id].append(target)
        manifests = [t for i in ids for t in owned[i] if t[0] == f"{i}.json"]
        outcome = self._delete_targets(manifests, by_name=False)
        checkpoints.reached("prune-s3")
        rest = [t for i in ids if i not in outcome for t in owned[i] if t[0] != f"{i}.json"]
        outcome.update(self._delete_targets(rest, by_name=False))
        for backup_id in ids:
            self._record(result, backup_id, outcome.get(backup_id))
        return result

    def delete_orphans(self, names: Iterable[str]) -> DeleteResult:
        """Delete leftover objects and abort incomplete multipart uploads (names relative to
        the prefix, as in `Listing.orphans`). An object whose id has a manifest now (the backup
        was committed since the listing) is skipped and reported as failed; a name that is
        neither an orphan object nor an upload of ours (e.g. a manifest) is a UsageError,
        raised before anything is deleted."""
        objects: builtins.list[str] = []
        uploads: dict[str, tuple[str, str]] = {}
        for name in dict.fromkeys(names):
            upload = _parse_upload_name(name)
            if upload is not None:
                uploads[name] = upload
            elif _our_name(name) is None or name.endswith(".json"):
                raise UsageError(f"{name[:80]!r} is not the name of an orphaned backup object "
                                 "or incomplete upload")
            else:
                objects.append(name)
        result = DeleteResult()
        self._delete_orphan_objects(objects, result)
        self._abort_uploads(uploads, result)
        return result

    def _delete_orphan_objects(self, names: builtins.list[str], result: DeleteResult) -> None:
        """Delete leftover objects, except those of a backup committed since the listing."""
        if not names:
            return
        committed = {k.backup_id for k in self._scan() if k.name == f"{k.backup_id}.json"}
        todo = set()
        for name in names:
            if _our_name(name) in committed:
                result.failed[name] = "its backup has a manifest: not an orphan"
            else:
                todo.add(name)
        targets = [t for t in self._targets() if t[0] in todo]
        outcome = self._delete_targets(targets, by_name=True)
        for name in names:
            if name in todo:
                self._record(result, name, outcome.get(name))

    def _abort_uploads(self, wanted: dict[str, tuple[str, str]], result: DeleteResult) -> None:
        """Abort the uploads named {orphan name: (name, token)}, found again by listing: the
        name holds only the start of the upload id. One that is gone (completed or aborted
        since) counts as deleted, as a deleted object does; one whose token matches several
        uploads is left alone (some may be in flight)."""
        if not wanted:
            return
        try:
            current = self._uploads()
        except StorageError as exc:
            result.failed.update((orphan, str(exc)) for orphan in wanted)
            return
        for orphan, (name, token) in wanted.items():
            matches = [u for u in current if u.name == name and u.token == token]
            if len(matches) > 1:
                result.failed[orphan] = "several uploads match this name: none was aborted"
            elif not matches:
                self._record(result, orphan, None)  # gone since the listing: as if aborted
            else:
                self._record(result, orphan, self._abort(self.prefix + name,
                                                         matches[0].upload_id))

    def _abort(self, key: str, upload_id: str) -> str | None:
        """Abort one multipart upload; why it failed, or None (also when it is gone
        already)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            return None if _code(exc) == "NoSuchUpload" else self._reason(exc, key)
        except _BOTO_ERRORS as exc:
            return self._reason(exc, key)
        return None

    @staticmethod
    def _record(result: DeleteResult, owner: str, state: str | None) -> None:
        if state is None:
            result.deleted.append(owner)
        elif state == LOCKED:
            result.locked.append(owner)
        else:
            result.failed[owner] = state

    def _targets(self) -> builtins.list[_Target]:
        """(name, version id) of every object of ours: current objects only (version None),
        or every version and delete marker when Object Lock is configured."""
        if self.cfg.object_lock_days <= 0:
            return [(k.name, None) for k in self._scan()]
        targets: builtins.list[_Target] = []
        try:
            paginator = self.client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                           Delimiter="/"):
                entries = [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
                for entry in entries:
                    key = entry.get("Key", "")
                    name = key[len(self.prefix):]
                    if key.startswith(self.prefix) and _our_name(name) is not None:
                        targets.append((name, entry.get("VersionId")))
        except _BOTO_ERRORS as exc:
            raise self._error(f"cannot list object versions in bucket {self.bucket} prefix "
                              f"{self.prefix!r}", exc) from None
        return targets

    def _delete_targets(self, targets: builtins.list[_Target], by_name: bool) -> dict[str, str]:
        """Delete objects; returns {id (or name if by_name): LOCKED | error} for the owners of
        objects not deleted. LOCKED wins over an error for the same owner."""
        problems: dict[str, str] = {}
        for start in range(0, len(targets), MAX_DELETE_BATCH):
            for name, code, message in self._delete_batch(
                    targets[start:start + MAX_DELETE_BATCH]):
                owner = name if by_name else name[:ID_LEN]
                if _is_lock_error(code, message):
                    problems[owner] = LOCKED
                elif problems.get(owner) != LOCKED:
                    problems[owner] = self._scrub(": ".join(p for p in (name, code, message)
                                                            if p))
        return problems

    def _delete_batch(self, targets: builtins.list[_Target]) -> _Failures:
        """Delete up to 1000 objects; returns (name, code, message) of each failure."""
        if not targets:
            return []
        if not self._single_deletes:
            objects: builtins.list[ObjectIdentifierTypeDef] = []
            for name, version in targets:
                objects.append({"Key": self.prefix + name, "VersionId": version} if version
                               else {"Key": self.prefix + name})
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
            except ClientError as exc:
                if not _is_missing_md5(_code(exc), _message(exc)):
                    reason = self._reason(exc)
                    return [(name, "", reason) for name, _ in targets]
                log.warning("the S3 server rejected DeleteObjects without Content-MD5; "
                            "deleting objects one by one")
                self._single_deletes = True
            except _BOTO_ERRORS as exc:
                reason = self._reason(exc)
                return [(name, "", reason) for name, _ in targets]
            else:
                failures: _Failures = []
                for err in resp.get("Errors", []):
                    key = err.get("Key", "")
                    name = key[len(self.prefix):] if key.startswith(self.prefix) else key
                    failures.append((name, err.get("Code", ""), err.get("Message", "")))
                return failures
        failures = []
        for name, version in targets:
            try:
                if version:
                    self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name,
                                              VersionId=version)
                else:
                    self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
            except ClientError as exc:
                failures.append((name, _code(exc), _message(exc) or self._reason(exc)))
            except _BOTO_ERRORS as exc:
                failures.append((name, "", self._reason(exc)))
        return failures

    # -- checks ------------------------------------------------------------------------------

    def check_access(self) -> None:
        """HeadBucket plus a one-key listing under the prefix; StorageError says what is wrong
        (missing bucket, access denied, rejected credentials, unreachable endpoint)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except _BOTO_ERRORS as exc:
            raise self._error(f"cannot access bucket {self.bucket}", exc) from None
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except _BOTO_ERRORS as exc:
            raise self._error(f"cannot list bucket {self.bucket} prefix {self.prefix!r}",
                              exc) from None


# -- streaming upload ------------------------------------------------------------------------

STREAM_WORKERS = 3  # parts in flight while packing; each reads from the file, not from memory
PARTS_PER_SIZE = 1000  # the part size doubles every 1000 parts (the total size is not known)
READ_CAP = 64 * 1024  # per read() of a part's body, see _FileRange
MIN_RATE = MiB  # bytes/s: a part slower than this (beyond the client's timeouts) has failed


def stream_part_size(number: int) -> int:
    """The size of part `number` (from 1) of an upload of unknown total size: 8 MiB for the
    first 1000 parts, doubled every 1000 parts after, so that 10,000 parts hold about 8 TB
    (S3's largest object is 5 TB) and no part exceeds S3's 5 GiB."""
    return MIN_PART_SIZE << ((number - 1) // PARTS_PER_SIZE)


class _FileRange(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable request body, read with
    pread: botocore hashes, signs, sends and (on a retry) resends it without ever holding the
    part in memory, and without moving the file's offset under the writer. Reads return at
    most READ_CAP bytes (botocore asks for 1 MiB to hash): small blocks are reused by malloc,
    where 1 MiB ones stayed resident in every uploading thread's arena."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def read(self, size: int = -1, /) -> bytes:
        left = self._length - self._pos
        size = min(left if size is None or size < 0 else size, left, READ_CAP)
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._start + self._pos)
        if not data:
            raise OSError(f"the artifact ends before byte {self._start + self._pos}")
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


@dataclass
class _Part:
    number: int
    length: int
    future: Future[dict[str, Any] | None]


_OPEN: set[StreamingUpload] = set()  # streams whose multipart upload exists, not yet ended
_OPEN_LOCK = threading.Lock()


def abort_open_uploads(timeout: float) -> None:
    """Abort every multipart upload still open in this process, waiting `timeout` seconds at
    most: for a process about to exit without waiting for its backup (the shutdown grace
    expired). Else the upload stays incomplete, and billed, until `prune --orphans` or a
    lifecycle rule aborts it."""
    with _OPEN_LOCK:
        streams = list(_OPEN)
    if not streams:
        return
    def abort_each() -> None:
        for stream in streams:
            stream.abort_upload()

    aborting = threading.Thread(target=abort_each, name="s3-abort", daemon=True)
    aborting.start()
    aborting.join(timeout)
    if aborting.is_alive():
        log.warning("the incomplete multipart upload was not aborted within %.0f s; "
                    "`backupd prune --orphans` aborts it after a day", timeout)


class StreamingUpload:
    """A multipart upload fed from the artifact while pack() writes it (a pipeline.Follower).

    Each full part goes up from the file itself (os.pread on a dup of pack's descriptor) in
    a pool of STREAM_WORKERS threads: pack never waits for S3, and memory stays flat however
    far the upload lags. Nothing is committed before `finish`, which runs after the local
    manifest: the tail part, CompleteMultipartUpload, then the same checks and commit as
    `S3Storage.put`. If anything went wrong on the way (or the artifact is smaller than one
    part), `finish` aborts the multipart upload and falls back to `put` of the finished
    artifact, so that a failure ends exactly as an upload without streaming would.
    """

    def __init__(self, storage: S3Storage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._fd = -1
        self._key = ""
        self._backup_id = ""
        self._upload_id: str | None = None
        self._parts: builtins.list[_Part] = []
        self._offset = 0  # the end of the last part handed to the pool
        self._failure: StorageError | None = None  # the first thing that went wrong
        self._stopped = False  # failed, aborted or finished: no new part, no new upload

    # -- pipeline.Follower (never raises: a failed upload must not fail the local backup) ----

    def opened(self, fd: int, name: str) -> None:
        backup_id = _our_name(name)
        if backup_id is None or self._pool is not None:
            self._fail(StorageError(f"S3: cannot stream {name[:80]!r}: not a new artifact"))
            return
        try:
            self._fd = os.dup(fd)
        except OSError as exc:
            self._fail(StorageError(f"S3: cannot stream {name}: {exc.strerror}"))
            return
        self._key, self._backup_id = self._storage.prefix + name, backup_id
        self._pool = ThreadPoolExecutor(STREAM_WORKERS, thread_name_prefix="s3-part")

    def written(self, size: int) -> None:
        try:
            while not self._stopped and self._pool is not None:
                length = stream_part_size(len(self._parts) + 1)
                if size - self._offset < length:
                    break
                self._submit(length)
        except Exception as exc:  # e.g. the pool refuses work: stream no further
            self._fail(StorageError(f"S3: streaming stopped: {type(exc).__name__}"))

    def abandoned(self) -> None:
        self.abort()

    # -- the caller's side -------------------------------------------------------------------

    def finish(self, artifact: Path, manifest: Manifest) -> None:
        """Complete, check and commit the streamed upload of `artifact` (the finished file);
        falls back to `S3Storage.put` when the stream cannot be used. StorageError (or
        IntegrityError) as `put` raises them."""
        try:
            if self._complete(manifest):
                return
        except Exception as exc:  # whatever it was, the file upload below is today's path
            log.warning("streamed upload of backup %s failed (%s); uploading the finished "
                        "artifact instead", manifest.id, exc if isinstance(exc, BackupdError)
                        else type(exc).__name__)
        finally:
            self.abort()
        self._storage.put(artifact, manifest)

    def abort(self) -> None:
        """Stop streaming and abort the multipart upload if one is open (best effort: an
        incomplete upload is invisible; `prune --orphans` or a lifecycle rule aborts it
        later). Idempotent."""
        with self._lock:
            self._stopped = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            self._wait(self._parts)  # in-flight parts end within their requests' timeouts
        self.abort_upload()
        if self._fd >= 0 and all(p.future.done() for p in self._parts):
            os.close(self._fd)  # not while a stuck part may still read it: no reused number
            self._fd = -1

    def abort_upload(self) -> None:
        """Abort the multipart upload if one is open, without waiting for parts in flight
        (S3 drops those); also called from another thread by `abort_open_uploads`."""
        with self._lock:
            upload_id, self._upload_id = self._upload_id, None
            self._stopped = True
        self._ended()
        problem = None if upload_id is None else self._storage._abort(self._key, upload_id)
        if problem is not None:
            log.warning("could not abort the multipart upload of %s: %s", self._key, problem)

    # -- internals ---------------------------------------------------------------------------

    def _ended(self) -> None:
        with _OPEN_LOCK:
            _OPEN.discard(self)

    def _submit(self, length: int) -> None:
        assert self._pool is not None
        number, start = len(self._parts) + 1, self._offset
        future = self._pool.submit(self._upload_part, number, start, length)
        self._parts.append(_Part(number, length, future))
        self._offset += length

    def _fail(self, error: StorageError) -> None:
        with self._lock:
            self._stopped = True
            if self._failure is None:
                self._failure = error

    def _create(self) -> str:
        """The multipart upload's id, created by the first part to need it."""
        storage = self._storage
        with self._lock:
            if self._stopped:
                raise StorageError("S3: streaming stopped")
            if self._upload_id is None:
                extra = storage._object_args(self._backup_id)
                resp = storage.client.create_multipart_upload(
                    Bucket=storage.bucket, Key=self._key, **extra)
                self._upload_id = resp["UploadId"]
                with _OPEN_LOCK:
                    _OPEN.add(self)
            return self._upload_id

    def _upload_part(self, number: int, start: int, length: int) -> dict[str, Any] | None:
        """Upload one part; returns its entry for CompleteMultipartUpload, or None after a
        failure (recorded in `_failure`, which stops the stream)."""
        storage = self._storage
        action = f"streamed upload to bucket {storage.bucket} failed (part {number})"
        try:
            upload_id = self._create()
            algorithm = _CHECKSUMS[storage.cfg.checksum]
            body = _FileRange(self._fd, start, length)
            args: dict[str, Any] = {"Bucket": storage.bucket, "Key": self._key,
                                    "UploadId": upload_id, "PartNumber": number,
                                    "Body": body, "ContentLength": length}
            if algorithm:
                args["ChecksumAlgorithm"] = algorithm  # S3 checks every part
            resp = cast(dict[str, Any], storage.client.upload_part(**args))
            part = {"PartNumber": number, "ETag": resp["ETag"]}
        except StorageError as exc:
            self._fail(exc)
            return None
        except Exception as exc:  # botocore, OSError, a malformed answer: never escapes
            self._fail(storage._error(action, exc, self._key))
            return None
        checksum = resp.get(f"Checksum{algorithm}") if algorithm else None
        if checksum:  # S3 wants it back in CompleteMultipartUpload (some servers send none)
            part[f"Checksum{algorithm}"] = checksum
        return part

    def _wait(self, parts: builtins.list[_Part]) -> bool:
        """Wait for `parts`, at most as long as their requests may take; False on timeout."""
        cfg = self._storage.cfg
        per_request = cfg.max_attempts * (cfg.connect_timeout + cfg.read_timeout)
        pending = [p for p in parts if not p.future.done()]
        timeout = sum(per_request + p.length / MIN_RATE for p in pending)
        _done, not_done = wait([p.future for p in pending], timeout=timeout)
        return not not_done

    def _complete(self, manifest: Manifest) -> bool:
        """Upload the tail, complete and commit; False when nothing was streamed (a small
        artifact). StorageError when the stream failed or cannot be completed."""
        storage = self._storage
        if self._failure is not None:
            raise self._failure
        if self._pool is None or self._stopped:
            raise StorageError("S3: the streamed upload was not fed to the end")
        key = storage._artifact_key(manifest)
        size = manifest.stored_size
        if key != self._key or os.fstat(self._fd).st_size != size:
            raise StorageError(f"S3: the streamed file is not the artifact of {manifest.id}")
        self.written(size)  # every full part (written() has seen the final size already)
        if not self._parts:
            return False
        if size > self._offset:
            self._submit(size - self._offset)  # the tail: the last part may be smaller
        action = f"upload of backup {manifest.id} to bucket {storage.bucket} failed"
        if not self._wait(self._parts):
            raise StorageError(f"S3: {action}: the parts did not finish in time")
        parts = [p.future.result() for p in self._parts]
        if self._failure is not None:
            raise self._failure
        assert self._upload_id is not None and all(parts)
        try:
            storage.client.complete_multipart_upload(
                Bucket=storage.bucket, Key=key, UploadId=self._upload_id,
                MultipartUpload={"Parts": cast(Any, parts)})
        except _BOTO_ERRORS as exc:
            raise storage._error(action, exc, key) from None
        with self._lock:
            self._upload_id = None  # completed: nothing left to abort
        self._ended()
        storage._commit(key, size, manifest, action, single_part=False, streamed=True)
        log.debug("uploaded backup %s to s3 while packing (%d bytes, %d parts)", manifest.id,
                  size, len(parts))
        return True
