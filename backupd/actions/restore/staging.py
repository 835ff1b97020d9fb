"""Steps 1 and 3: choose the backup, fetch and check it into a staging directory beside
Redis's files (same filesystem: the swap is a rename), owned like them."""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from backupd import checkpoints, source
from backupd import manifest as mf
from backupd.actions.catalog import Catalog, Entry, lookup, storages
from backupd.actions.restore.journal import STAGING_PREFIX
from backupd.actions.restore.target import AOF_MANIFEST_SUFFIX, Target, scan_dir
from backupd.codecs import load_identities
from backupd.config import Config
from backupd.errors import (
    IntegrityError,
    RestoreError,
    StorageError,
    UsageError,
)
from backupd.fsio import fsync_dir, write_atomic
from backupd.manifest import Manifest
from backupd.pipeline import UnpackResult, unpack
from backupd.rdb_keys import SampledKey, sample_file
from backupd.storage.base import Listing, Storage
from backupd.streams import CHUNK, ObservedReader

log = structlog.get_logger("backupd.restore")

PROGRESS_LOG_EVERY = 5.0


@dataclass(frozen=True)
class Selected:
    storage: Storage
    manifest: Manifest
    locations: tuple[str, ...]


def select_backup(config: Config, selector: str, before: datetime | None,
                  location: str | None, env: Mapping[str, str] | None = None) -> Selected:
    """`latest`, an id, or the newest at or before `before`; read from local when the backup
    is there, else from S3 (unless `location` says where). An id is read directly: no
    listing of every location and its multipart uploads."""
    if before is not None and selector != "latest":
        raise UsageError("give a backup ID or --before, not both")
    chosen = storages(config, location or "all", env)
    strict = location is not None or len(chosen) == 1
    if selector != "latest":
        entry = lookup(chosen, selector, None if strict else _skip_unavailable)
        storage = next(s for s in chosen if s.name in entry.locations)
        return Selected(storage, entry.manifest, tuple(entry.locations))
    found = _tolerant_catalog(chosen, strict=location is not None)
    if before is not None:
        candidates = [e for e in found.entries if e.manifest.created <= before]
        if not candidates:
            raise StorageError(f"there is no backup at or before {mf.format_time(before)}")
        entry = candidates[0]
    else:
        entry = found.find(selector)
    storage = next(s for s in chosen if s.name in entry.locations)
    return Selected(storage, entry.manifest, tuple(entry.locations))


def _skip_unavailable(storage: Storage, exc: StorageError) -> None:
    log.warning("location_unavailable", location=storage.name, error=str(exc))


def _tolerant_catalog(chosen: Sequence[Storage], strict: bool) -> Catalog:
    """Like catalog.catalog(), but an unreachable S3 does not block a restore from local."""
    merged: dict[str, Entry] = {}
    listings: dict[str, Listing] = {}
    for storage in chosen:
        try:
            listing = storage.listing()
        except StorageError as exc:
            if strict or len(chosen) == 1:
                raise
            _skip_unavailable(storage, exc)
            continue
        listings[storage.name] = listing
        for manifest in listing.manifests:
            merged.setdefault(manifest.id, Entry(manifest)).locations.append(storage.name)
    entries = sorted(merged.values(), key=lambda e: e.manifest.id, reverse=True)
    return Catalog(entries, listings)


def identities_for(manifest: Manifest, identity_file: str | None) -> list[Any]:
    if not manifest.encrypted:
        return []
    if not identity_file:
        raise UsageError(f"backup {manifest.id} is encrypted: give --identity-file with the "
                         "age identity (AGE-SECRET-KEY-1...) of one of its recipients")
    return load_identities(identity_file)


# -- steps 1 and 3: staging -----------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    file_mode: int
    dir_mode: int
    source: str


def data_owner(data_dir: Path, target: Target) -> Owner:
    """Owner and modes for the new files, copied from Redis's existing files: a root-owned
    AOF directory makes a non-root Redis load the data and then exit (notes, section 3)."""
    aof_dir = data_dir / target.aof_dir
    files = [data_dir / target.dbfilename, *(p for p in scan_dir(aof_dir) if p.is_file())]
    dir_st = _stat(aof_dir)
    for path in files:
        st = _stat(path)
        if st is not None and stat.S_ISREG(st.st_mode):
            file_mode = stat.S_IMODE(st.st_mode)
            dir_mode = stat.S_IMODE(dir_st.st_mode) if dir_st else _dir_mode(file_mode)
            return Owner(st.st_uid, st.st_gid, file_mode, dir_mode, str(path))
    st = _stat(data_dir)
    if st is None:
        raise RestoreError(f"redis.data_dir {data_dir} does not exist")
    return Owner(st.st_uid, st.st_gid, 0o600, 0o700, f"{data_dir} (no data files yet)")


def _dir_mode(file_mode: int) -> int:
    """Add x wherever r is set: 0600 -> 0700, 0644 -> 0755."""
    return file_mode | ((file_mode & 0o444) >> 2)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def check_owner_possible(owner: Owner) -> None:
    if os.geteuid() != 0 and owner.uid != os.geteuid():
        raise RestoreError(f"Redis's files are owned by uid {owner.uid} ({owner.source}); "
                           f"backupd runs as uid {os.geteuid()} and cannot give the restored "
                           "files that owner: run the restore as root or as that uid")


@dataclass(frozen=True)
class Staged:
    dir: Path
    entries: list[str]
    rdb_version: int
    aof_base: str
    sample: list[SampledKey]


class _Meter:
    """Bytes-read observer: a rich bar on a terminal, else a log line every few seconds."""

    def __init__(self, total: int, label: str, bar: bool) -> None:
        self.total = max(total, 1)
        self.label = label
        self.bar = bar
        self.done = 0
        self._last_log = time.monotonic()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Meter:
        if self.bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True),
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def __call__(self, data: bytes) -> None:
        self.done += len(data)
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
        elif time.monotonic() - self._last_log >= PROGRESS_LOG_EVERY:
            self._last_log = time.monotonic()
            log.info("restore_progress", what=self.label, bytes=self.done, total=self.total,
                     percent=round(100 * self.done / self.total, 1))

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def fetch_and_check(selected: Selected, sink: Any, identities: Sequence[Any],
                    bar: bool) -> UnpackResult:
    """Stream the artifact through SHA-256, decryption, decompression and the RDB check into
    `sink` (or nowhere), and compare everything with the manifest."""
    m = selected.manifest
    if m.cluster is not None:
        raise UsageError(f"backup {m.id} is a cluster backup ({len(m.cluster.shards)} shards): "
                         "restore it into a cluster ([redis.cluster] seeds, see README "
                         "\"Redis Cluster\"); nothing was changed")
    with _Meter(m.stored_size, f"download+verify {m.id} [{selected.storage.name}]", bar) as meter, \
            selected.storage.open_artifact(m) as stored:
        marks = checkpoints.ByteMarks([(CHUNK, "restore-fetch")])
        result = unpack(ObservedReader(stored, meter, marks), sink, compression=m.compression,
                        encrypted=m.encrypted, identities=identities, trust_recorded=True)
    problems = []
    if (result.stored.size, result.stored.sha256) != (m.stored_size, m.stored_sha256):
        problems.append("the stored artifact's SHA-256/size differ from the manifest")
    if (result.raw.size, result.raw.sha256) != (m.raw_size, m.raw_sha256):
        problems.append("the RDB's SHA-256/size differ from the manifest")
    if m.rdb_version and result.rdb.version != m.rdb_version:
        problems.append(f"the RDB is version {result.rdb.version}, the manifest says "
                        f"{m.rdb_version}")
    if problems:
        raise IntegrityError(f"backup {m.id} [{selected.storage.name}] is corrupt: "
                             + "; ".join(problems))
    return result


def stage(selected: Selected, target: Target, data_dir: Path, identities: Sequence[Any],
          owner: Owner, bar: bool) -> Staged:
    """Steps 1 and 3: the complete new files, fsynced, in a hidden dir beside Redis's own.

    Every check of `verify` runs on the way, the SHA-256 of the RDB included: it is the only
    thing that notices a manifest whose raw_sha256 is damaged while the artifact is intact
    (tests/faults/test_corrupt.py), so it cannot be left out even though the stored SHA-256
    and the RDB's CRC64 already cover the data itself."""
    staging = data_dir / f"{STAGING_PREFIX}{selected.manifest.id}"
    remove_tree(staging)
    try:
        staging.mkdir(mode=0o700)
        rdb_path = staging / target.dbfilename
        fd = os.open(rdb_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        # Unbuffered: unpack writes pieces of pipeline.WRITE_SIZE (128 KiB), which cost the
        # kernel far less than the 1 MiB writes a buffered file would turn them into.
        with open(fd, "wb", buffering=0) as fh:
            result = fetch_and_check(selected, fh, identities, bar)
            os.fsync(fh.fileno())
        _own(rdb_path, owner, owner.file_mode)
        sample = sample_keys(rdb_path, selected.manifest)
        base = _stage_aof(staging, target, rdb_path, owner)
        fsync_dir(staging)
    except BaseException:
        remove_tree(staging)
        raise
    log.info("restore_step", step=1, what="staged and verified", dir=str(staging),
             rdb_version=result.rdb.version, rdb_crc=result.rdb.checksum, aof_base=base)
    return Staged(staging, target.entries, result.rdb.version, base, sample)


def sample_keys(rdb_path: Path, manifest: Manifest) -> list[SampledKey]:
    """The key sample, read from the staged (verified) RDB: the manifest records only the
    names' digests. Keys the manifest lists and the file does not give mean another reader
    version: the file decides (its SHA-256 was checked), with a note."""
    with open(rdb_path, "rb") as fh:
        sampler = sample_file(fh, (int(db[2:]) for db in manifest.keys_per_db))
    found = {f"{k.db}:{k.type}:{k.digest}" for k in sampler.keys}
    if manifest.key_sample and not set(manifest.key_sample) <= found:
        log.warning("key_sample_differs", manifest=len(manifest.key_sample), file=len(found))
    return sampler.keys


def snapshot_aof(pre_dir: Path, target: Target, data_dir: Path, owner: Owner) -> bool:
    """The running Redis has AOF off, but its AOF dir is there and a restart with appendonly
    yes (the config file) loads it, not the fresh safety snapshot: give the pre-restore copy
    an AOF dir whose base is the snapshot, so a rollback brings back what Redis held."""
    if target.aof or not (data_dir / target.aof_dir).is_dir():
        return False
    _stage_aof(pre_dir, target, data_dir / target.dbfilename, owner)
    fsync_dir(pre_dir)
    log.info("restore_step", step=4, what="pre-restore AOF dir built from the snapshot",
             dir=str(pre_dir / target.aof_dir))
    return True


def _stage_aof(staging: Path, target: Target, rdb_path: Path, owner: Owner) -> str:
    """A fresh multi-part AOF dir whose base is the backup (notes, section 3); Redis creates
    the incr file itself. A copy, not a hard link: an in-place write to dump.rdb (cp) must not
    change the AOF base."""
    aof_dir = staging / target.aof_dir
    aof_dir.mkdir(mode=0o700)
    base = f"{target.aof_file}.1.base.rdb"
    shutil.copyfile(rdb_path, aof_dir / base)
    _fsync_file(aof_dir / base)
    manifest_path = aof_dir / f"{target.aof_file}{AOF_MANIFEST_SUFFIX}"
    write_atomic(manifest_path, f"file {base} seq 1 type b\n".encode(), owner.file_mode)
    for path in (aof_dir / base, manifest_path):
        _own(path, owner, owner.file_mode)
    _own(aof_dir, owner, owner.dir_mode)
    fsync_dir(aof_dir)
    return base


def _own(path: Path, owner: Owner, mode: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, owner.uid, owner.gid)
    os.chmod(path, mode)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def check_space(data_dir: Path, manifest: Manifest, target: Target, snapshot: bool) -> int:
    """Staging needs the RDB twice (dump file and AOF base); a safety BGSAVE needs about one
    more RDB."""
    needed = manifest.raw_size * 2
    if snapshot:  # and its copy as an AOF base, when an AOF dir is there (snapshot_aof)
        copies = 2 if (data_dir / target.aof_dir).is_dir() else 1
        needed += copies * _size_or(data_dir / target.dbfilename, target.used_memory)
    source.check_space(data_dir, needed, f"staging backup {manifest.id}")
    return needed


def _size_or(path: Path, fallback: int) -> int:
    st = _stat(path)
    return st.st_size if st is not None else fallback
