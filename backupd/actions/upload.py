"""Offsite copies: upload a committed local backup to S3, and catch up on pending uploads.

A backup whose upload failed stays local with `"upload": "pending"` in its manifest; local
retention never deletes it, and the next run uploads it before taking a new backup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from backupd import checkpoints
from backupd.errors import StorageError, UploadPending
from backupd.manifest import Manifest
from backupd.storage.base import Listing
from backupd.storage.local import LocalStorage
from backupd.storage.s3 import S3Storage, StreamingUpload

log = structlog.get_logger("backupd.upload")
PENDING = "pending"
DONE = "done"


def upload(local: LocalStorage, remote: S3Storage, manifest: Manifest,
           keep_local: bool = True, stream: StreamingUpload | None = None) -> Manifest:
    """Upload one backup; the local manifest says `done` only after the remote copy is verified.

    `stream` is the upload that was fed while the artifact was written: it is completed
    (or, if it failed, replaced by an upload of the local file) and closed in any case."""
    done = manifest.with_upload(DONE)
    try:
        if stream is not None:
            stream.finish(local.artifact_path(manifest), done)
        else:
            remote.put(local.artifact_path(manifest), done)
    except StorageError as exc:
        raise UploadPending(f"upload of {manifest.id} failed: {exc}. The local copy is safe and "
                            "marked pending; the next run (or `backupd upload --pending`) "
                            "uploads it") from None
    checkpoints.reached("uploaded")
    local.write_manifest(done)
    log.info("upload_done", id=manifest.id, bucket=remote.bucket, size=manifest.stored_size)
    if not keep_local:
        result = local.delete([manifest.id])
        if result.failed:
            log.warning("local_copy_not_removed", id=manifest.id, error=result.failed)
    return done


@dataclass
class PendingResult:
    uploaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def pending(local: LocalStorage, listing: Listing | None = None) -> list[Manifest]:
    """The local backups not yet uploaded (from `listing` when the caller has one)."""
    return [m for m in (local.listing() if listing is None else listing).manifests
            if m.upload == PENDING]


def upload_pending(local: LocalStorage, remote: S3Storage, keep_local: bool = True,
                   listing: Listing | None = None) -> PendingResult:
    """Upload every pending backup, oldest first; one failure does not stop the others."""
    result = PendingResult()
    for manifest in reversed(pending(local, listing)):
        try:
            upload(local, remote, manifest, keep_local)
            result.uploaded.append(manifest.id)
        except UploadPending as exc:
            result.failed[manifest.id] = str(exc)
            log.warning("pending_upload_failed", id=manifest.id, error=str(exc))
    return result
