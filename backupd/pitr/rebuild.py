"""`restore --to-time T`: the data at T, from a base backup and the segments after it.

The newest chain whose window holds T (windows.py) gives the base and the segments up to the
first stamp >= T; each is read and checked (size, SHA-256) before anything else happens.
They become a Redis 7 multi-part AOF directory: base = the backup's RDB, incr = the segments
cut at that stamp (a stamp is never inside MULTI/EXEC), and its manifest. A throwaway
redis-server loads it (`appendonly yes`: proof that it loads, and the key counts) and SAVEs
the result; that RDB is packed into a temporary backup with a manifest of its own, which the
usual restore then puts in place (safety copy, rollback, post-start checks, every method).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import structlog

from backupd import __version__
from backupd import manifest as mf
from backupd.actions.catalog import storages
from backupd.actions.restore.options import Options, Ui
from backupd.actions.restore.staging import Selected, fetch_and_check, identities_for
from backupd.config import Config
from backupd.controllers.throwaway import AOF_NAME, throwaway_server
from backupd.errors import IntegrityError, RestoreError, StorageError
from backupd.fsio import atomic_file, write_all
from backupd.manifest import Manifest
from backupd.pipeline import pack
from backupd.pitr import windows
from backupd.pitr.segments import OPEN, SegmentMeta
from backupd.pitr.store import SegmentListing, SegmentStore, covers, stores
from backupd.rdb_keys import KeySampler
from backupd.storage.base import Storage
from backupd.storage.local import LocalStorage
from backupd.streams import CHUNK

log = structlog.get_logger("backupd.pitr")

AOF_DIR = "appendonlydir"


@dataclass(frozen=True)
class Plan:
    chain: windows.Chain
    segments: list[SegmentMeta]
    moment: int  # commands that reached backupd before this second are in
    cut: int  # the position in the last segment where the data ends
    last_offset: int
    last_stamp: int  # the newest stamp included

    def text(self) -> list[str]:
        base = self.chain.base
        first, last = self.segments[0], self.segments[-1]
        return [
            "Point-in-time plan",
            f"  to       {_t(self.moment)}: every command that reached backupd before it",
            f"  base     {base.id} (created {base.created_at}, offset "
            f"{self.chain.base_offset}, replid {self.chain.replid})",
            f"  segments {len(self.segments)}: {first.stem} .. {last.stem}, offsets "
            f"{first.first_offset}..{self.last_offset}",
            f"  included up to stamp #TS:{self.last_stamp} ({_t(self.last_stamp)}), "
            f"last offset {self.last_offset}",
        ]


def _t(second: int) -> str:
    return mf.format_time(datetime.fromtimestamp(second, UTC))


@dataclass(frozen=True)
class Found:
    """Segments merged over the stores (local first) and the bases they extend."""

    segments: list[SegmentMeta]
    where: dict[str, SegmentStore]  # stem -> the store to read it from
    sizes: dict[str, int]
    bases: dict[str, tuple[Manifest, Storage, tuple[str, ...]]]
    broken: dict[str, str]


def find(config: Config, location: str | None, env: Mapping[str, str] | None) -> Found:
    where: dict[str, SegmentStore] = {}
    metas: dict[str, SegmentMeta] = {}
    sizes: dict[str, int] = {}
    broken: dict[str, str] = {}
    for store in stores(config, location or "all", env):
        listing: SegmentListing = store.listing()
        broken.update({f"{store.name}:{k}": v for k, v in listing.broken.items()})
        for meta in listing.segments:
            if meta.stem not in where:
                where[meta.stem], metas[meta.stem] = store, meta
                sizes[meta.stem] = listing.sizes.get(meta.data_name, -1)
    bases: dict[str, tuple[Manifest, Storage, tuple[str, ...]]] = {}
    for storage in storages(config, location or "all", env):
        for manifest in storage.listing().manifests:
            if manifest.id in bases:
                m, s, locs = bases[manifest.id]
                bases[manifest.id] = (m, s, (*locs, storage.name))
            else:
                bases[manifest.id] = (manifest, storage, (storage.name,))
    closed = [m for m in metas.values() if m.ended != OPEN]
    ordered = sorted((m for m in metas.values()  # a piece in S3 of a segment closed locally
                      if m.ended != OPEN or not any(covers(c, m) for c in closed)),
                     key=lambda m: (m.replid, m.first_offset))
    return Found(ordered, where, sizes, bases, broken)


def found_chains(found: Found) -> list[windows.Chain]:
    def size_ok(meta: SegmentMeta) -> str:
        got = found.sizes.get(meta.stem, -1)
        return "" if got == meta.size else f"stored size {got}, its metadata says {meta.size}"

    return windows.chains((b[0] for b in found.bases.values()), found.segments, size_ok)


def plan(chains: Sequence[windows.Chain], moment: int) -> Plan:
    chain = windows.pick(chains, moment)
    if chain is None:
        raise RestoreError(f"{_t(moment)} is in no restorable window; "
                           + describe_windows(chains))
    segs = windows.needed(chain, moment)
    last = segs[-1]
    previous_stamp = segs[-2].last_time if len(segs) > 1 else last.first_time
    for second, offset, position in last.stamps:
        if second >= moment:
            return Plan(chain, segs, moment, position, offset, previous_stamp)
        previous_stamp = second
    raise RestoreError(f"segment {last.stem} has no stamp at or after {_t(moment)}")


def describe_windows(chains: Sequence[windows.Chain]) -> str:
    if not any(c.pieces for c in chains):
        return "there is no restorable window (no base with segments)"
    parts = []
    for chain in chains:
        pieces = ", ".join(f"{_t(lo)} .. {_t(hi)}" for lo, hi in chain.pieces)
        if pieces:
            parts.append(f"base {chain.base.id}: {pieces}"
                         + (f" (ends: {chain.ends_because})" if chain.ends_because else ""))
    return "restorable windows: " + "; ".join(parts)


def _copy_checked(store: SegmentStore, meta: SegmentMeta, out: BinaryIO, limit: int) -> None:
    """Write the segment's first `limit` bytes into `out` while checking the whole segment
    against its size and SHA-256; a mismatch raises, and the caller's half-written file is
    discarded (it is a temp file until the whole AOF is built)."""
    hasher, size = hashlib.sha256(), 0
    with store.open_segment(meta) as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
            if size < limit:
                write_all(out, chunk[:limit - size])
            size += len(chunk)
    if size != meta.size or hasher.hexdigest() != meta.sha256:
        raise IntegrityError(f"segment {meta.stem} [{store.name}] is corrupt (its size or "
                             "SHA-256 differs from its metadata)")


@contextlib.contextmanager
def point_in_time(config: Config, opts: Options, moment_at: datetime, ui: Ui,
                  env: Mapping[str, str] | None = None) -> Iterator[Selected | None]:
    """The data at `moment_at` as a temporary backup to restore; None when there are no
    segments at all (the caller restores the newest backup before it, as --before)."""
    found = find(config, opts.source, env)
    if not found.segments:
        yield None
        return
    moment = int(moment_at.timestamp())
    chosen = plan(found_chains(found), moment)
    ui.echo("\n".join(chosen.text()))
    base, base_storage, locations = found.bases[chosen.chain.base.id]
    identities = identities_for(base, opts.identity_file)
    with tempfile.TemporaryDirectory(prefix=".pitr-rebuild-", dir=config.backup.dir) as tmp:
        build = Path(tmp) / "build"
        aof = build / AOF_DIR
        aof.mkdir(parents=True, mode=0o700)
        incr = aof / f"{AOF_NAME}.1.incr.aof"
        with atomic_file(incr) as out:
            first = chosen.segments[0]
            db = str(first.db).encode()
            write_all(out, b"*2\r\n$6\r\nSELECT\r\n$%d\r\n%s\r\n" % (len(db), db))
            for meta in chosen.segments:
                limit = chosen.cut if meta is chosen.segments[-1] else meta.size
                try:
                    _copy_checked(found.where[meta.stem], meta, out, limit)
                except IntegrityError as exc:
                    raise RestoreError(f"{exc}: the restorable window ends before it; "
                                       f"restore to a time before {_t(meta.first_time)}, or "
                                       "from the other location (--from)") from None
        with atomic_file(aof / f"{AOF_NAME}.1.base.rdb") as out:
            fetch_and_check(Selected(base_storage, base, locations), out, identities,
                            ui.progress)
        (aof / f"{AOF_NAME}.manifest").write_bytes(
            f"file {AOF_NAME}.1.base.rdb seq 1 type b\n"
            f"file {AOF_NAME}.1.incr.aof seq 1 type i\n".encode())
        keys_per_db = _load_and_save(config, build)
        yield _as_backup(config, Path(tmp) / "store", build / "dump.rdb", base, chosen,
                         keys_per_db)


def _load_and_save(config: Config, build: Path) -> dict[str, int]:
    """Load the AOF directory in a throwaway server, SAVE it to build/dump.rdb."""
    with throwaway_server(config.verify.redis_server, build / "dump.rdb",
                          config.restore.start_timeout, aof_dir=AOF_DIR) as client:
        keyspace = client.info("keyspace")
        client.save()
    return {db: int(v["keys"]) for db, v in keyspace.items() if isinstance(v, dict)}


def _as_backup(config: Config, directory: Path, rdb: Path, base: Manifest, chosen: Plan,
               keys_per_db: dict[str, int]) -> Selected:
    directory.mkdir(mode=0o700)
    store = LocalStorage(directory)
    backup_id = mf.new_id(mf.now_utc())
    name = mf.artifact_name(backup_id, "none", False)
    sampler = KeySampler(int(db[2:]) for db in keys_per_db)
    try:
        with open(rdb, "rb") as fh:
            packed = pack(fh, directory / name, compression="none", level=0, recipients=[],
                          observe=sampler)
    except OSError as exc:
        raise StorageError(f"cannot read the rebuilt RDB: {exc.strerror}") from None
    manifest = Manifest(
        id=backup_id, created_at=mf.format_time(datetime.fromtimestamp(chosen.moment, UTC)),
        trigger="pitr", tag=f"point in time {_t(chosen.moment)} from {base.id}",
        redis=base.redis, rdb_version=packed.rdb.version, rdb_checksum=packed.rdb.checksum,
        keys=sum(keys_per_db.values()), keys_per_db=keys_per_db, keys_exact=True,
        key_sample=[f"{k.db}:{k.type}:{k.digest}" for k in sampler.keys],
        raw_size=packed.raw.size, raw_sha256=packed.raw.sha256,
        stored_size=packed.stored.size, stored_sha256=packed.stored.sha256,
        compression="none", encryption="none", artifact=name, backupd_version=__version__,
        replication={"master_replid": chosen.chain.replid,
                     "master_repl_offset": chosen.last_offset, "repl_offset_exact": False,
                     "pitr_base": base.id},
        source="replication")
    store.write_manifest(manifest)
    log.info("pitr_rebuilt", id=backup_id, base=base.id, keys=manifest.keys,
             last_offset=chosen.last_offset, moment=_t(chosen.moment))
    return Selected(store, manifest, ("pitr",))
