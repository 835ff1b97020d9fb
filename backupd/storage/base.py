"""The storage interface every backend (local directory, S3 bucket) implements.

A backup is an artifact plus its manifest; the manifest is written last and is the commit
marker. Backends only ever see names that match backupd's id format (storage/layout.py):
anything else in the directory or under the prefix is not ours and is never listed, opened or
deleted.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:  # annotations only: backupd.manifest imports the storage layout
    from backupd.manifest import Manifest


@dataclass(frozen=True)
class Orphan:
    """An artifact or temp file of ours with no manifest, or (S3) an incomplete multipart
    upload of ours: a crashed or interrupted write. `modified` is when an upload started;
    `size` is 0 for an upload (its parts are not listed)."""

    name: str
    modified: datetime
    size: int


@dataclass
class Listing:
    """What a backend holds. `complete` is False when the listing may have missed objects,
    in which case nothing may be deleted on the strength of it."""

    manifests: list[Manifest] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # id -> why its manifest is unusable
    complete: bool = True


@dataclass
class DeleteResult:
    deleted: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)  # kept by Object Lock: not a failure
    failed: dict[str, str] = field(default_factory=dict)  # id -> error message


class Storage(Protocol):
    name: str  # "local" or "s3": the location shown to users

    def listing(self) -> Listing:
        """All complete backups, newest first, plus orphans; never raises for one bad file."""
        ...

    def read_manifest(self, backup_id: str) -> Manifest:
        """One manifest; IntegrityError if it is unreadable, BackupMissing if it is absent,
        StorageError if the location cannot be read."""
        ...

    def artifact_problem(self, manifest: Manifest) -> str | None:
        """Why the stored artifact cannot back `manifest` (missing; on S3, of another size),
        in the words of `Listing.broken`; None when it is there. A backup read by id, without a
        listing, is checked with this so that it is corrupt in the same cases."""
        ...

    def open_artifact(self, manifest: Manifest) -> AbstractContextManager[BinaryIO]:
        """A streaming reader of the stored artifact bytes."""
        ...

    def put(self, artifact: Path, manifest: Manifest) -> None:
        """Store the artifact, check it arrived intact, then write the manifest (commit)."""
        ...

    def delete(self, backup_ids: Iterable[str]) -> DeleteResult:
        """Delete backups (manifest first, so a half-deleted backup is an orphan, not a backup)."""
        ...

    def delete_orphans(self, names: Iterable[str]) -> DeleteResult:
        """Delete (or abort) leftovers, named as in `Listing.orphans`."""
        ...
