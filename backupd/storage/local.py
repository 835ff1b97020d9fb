"""Backups in a local directory: `<id>.rdb[.zst|.gz][.age]` plus `<id>.json` (the commit marker)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from backupd import checkpoints
from backupd import manifest as mf
from backupd.errors import BackupMissing, IntegrityError, StorageError
from backupd.fsio import atomic_file, write_all, write_atomic
from backupd.manifest import Manifest
from backupd.storage import layout
from backupd.storage.base import DeleteResult, Listing, Orphan
from backupd.streams import CHUNK


def ensure_dir(path: Path) -> None:
    """Create the backup directory 0700; tighten an existing one we own."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise StorageError(f"cannot use backup directory {path}: {exc.strerror}") from None


class LocalStorage:
    name = "local"

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def artifact_path(self, manifest: Manifest) -> Path:
        # parse() already pinned `artifact` to a name derived from the id; check again anyway,
        # since this becomes a path (a cluster shard's view names its shard's artifact).
        if not layout.is_artifact_name(manifest.artifact, manifest.id, manifest.compression,
                                       manifest.encrypted):
            raise IntegrityError(f"manifest {manifest.id}: artifact {manifest.artifact[:80]!r} "
                                 "is not a name of this backup")
        return self.dir / manifest.artifact

    def manifest_path(self, backup_id: str) -> Path:
        return self.dir / layout.manifest_name(backup_id)

    def listing(self) -> Listing:
        listing = Listing()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return listing
        except OSError as exc:
            raise StorageError(f"cannot list {self.dir}: {exc.strerror}") from None
        files = {entry.name: entry for entry in entries if entry.is_file(follow_symlinks=False)}

        def orphan(name: str) -> Orphan:
            stat = files[name].stat(follow_symlinks=False)
            return Orphan(name, datetime.fromtimestamp(stat.st_mtime, UTC), stat.st_size)

        return listing_of(files, self.read_manifest, orphan)

    def read_manifest(self, backup_id: str) -> Manifest:
        """Not through a symlink, nor a directory or a FIFO: the listing counts regular files
        only (O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever)."""
        path = self.manifest_path(backup_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise BackupMissing(f"backup {backup_id} does not exist in {self.dir}")
                data = fh.read(mf.MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR):
                raise BackupMissing(f"backup {backup_id} does not exist in {self.dir}") from None
            raise StorageError(f"cannot read {path}: {exc.strerror}") from None
        return mf.parse(data, expected_id=backup_id)

    def artifact_problem(self, manifest: Manifest) -> str | None:
        path = self.artifact_path(manifest)
        try:
            is_file = stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:
            is_file = False
        except OSError as exc:
            raise StorageError(f"cannot stat {path}: {exc.strerror}") from None
        return None if is_file else f"artifact {manifest.artifact} is missing"

    @contextlib.contextmanager
    def open_artifact(self, manifest: Manifest) -> Iterator[BinaryIO]:
        path = self.artifact_path(manifest)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}") from None
        with fh:
            yield fh

    def write_manifest(self, manifest: Manifest) -> None:
        try:
            write_atomic(self.manifest_path(manifest.id), manifest.to_json())
        except OSError as exc:
            raise StorageError(f"cannot write the manifest of {manifest.id}: "
                               f"{exc.strerror}") from None

    def put(self, artifact: Path, manifest: Manifest) -> None:
        """Copy an artifact in (atomically), then commit it with its manifest."""
        for part in manifest.parts():  # a cluster backup's shards lie beside `artifact`
            source, dest = artifact.with_name(part.artifact), self.artifact_path(part)
            if source.resolve() == dest.resolve():
                continue
            try:
                with open(source, "rb") as src, atomic_file(dest) as out:
                    while chunk := src.read(CHUNK):
                        write_all(out, chunk)
            except OSError as exc:
                raise StorageError(f"cannot store {dest}: {exc.strerror}") from None
        self.write_manifest(manifest)

    def delete(self, backup_ids: Iterable[str]) -> DeleteResult:
        """A backup that does not exist counts as deleted, as in every backend; UsageError for
        a non-id, before anything is deleted."""
        ids = list(dict.fromkeys(layout.check_id(i) for i in backup_ids))
        result = DeleteResult()
        for backup_id in ids:
            if not self.manifest_path(backup_id).exists():
                result.deleted.append(backup_id)
                continue
            try:
                manifest = self.read_manifest(backup_id)
                self.manifest_path(backup_id).unlink()  # first: the backup stops existing
                checkpoints.reached("prune")
                for part in manifest.parts():
                    self.artifact_path(part).unlink(missing_ok=True)
                result.deleted.append(backup_id)
            except (OSError, StorageError, IntegrityError) as exc:
                result.failed[backup_id] = str(getattr(exc, "strerror", None) or exc)
        return result

    def delete_orphans(self, names: Iterable[str]) -> DeleteResult:
        """Delete leftover files; a name not ours is reported as failed. A manifest is never an
        orphan: UsageError, before anything is deleted, as in every backend."""
        names = list(dict.fromkeys(names))
        layout.check_no_manifest(names)
        result = DeleteResult()
        for name in names:
            if not layout.is_ours_local(name) or "/" in name or "\0" in name:
                result.failed[name] = "not a backupd file name"
                continue
            try:
                (self.dir / name).unlink(missing_ok=True)
                result.deleted.append(name)
            except OSError as exc:
                result.failed[name] = exc.strerror or str(exc)
        return result


def listing_of(names: Iterable[str], read_manifest: Callable[[str], Manifest],
               orphan: Callable[[str], Orphan]) -> Listing:
    """The listing of a flat set of names, as a directory holds them: a manifest of ours with
    its artifact is a backup; one that cannot be read is broken, and so is one whose artifact
    is missing; any other name of ours is an orphan (`orphan` describes it)."""
    names = list(names)
    present = set(names)
    listing = Listing()
    claimed: set[str] = set()
    for name in sorted(names, reverse=True):
        backup_id = layout.manifest_id(name)
        if backup_id is None:
            continue
        claimed.add(name)
        try:
            manifest = read_manifest(backup_id)
        except (IntegrityError, StorageError) as exc:
            listing.broken[backup_id] = str(exc)
            # Not understood (damaged, or written by a newer backupd): its files are neither
            # a backup nor leftovers, so that nothing deletes what may be the only copy of that
            # backup (as S3Storage.listing does).
            claimed.update(n for n in names if n.startswith(backup_id + "."))
            continue
        artifacts = [part.artifact for part in manifest.parts()]
        missing = [name for name in artifacts if name not in present]
        if missing:
            listing.broken[backup_id] = f"artifact {missing[0]} is missing"
            claimed.update(artifacts)  # the shards that are there may be the only copy
            continue
        claimed.update(artifacts)
        listing.manifests.append(manifest)
    listing.orphans = [orphan(name) for name in names
                       if name not in claimed and layout.is_ours_local(name)]
    return listing
