"""The streaming upload: a multipart upload fed from the artifact while pack() writes it, and
the registry of uploads still open in this process (for an exit that cannot wait for them).
Also the part sizes of both uploads: S3 allows 10,000 parts of at most 5 GiB."""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from backupd.choices import Checksum
from backupd.errors import BackupdError, StorageError
from backupd.manifest import Manifest
from backupd.storage import layout
from backupd.storage.s3.errors import BOTO_ERRORS
from backupd.streams import RawReader

if TYPE_CHECKING:
    from backupd.storage.s3.storage import S3Storage

log = structlog.get_logger("backupd.storage.s3")

MiB = 1024 * 1024
MIN_PART_SIZE = 8 * MiB
MAX_PARTS_TARGET = 9000  # S3 allows 10,000 parts; keep a margin
CHECKSUMS: dict[str, str] = {Checksum.SHA256: "SHA256", Checksum.CRC32: "CRC32",
                             Checksum.NONE: ""}  # config -> S3's name


def part_size(size: int) -> int:
    """Multipart chunk size for a file of `size` bytes: at least 8 MiB, and large enough that
    the upload needs at most 9,000 parts (S3's limit is 10,000)."""
    return max(MIN_PART_SIZE, -(-max(size, 0) // MAX_PARTS_TARGET))


STREAM_WORKERS = 3  # parts in flight while packing; each reads from the file, not from memory
PARTS_PER_SIZE = 1000  # the part size doubles every 1000 parts (the total size is not known)
READ_CAP = 64 * 1024  # per read() of a part's body, see FileRange
MIN_RATE = MiB  # bytes/s: a part slower than this (beyond the client's timeouts) has failed


def stream_part_size(number: int) -> int:
    """The size of part `number` (from 1) of an upload of unknown total size: 8 MiB for the
    first 1000 parts, doubled every 1000 parts after, so that 10,000 parts hold about 8 TB
    (S3's largest object is 5 TB) and no part exceeds S3's 5 GiB."""
    return MIN_PART_SIZE << ((number - 1) // PARTS_PER_SIZE)


class FileRange(RawReader):
    """Bytes [start, start + length) of an open file as a seekable request body, read with
    pread: botocore hashes, signs, sends and (on a retry) resends it without ever holding the
    part in memory, and without moving the file's offset under the writer. Reads return at
    most READ_CAP bytes (botocore asks for 1 MiB to hash): small blocks are reused by malloc,
    where 1 MiB ones stayed resident in every uploading thread's arena."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

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
        log.warning("s3_upload_not_aborted", timeout_s=timeout,
                    hint="`backupd prune --orphans` aborts it after a day")


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
        self._parts: list[_Part] = []
        self._offset = 0  # the end of the last part handed to the pool
        self._failure: StorageError | None = None  # the first thing that went wrong
        self._stopped = False  # failed, aborted or finished: no new part, no new upload

    # -- pipeline.Follower (never raises: a failed upload must not fail the local backup) ----

    def opened(self, fd: int, name: str) -> None:
        backup_id = layout.owner(name)
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
            log.warning("s3_stream_failed", id=manifest.id,
                        error=str(exc) if isinstance(exc, BackupdError) else type(exc).__name__,
                        hint="streamed upload of backup failed; uploading the finished "
                        "artifact instead")
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
        problem = None if upload_id is None else self._storage.abort_multipart(self._key, upload_id)
        if problem is not None:
            log.warning("s3_abort_failed", key=self._key, error=problem)

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
                extra = storage.object_args(self._backup_id)
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
            algorithm = CHECKSUMS[storage.cfg.checksum]
            body = FileRange(self._fd, start, length)
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
            self._fail(storage.reasons.error(action, exc, self._key))
            return None
        checksum = resp.get(f"Checksum{algorithm}") if algorithm else None
        if checksum:  # S3 wants it back in CompleteMultipartUpload (some servers send none)
            part[f"Checksum{algorithm}"] = checksum
        return part

    def _wait(self, parts: list[_Part]) -> bool:
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
        key = storage.artifact_key(manifest)
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
        except BOTO_ERRORS as exc:
            raise storage.reasons.error(action, exc, key) from None
        with self._lock:
            self._upload_id = None  # completed: nothing left to abort
        self._ended()
        storage.commit(key, size, manifest, action, single_part=False, streamed=True)
        log.debug("s3_uploaded", id=manifest.id, size=size, parts=len(parts), streamed=True)
        return True
