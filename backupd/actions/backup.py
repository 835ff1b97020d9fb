"""`backupd backup`: snapshot, check, compress, encrypt, store and commit one backup."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import filelock
import redis
import structlog

from backupd import __version__, checkpoints, discovery, replication, source
from backupd import manifest as mf
from backupd.config import Config
from backupd.endpoint import Endpoint
from backupd.errors import BusyError, IntegrityError, StorageError, UsageError
from backupd.manifest import Manifest
from backupd.pipeline import Digester, Follower, PackResult, pack
from backupd.rdb import first_db_size
from backupd.rdb_keys import KeySampler
from backupd.storage.base import Listing
from backupd.storage.local import LocalStorage, ensure_dir
from backupd.streams import CHUNK, ObservedWriter, copy_stream

log = structlog.get_logger("backupd.backup")
LOCK_NAME = ".backupd.lock"
HEAD_BYTES = 1 << 20  # enough for the AUX fields and functions before the first database
MAX_TAG = 128


@contextlib.contextmanager
def backup_lock(directory: Path) -> Iterator[None]:
    """One writer per backup directory. flock: released by the kernel if the holder dies."""
    ensure_dir(directory)
    lock = filelock.FileLock(directory / LOCK_NAME, timeout=0, mode=0o600)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise BusyError(f"another backup is running (lock {directory / LOCK_NAME})") from None
    try:
        yield
    finally:
        lock.release()


def clean_leftovers(storage: LocalStorage, listing: Listing | None = None) -> None:
    """Remove temp files and artifacts without a manifest: crashed writes. Call under the lock
    (`listing`: the directory's, taken under it)."""
    orphans = (storage.listing() if listing is None else listing).orphans
    if orphans:
        result = storage.delete_orphans(o.name for o in orphans)
        log.info("leftovers_removed", files=result.deleted, failed=result.failed or None)


def next_id(now: datetime, latest: Manifest | None) -> tuple[str, datetime]:
    """A new id that sorts after every existing one, even when the clock went backwards."""
    moment = now.replace(microsecond=0)
    if latest is not None:
        floor = mf.id_time(latest.id) + timedelta(seconds=1)
        if moment < floor:
            log.warning("clock_behind_latest_backup", now=mf.format_time(now),
                        latest=latest.id, using=mf.format_time(floor))
            moment = floor
    return mf.new_id(moment), moment


def anomalies(keys: int, raw_size: int, previous: Manifest | None) -> list[str]:
    """Signs that Redis lost its data: a backup is kept anyway, but nobody should miss this."""
    warnings = []
    if keys == 0:
        warnings.append("the backup has 0 keys")
    if previous is not None and raw_size < previous.raw_size / 2:
        warnings.append(f"the backup is under half the size of the previous one "
                        f"({raw_size} vs {previous.raw_size} bytes, {previous.id})")
    return warnings


def count_keys(head: bytes, keyspace: dict[str, int]) -> tuple[dict[str, int], bool]:
    """Keys per database, exact where the RDB says so: its first database's RESIZEDB sizes
    are the counts at fork time; other databases keep the INFO keyspace counts."""
    size = first_db_size(head)
    if size is None:
        return keyspace, False
    if size.db < 0:
        return {}, True
    first = f"db{size.db}"
    per_db = {**keyspace, first: size.keys}
    return per_db, not any(count for db, count in keyspace.items() if db != first)


_BASE_NICENESS = os.getpriority(os.PRIO_PROCESS, 0)  # at start-up, before any backup


def yield_cpu(niceness: int) -> None:
    """Lower this thread's CPU priority (and that of the threads it starts: compression,
    upload) to `niceness` above backupd's own. On a busy machine Redis's save child then
    gets the CPU first: it is the one serial step of a backup (backupd reads its file while
    it writes), and Redis serving clients matters more than a backup finishing early.
    Per thread and idempotent: the daemon's job thread is lowered once, never twice."""
    target = min(19, _BASE_NICENESS + niceness)
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError as exc:  # not allowed (seccomp, exotic platform): keep going as we are
        log.warning("niceness_unchanged", error=str(exc))


def check_tag(tag: str) -> str:
    if len(tag) > MAX_TAG or not tag.isprintable():
        raise UsageError(f"--tag must be printable text of at most {MAX_TAG} characters")
    return tag


def run_backup(config: Config, *, trigger: str = "manual", tag: str = "",
               env: Mapping[str, str] | None = None,
               follower: Follower | None = None, listing: Listing | None = None,
               stream: replication.ReplicationStream | None = None) -> Manifest:
    """Take one backup into the local directory; returns its committed manifest.

    The caller holds `backup_lock` on the backup directory (`listing`: the directory's, taken
    under it; listed here when not given). `follower` reads the artifact while it is written
    (the S3 upload in parts). `stream`: a full sync already under way (the point-in-time
    link's), packed as the replication source's; it stays open."""
    if config.redis.cluster.enabled:  # one snapshot per shard, one manifest
        from backupd.actions.cluster_backup import run_cluster_backup

        return run_cluster_backup(config, trigger=trigger, tag=tag, env=env, listing=listing)
    started = time.monotonic()
    check_tag(tag)
    yield_cpu(config.backup.niceness)
    storage = LocalStorage(Path(config.backup.dir))
    listing = storage.listing() if listing is None else listing
    clean_leftovers(storage, listing)  # orphans only: the manifests stay as listed
    existing = listing.manifests
    previous = existing[0] if existing else None
    endpoint = discovery.resolve(config.redis, env)
    client = source.connect_endpoint(endpoint)
    try:
        repl_facts, replica_warnings = source.replication(client, endpoint)
        if config.redis.source == "replication" or stream is not None:
            taken = _from_replication(client, endpoint, storage, previous, config, follower,
                                      stream)
        else:
            taken = _from_volume(client, endpoint, storage, previous, config, follower)
    finally:
        client.close()
    backup_id, moment, name, packed = taken.id, taken.moment, taken.name, taken.packed
    encrypted = bool(config.backup.age_recipients)
    keys_per_db = taken.keys_per_db
    keys = sum(keys_per_db.values())
    manifest = Manifest(
        id=backup_id, created_at=mf.format_time(moment), trigger=trigger, tag=tag,
        redis=taken.server.facts, rdb_version=packed.rdb.version,
        rdb_checksum=packed.rdb.checksum, keys=keys, keys_per_db=keys_per_db,
        keys_exact=taken.keys_exact, key_sample=taken.key_sample, raw_size=packed.raw.size,
        raw_sha256=packed.raw.sha256, stored_size=packed.stored.size,
        stored_sha256=packed.stored.sha256, compression=config.backup.compression,
        encryption="age" if encrypted else "none", artifact=name,
        age_recipients=list(config.backup.age_recipients),
        duration_s=round(time.monotonic() - started, 3), backupd_version=__version__,
        warnings=replica_warnings + anomalies(keys, packed.raw.size, previous),
        upload="pending" if config.s3.enabled else "none",
        replication={**repl_facts, **taken.facts}, sentinel=endpoint.sentinel,
        source="replication" if stream is not None else config.redis.source,
    )
    check_stored(storage, manifest)
    checkpoints.reached("manifest")
    try:
        storage.write_manifest(manifest)
    except StorageError:
        # Not committed (e.g. ENOSPC): the artifact alone is no backup; do not leave it to
        # fill the disk until the next run. (A manifest that made it after all keeps it.)
        if not storage.manifest_path(manifest.id).exists():
            storage.artifact_path(manifest).unlink(missing_ok=True)
        raise
    checkpoints.reached("committed")
    for warning in manifest.warnings:
        log.warning("backup_anomaly", id=manifest.id, warning=warning)
    log.info("backup_done", id=manifest.id, keys=manifest.keys, raw_size=manifest.raw_size,
             stored_size=manifest.stored_size,
             ratio=round(manifest.raw_size / max(manifest.stored_size, 1), 2),
             duration_s=manifest.duration_s, rdb_checksum=manifest.rdb_checksum)
    return manifest


@dataclass(frozen=True)
class _Taken:
    """What a source gave: the packed artifact and the facts its manifest records."""

    id: str
    moment: datetime
    name: str
    packed: PackResult
    server: source.ServerInfo
    keys_per_db: dict[str, int]
    keys_exact: bool
    key_sample: list[str]
    facts: dict[str, Any] = field(default_factory=dict)  # the replication source's facts


def _from_volume(client: redis.Redis, endpoint: Endpoint, storage: LocalStorage,
                 previous: Manifest | None, config: Config, follower: Follower | None) -> _Taken:
    """BGSAVE, and pack() Redis's snapshot file while it is written (redis.source = volume)."""
    with source.follow_snapshot(client, endpoint.cfg, storage.dir) as snap:
        backup_id, moment = next_id(mf.now_utc(), previous)
        name = _artifact_name(backup_id, config)
        log.info("snapshot_started", id=backup_id, path=str(snap.path))
        checkpoints.reached("snapshot")
        packed, sample = _pack_snapshot(snap, storage.dir / name, config, follower)
        keys_per_db, keys_exact = count_keys(os.pread(snap.fileno(), HEAD_BYTES, 0),
                                             snap.server.keys_per_db)
    return _Taken(backup_id, moment, name, packed, snap.server, keys_per_db, keys_exact, sample)


def _from_replication(client: redis.Redis, endpoint: Endpoint, storage: LocalStorage,
                      previous: Manifest | None, config: Config,
                      follower: Follower | None,
                      given: replication.ReplicationStream | None = None) -> _Taken:
    """A full sync over the replication protocol, packed as it arrives (redis.source =
    replication): no data volume, no BGSAVE file. A failed stream is not retried here: the
    next run takes a new one."""
    with source.redis_errors(endpoint.cfg, True):
        server = source.server_info(client, endpoint.cfg)
        delay = replication.diskless_delay(client) if given is None else None
    if delay:
        log.info("replication_sync_delay", seconds=delay,
                 hint="the master waits repl-diskless-sync-delay before a diskless transfer; "
                      "CONFIG SET repl-diskless-sync-delay 0 if no replicas need to join")
    stream = given or replication.ReplicationStream(endpoint)
    try:
        backup_id, moment = next_id(mf.now_utc(), previous)
        name = _artifact_name(backup_id, config)
        log.info("snapshot_started", id=backup_id, source="replication", where=endpoint.where)
        checkpoints.reached("snapshot")
        sampler = KeySampler(int(db[2:]) for db in server.keys_per_db)
        packed = pack(_CheckpointReader(stream, config), storage.dir / name,
                      compression=config.backup.compression,
                      level=config.backup.compression_level,
                      recipients=config.backup.age_recipients, follower=follower,
                      observe=sampler)
    finally:
        if given is None:
            stream.close()
    keys_per_db, keys_exact = count_keys(stream.head, server.keys_per_db)
    return _Taken(backup_id, moment, name, packed, server, keys_per_db, keys_exact,
                  sample_of(sampler), stream.facts(server.persistence))


def sample_of(sampler: KeySampler) -> list[str]:
    """The manifest's key sample (rdb_keys): digests of the first keys of each db."""
    if sampler.stopped:
        log.info("key_sample_partial", keys=len(sampler.keys), why=sampler.stopped)
    return [f"{k.db}:{k.type}:{k.digest}" for k in sampler.keys]


def _artifact_name(backup_id: str, config: Config) -> str:
    return mf.artifact_name(backup_id, config.backup.compression,
                            bool(config.backup.age_recipients))


def _pack_snapshot(snap: source.LiveSnapshot, dest: Path, config: Config,
                   follower: Follower | None) -> tuple[PackResult, list[str]]:
    """pack() the snapshot while Redis writes it; once more from the finished dump file when
    the followed bytes were not the dump's after all (see source.LiveSnapshot). Also returns
    the manifest's key sample, read in the same pass."""
    while True:
        sampler = KeySampler(int(db[2:]) for db in snap.server.keys_per_db)
        try:
            packed = pack(_CheckpointReader(snap, config), dest,
                          compression=config.backup.compression,
                          level=config.backup.compression_level,
                          recipients=config.backup.age_recipients, follower=follower,
                          observe=sampler)
            return packed, sample_of(sampler)
        except (source.FollowLost, IntegrityError) as exc:
            if not snap.rewind():
                raise
            log.warning("snapshot_reread", path=str(snap.path), reason=str(exc) or
                        "the file read during the save is not the dump Redis kept")


class _CheckpointReader:
    """The snapshot, read through the crash-test stages when a test asked for them
    (backupd.checkpoints): copy after 1 MiB, compress after half, encrypt at the end."""

    def __init__(self, snap: source.LiveSnapshot | replication.ReplicationStream,
                 config: Config) -> None:
        self._snap = snap
        self._seen = 0
        self._reached: set[str] = set()
        self._compress = config.backup.compression != "none"
        self._encrypt = bool(config.backup.age_recipients)

    def read(self, size: int = -1, /) -> bytes:
        data = self._snap.read(size)
        if checkpoints.ACTIVE:
            self._seen += len(data)
            end, total = not data, self._snap.size
            self._mark("copy", end or self._seen >= CHUNK)
            self._mark("compress", self._compress and (
                end or (total is not None and self._seen > total // 2)))
            self._mark("encrypt", self._encrypt and end)
        return data

    def _mark(self, stage: str, due: bool) -> None:
        if due and stage not in self._reached:
            self._reached.add(stage)
            checkpoints.reached(stage)


def check_stored(storage: LocalStorage, manifest: Manifest) -> None:
    """Read the artifact back: what is on disk must be what was written."""
    counter = Digester()
    with storage.open_artifact(manifest) as fh:
        copy_stream(fh, ObservedWriter(None, counter))
    got = counter.digest()
    if (got.size, got.sha256) != (manifest.stored_size, manifest.stored_sha256):
        storage.artifact_path(manifest).unlink(missing_ok=True)
        raise IntegrityError(f"the artifact {manifest.artifact} read back differs from what "
                             "was written (disk or filesystem fault); it was removed")

