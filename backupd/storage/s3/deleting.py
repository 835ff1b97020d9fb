"""Deleting from S3: backups (manifest first), leftover objects and incomplete uploads.

Deletes go in DeleteObjects batches of 1000 keys, or one by one on a server that rejects
DeleteObjects without Content-MD5. With Object Lock configured (a versioned bucket), every version
is deleted by VersionId, so that retention is enforced and reported instead of hidden behind a
delete marker.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog
from botocore.exceptions import ClientError

from backupd import checkpoints
from backupd.errors import StorageError, UsageError
from backupd.storage import layout
from backupd.storage.base import DeleteResult
from backupd.storage.s3.errors import (
    BOTO_ERRORS,
    error_code,
    error_message,
    is_lock_error,
    is_missing_md5,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

    from backupd.storage.s3.storage import S3Storage

log = structlog.get_logger("backupd.storage.s3")

MAX_DELETE_BATCH = 1000  # DeleteObjects limit

_Failures = list[tuple[str, str, str]]  # (name, code, message)
_Target = tuple[str, str | None]  # (name relative to the prefix, version id)


class Kept(enum.Enum):
    """Why an object that was to be deleted is still there without a failure."""

    LOCKED = "locked"  # Object Lock retention or a legal hold


class Deleter:
    """The deletes of one S3Storage; remembers that its server wants single deletes."""

    def __init__(self, store: S3Storage) -> None:
        self._store = store
        self._single_deletes = False  # set after a server rejected DeleteObjects (Content-MD5)

    def delete(self, backup_ids: Iterable[str]) -> DeleteResult:
        """Delete backups: every manifest first (one batch per 1000 keys), then the artifacts
        and other keys of the ids whose manifest is gone, so an interrupted delete leaves
        orphans, never a manifest without its artifact. A missing backup counts as deleted.

        With `object_lock_days > 0` (a versioned bucket) every version of the backup's keys is
        deleted by VersionId, so that retention is enforced and reported (`locked`, and the
        backup stays complete and listed) instead of hidden behind a delete marker.
        Per-id outcomes go to the result; StorageError is raised only when the bucket cannot
        be listed (nothing was deleted then). UsageError for a non-id, before any deletion."""
        ids = list(dict.fromkeys(layout.check_id(i) for i in backup_ids))
        result = DeleteResult()
        if not ids:
            return result
        owned: dict[str, list[_Target]] = {i: [] for i in ids}
        for target in self._targets():
            backup_id = target[0][:layout.ID_LEN]
            if backup_id in owned:
                owned[backup_id].append(target)
        manifests = [t for i in ids for t in owned[i] if t[0] == layout.manifest_name(i)]
        outcome = self._delete_targets(manifests, by_name=False)
        checkpoints.reached("prune-s3")
        rest = [t for i in ids if i not in outcome
                for t in owned[i] if t[0] != layout.manifest_name(i)]
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
        objects: list[str] = []
        uploads: dict[str, tuple[str, str]] = {}
        names = list(dict.fromkeys(names))
        layout.check_no_manifest(names)
        for name in names:
            upload = layout.parse_upload_orphan_name(name)
            if upload is not None:
                uploads[name] = upload
            elif layout.owner(name) is None:
                raise UsageError(f"{name[:80]!r} is not the name of an orphaned backup object "
                                 "or incomplete upload")
            else:
                objects.append(name)
        result = DeleteResult()
        self._delete_orphan_objects(objects, result)
        self._abort_uploads(uploads, result)
        return result

    def _delete_orphan_objects(self, names: list[str], result: DeleteResult) -> None:
        """Delete leftover objects, except those of a backup committed since the listing."""
        if not names:
            return
        committed = {k.backup_id for k in self._store.scan()
                     if k.name == layout.manifest_name(k.backup_id)}
        todo = set()
        for name in names:
            if layout.owner(name) in committed:
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
            current = self._store.uploads()
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
                self._record(result, orphan, self._store.abort_multipart(
                    self._store.prefix + name, matches[0].upload_id))

    @staticmethod
    def _record(result: DeleteResult, owner: str, state: Kept | str | None) -> None:
        if state is None:
            result.deleted.append(owner)
        elif state is Kept.LOCKED:
            result.locked.append(owner)
        else:
            result.failed[owner] = state

    def _targets(self) -> list[_Target]:
        """(name, version id) of every object of ours: current objects only (version None),
        or every version and delete marker when Object Lock is configured."""
        if self._store.cfg.object_lock_days <= 0:
            return [(k.name, None) for k in self._store.scan()]
        return [(name, entry.get("VersionId")) for name, entry in self._store.ours(
            "list_object_versions", ("Versions", "DeleteMarkers"), "object versions in ")]

    def _delete_targets(self, targets: list[_Target], by_name: bool) -> dict[str, Kept | str]:
        """Delete objects; returns {id (or name if by_name): Kept.LOCKED | error} for the
        owners of objects not deleted. LOCKED wins over an error for the same owner."""
        problems: dict[str, Kept | str] = {}
        for start in range(0, len(targets), MAX_DELETE_BATCH):
            for name, code, message in self._delete_batch(
                    targets[start:start + MAX_DELETE_BATCH]):
                owner = name if by_name else name[:layout.ID_LEN]
                if is_lock_error(code, message):
                    problems[owner] = Kept.LOCKED
                elif problems.get(owner) is not Kept.LOCKED:
                    problems[owner] = self._store.reasons.scrub(
                        ": ".join(p for p in (name, code, message) if p))
        return problems

    def _delete_batch(self, targets: list[_Target]) -> _Failures:
        """Delete up to 1000 objects; returns (name, code, message) of each failure."""
        if not targets:
            return []
        client, bucket, prefix = self._store.client, self._store.bucket, self._store.prefix
        reasons = self._store.reasons
        if not self._single_deletes:
            objects: list[ObjectIdentifierTypeDef] = []
            for name, version in targets:
                objects.append({"Key": prefix + name, "VersionId": version} if version
                               else {"Key": prefix + name})
            try:
                resp = client.delete_objects(
                    Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            except ClientError as exc:
                if not is_missing_md5(error_code(exc), error_message(exc)):
                    reason = reasons.reason(exc)
                    return [(name, "", reason) for name, _ in targets]
                log.warning("s3_delete_objects_rejected", hint="the S3 server wants "
                            "Content-MD5 on DeleteObjects; deleting objects one by one")
                self._single_deletes = True
            except BOTO_ERRORS as exc:
                reason = reasons.reason(exc)
                return [(name, "", reason) for name, _ in targets]
            else:
                failures: _Failures = []
                for err in resp.get("Errors", []):
                    key = err.get("Key", "")
                    name = key[len(prefix):] if key.startswith(prefix) else key
                    failures.append((name, err.get("Code", ""), err.get("Message", "")))
                return failures
        failures = []
        for name, version in targets:
            try:
                if version:
                    client.delete_object(Bucket=bucket, Key=prefix + name, VersionId=version)
                else:
                    client.delete_object(Bucket=bucket, Key=prefix + name)
            except ClientError as exc:
                failures.append((name, error_code(exc),
                                 error_message(exc) or reasons.reason(exc)))
            except BOTO_ERRORS as exc:
                failures.append((name, "", reasons.reason(exc)))
        return failures
