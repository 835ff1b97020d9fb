"""One full backup cycle, as `backupd backup` and each scheduled run do it.

Order matters: pending uploads first (an S3 outage must not pile up), then the new backup,
its upload, and only then retention, so that pruning never runs before the new backup is
complete and verified, and never on the bucket before the new backup is uploaded there.
The whole cycle holds the backup directory's lock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from backupd.actions.backup import backup_lock, run_backup
from backupd.actions.prune import Report, chains_for, policy_for, prune_location
from backupd.config import Config
from backupd.errors import UploadPending
from backupd.manifest import Manifest, now_utc
from backupd.replication import ReplicationStream
from backupd.storage.base import Storage
from backupd.storage.local import LocalStorage

log = structlog.get_logger("backupd.cycle")


@dataclass
class CycleResult:
    manifest: Manifest
    uploaded: bool = False
    pending_uploaded: list[str] = field(default_factory=list)
    prune_reports: list[Report] = field(default_factory=list)


def run_cycle(config: Config, *, trigger: str = "manual", tag: str = "", prune: bool = True,
              env: Mapping[str, str] | None = None,
              on_backup: Callable[[Manifest], None] | None = None,
              stream: ReplicationStream | None = None) -> CycleResult:
    """Back up now, upload, prune. Raises a BackupdError on failure (UploadPending when only
    the upload failed: the local backup exists then)."""
    local = LocalStorage(Path(config.backup.dir))
    with backup_lock(local.dir):
        from backupd.actions.restore.leftovers import report_interrupted

        report_interrupted(config)  # a killed restore is reported on every run until resolved
        # One listing under the lock serves the pending uploads, the leftovers and the next
        # id; prune lists again, after the backup and the uploads changed the directory.
        listing = local.listing()
        remote = None
        pending_uploaded: list[str] = []
        if config.s3.enabled:
            from backupd.actions.upload import upload_pending
            from backupd.storage.s3 import S3Storage

            remote = S3Storage(config.s3, env)
            pending_uploaded = upload_pending(local, remote, config.s3.keep_local,
                                              listing).uploaded
            if not config.s3.keep_local and pending_uploaded:  # their local copies are gone
                listing = dataclasses.replace(listing, manifests=[
                    m for m in listing.manifests if m.id not in pending_uploaded])
        # The upload starts while the artifact is being written; it is committed only in
        # upload(), after the local manifest, and aborted if the backup fails before that.
        # A cluster backup's shards are uploaded once all are committed (upload.upload).
        upload_stream = (remote.start_upload()
                         if remote is not None and not config.redis.cluster.enabled else None)
        try:
            manifest = run_backup(config, trigger=trigger, tag=tag, env=env,
                                  follower=upload_stream, listing=listing, stream=stream)
            result = CycleResult(manifest, pending_uploaded=pending_uploaded)
            if on_backup is not None:
                on_backup(manifest)
        except BaseException:
            if upload_stream is not None:
                upload_stream.abort()
            raise
        upload_error: UploadPending | None = None
        if remote is not None:
            from backupd.actions.upload import upload

            try:
                result.manifest = upload(local, remote, manifest, config.s3.keep_local,
                                         stream=upload_stream)
                result.uploaded = True
            except UploadPending as exc:
                upload_error = exc
        if prune:
            targets: list[Storage] = [local]
            if remote is not None and upload_error is None:
                targets.append(remote)
            result.prune_reports = [
                prune_location(storage, policy_for(config, storage.name), now=now_utc(),
                               chains=chains_for(config, storage))
                for storage in targets]
    if upload_error is not None:
        raise upload_error
    return result
