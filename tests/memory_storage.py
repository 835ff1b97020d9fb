"""MemoryStorage: the Storage protocol over a dict, with faults a test can inject.

b2sdk's raw simulator, for backupd: the storage contract (tests/storage_contract.py) holds it to
what LocalStorage and S3Storage do, so that tests of what sits above a storage (retention's
rails, pending uploads, choosing a backup) run in milliseconds, and can make a listing fail,
come back incomplete, or a delete be refused, which a real backend does only by accident.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from backupd import manifest as mf
from backupd.errors import BackupMissing, IntegrityError, StorageError
from backupd.manifest import Manifest
from backupd.storage import layout
from backupd.storage.base import DeleteResult, Listing, Orphan
from backupd.storage.local import listing_of


@dataclass
class Faults:
    """What goes wrong, by operation. Every field is consulted on each call."""

    listing: StorageError | None = None  # listing() raises it
    incomplete: bool = False  # listing() may have missed objects
    unreadable: set[str] = field(default_factory=set)  # ids whose manifest cannot be read
    put: dict[str, StorageError] = field(default_factory=dict)  # id -> put() raises it
    delete: dict[str, str] = field(default_factory=dict)  # id or name -> why it stays
    locked: set[str] = field(default_factory=set)  # ids kept by Object Lock


@dataclass
class _Object:
    data: bytes
    modified: datetime


class MemoryStorage:
    """Objects by name, as LocalStorage keeps files: `<id>.json` commits `<id>.rdb...`."""

    bucket = "memory"  # named in the log lines of uploads, as S3Storage's bucket is

    def __init__(self, name: str = "memory", now: datetime | None = None) -> None:
        self.name = name
        self.objects: dict[str, _Object] = {}
        self.faults = Faults()
        self.calls: list[str] = []  # operations in order, for tests of what ran when
        self._now = now or datetime.now(UTC)

    # -- for tests ---------------------------------------------------------------------------

    def place(self, name: str, data: bytes, modified: datetime | None = None) -> None:
        """Store an object as-is (a leftover, a damaged manifest, something not ours)."""
        self.objects[name] = _Object(data, modified or self._now)

    # -- Storage -----------------------------------------------------------------------------

    def listing(self) -> Listing:
        self.calls.append("listing")
        if self.faults.listing is not None:
            raise self.faults.listing
        listing = listing_of(sorted(self.objects), self._manifest, lambda name: Orphan(
            name, self.objects[name].modified, len(self.objects[name].data)))
        # As S3Storage: a manifest that could not be read (not a bad file) may hide a backup.
        listing.complete = not self.faults.incomplete and not (
            self.faults.unreadable & set(listing.broken))
        return listing

    def read_manifest(self, backup_id: str) -> Manifest:
        self.calls.append(f"read_manifest {backup_id}")
        return self._manifest(backup_id)

    def _manifest(self, backup_id: str) -> Manifest:
        name = layout.manifest_name(backup_id)
        if backup_id in self.faults.unreadable:
            raise StorageError(f"cannot read the manifest of backup {backup_id}")
        obj = self.objects.get(name)
        if obj is None:
            raise BackupMissing(f"backup {backup_id} does not exist in memory")
        return mf.parse(obj.data, expected_id=backup_id)

    def artifact_problem(self, manifest: Manifest) -> str | None:
        self.calls.append(f"artifact_problem {manifest.id}")
        if manifest.artifact in self.objects:
            return None
        return f"artifact {manifest.artifact} is missing"

    @contextlib.contextmanager
    def open_artifact(self, manifest: Manifest) -> Iterator[BinaryIO]:
        obj = self.objects.get(manifest.artifact)
        if obj is None:
            raise StorageError(f"cannot open {manifest.artifact}: it does not exist")
        yield io.BytesIO(obj.data)

    def put(self, artifact: Path, manifest: Manifest) -> None:
        self.calls.append(f"put {manifest.id}")
        if manifest.id in self.faults.put:
            raise self.faults.put[manifest.id]
        data = artifact.read_bytes()
        if len(data) != manifest.stored_size:
            raise IntegrityError(f"{artifact} is {len(data)} bytes, the manifest of backup "
                                 f"{manifest.id} says {manifest.stored_size}")
        self.place(manifest.artifact, data)
        self.place(layout.manifest_name(manifest.id), manifest.to_json())  # the commit

    def delete(self, backup_ids: Iterable[str]) -> DeleteResult:
        ids = list(dict.fromkeys(layout.check_id(i) for i in backup_ids))
        result = DeleteResult()
        for backup_id in ids:
            self.calls.append(f"delete {backup_id}")
            if backup_id in self.faults.locked:
                result.locked.append(backup_id)
            elif backup_id in self.faults.delete:
                result.failed[backup_id] = self.faults.delete[backup_id]
            elif layout.manifest_name(backup_id) not in self.objects:
                result.deleted.append(backup_id)  # gone already, as in every backend
            else:
                try:
                    manifest = self._manifest(backup_id)
                except (StorageError, IntegrityError) as exc:
                    result.failed[backup_id] = str(exc)
                    continue
                del self.objects[layout.manifest_name(backup_id)]  # first, as the others do
                self.objects.pop(manifest.artifact, None)
                result.deleted.append(backup_id)
        return result

    def delete_orphans(self, names: Iterable[str]) -> DeleteResult:
        names = list(dict.fromkeys(names))
        layout.check_no_manifest(names)
        result = DeleteResult()
        for name in names:
            self.calls.append(f"delete orphan {name}")
            if not layout.is_ours_local(name) or "/" in name:
                result.failed[name] = "not a backupd file name"
            elif name in self.faults.delete:
                result.failed[name] = self.faults.delete[name]
            else:
                self.objects.pop(name, None)
                result.deleted.append(name)
        return result
