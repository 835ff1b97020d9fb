"""Segments: the command stream of a replication link, as the AOF Redis would write.

A segment holds the commands exactly as received (PING and REPLCONF left out), with
`#TS:<unix seconds>` annotation lines, the form `aof-timestamp-enabled` writes and
`redis-check-aof --truncate-to-timestamp` reads. A stamp `#TS:s` says that the commands after
it reached backupd at a time in [s, s+1): a stamp is written before the first command of each
new second, and every second without commands too, so that "nothing came" is recorded as well.
Stamps and segment ends fall only between transactions, never inside MULTI/EXEC: a
transaction is held in memory until its EXEC and written whole.

Offsets are the master's replication offsets: a segment covers the bytes first_offset ..
last_offset of the stream (the skipped keepalives included), the next one starts at
last_offset + 1. The open segment is `<stem>.open`; every pitr.fsync it is fsynced and its
durable length, offset and SHA-256 are written to `<stem>.progress`. Closing renames it to
`<stem>.resp` and writes `<stem>.json` last: the commit marker. After a crash, `recover` keeps
exactly what `.progress` says was durable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from backupd.errors import IntegrityError, StorageError
from backupd.fsio import fsync_dir, write_all, write_atomic
from backupd.pitr.commands import LINK_ONLY, CommandSplitter
from backupd.storage import layout

log = structlog.get_logger("backupd.pitr")

FORMAT = 1
MAX_SEGMENT_BYTES = 64 << 20
MAX_META_BYTES = 64 * 1024
STAMP_PREFIX = b"#TS:"

# Why a segment ended: what a gap after it means (windows.py).
ROTATED = "rotated"
LINK_DOWN = "link down"
RESTARTED = "backupd restart"
STOPPED = "backupd stopped"
OPEN = "open"  # a piece of the open segment's durable part, uploaded every pitr.upload_interval


def stamp(second: int) -> bytes:
    return b"%s%d\r\n" % (STAMP_PREFIX, second)


@dataclass(frozen=True)
class SegmentMeta:
    """A closed segment. `base` is the backup id of the full sync its chain starts from;
    `db` the database selected at its first byte."""

    replid: str
    first_offset: int
    last_offset: int
    first_time: int
    last_time: int
    size: int
    sha256: str
    base: str
    db: int
    last_db: int
    ended: str
    # [second, offset, position] of each stamp: the offset of the last byte before it and
    # where it starts in the file (a restore cuts there without parsing the stream).
    stamps: list[list[int]] = field(default_factory=list)
    format: int = FORMAT
    segment: str = ""  # a piece (ended OPEN): the stem of the open segment it continues

    @property
    def stem(self) -> str:
        return layout.segment_stem(self.replid, self.first_offset)

    @property
    def data_name(self) -> str:
        return self.stem + (layout.SEGMENT_PART_EXT if self.ended == OPEN
                            else layout.SEGMENT_DATA_EXT)

    @property
    def meta_name(self) -> str:
        return self.stem + (layout.SEGMENT_PART_META_EXT if self.ended == OPEN
                            else layout.SEGMENT_META_EXT)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n"


def parse_meta(data: bytes, name: str) -> SegmentMeta:
    """A segment's metadata, parsed strictly (it is read from disk or a bucket)."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("unknown format")
        ints = ("first_offset", "last_offset", "first_time", "last_time", "size", "db",
                "last_db")
        if any(type(raw.get(k)) is not int for k in ints):
            raise ValueError("a number field is missing or not a number")
        if any(type(raw.get(k)) is not str for k in ("replid", "sha256", "base", "ended")):
            raise ValueError("a text field is missing or not text")
        stamps = raw.get("stamps")
        if not isinstance(stamps, list) or not all(
                isinstance(st, list) and len(st) == 3 and all(type(v) is int for v in st)
                for st in stamps):
            raise ValueError("field 'stamps' is not a list of [second, offset, position]")
        if type(raw.get("segment", "")) is not str:
            raise ValueError("field 'segment' is not text")
        meta = SegmentMeta(**{k: raw[k] for k in (*ints, "replid", "sha256", "base",
                                                    "ended", "format", "stamps")},
                           segment=raw.get("segment", ""))
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"segment metadata {name}: {exc}") from None
    if meta.meta_name != name or meta.last_offset < meta.first_offset - 1:
        raise IntegrityError(f"segment metadata {name} does not match its name or offsets")
    if not layout.is_valid_id(meta.base):
        raise IntegrityError(f"segment metadata {name}: base {meta.base[:40]!r} is not an id")
    return meta


@dataclass
class _Open:
    stem: str
    fd: int
    first_offset: int
    first_time: int
    db: int
    hasher: Any
    size: int = 0
    last_time: int = 0
    opened: float = 0.0
    stamps: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class Durable:
    """What survives a crash now: the newest fsynced stamp and offset."""

    offset: int
    time: int


class SegmentWriter:
    """Writes one chain's stream from `offset` + 1 on (see the module). `closed` is called
    with each committed segment (the upload). `acks` counts the GETACKs to answer."""

    def __init__(self, directory: Path, *, base: str, replid: str, offset: int, db: int,
                 fsync_every: float, max_age: float, closed: Callable[[SegmentMeta], None],
                 max_bytes: int = MAX_SEGMENT_BYTES, background: bool = False) -> None:
        """`background`: fsync from a thread of its own, so that a slow disk never delays
        the reading (a write is stamped when it is read); else from `tick`."""
        self.dir = directory
        self.base, self.replid = base, replid
        self.offset = offset  # the last byte handled, outside any transaction
        self.db = db
        self._fsync_every, self._max_age, self._max_bytes = fsync_every, max_age, max_bytes
        self._closed = closed
        self._split = CommandSplitter()
        self._tx: list[bytes] | None = None  # a transaction's commands, until its EXEC
        self._tx_bytes = 0
        self._tx_db = db
        self._db_at_begin = db
        self._open: _Open | None = None
        self._last_stamp = -1
        self._new_stamps: list[list[int]] = []
        self._synced_at = time.monotonic()
        self.durable: Durable | None = None
        self.partial: SegmentMeta | None = None  # the open segment's durable part
        self.acks = 0
        self.segments = 0
        self.bytes = 0
        self._state = threading.RLock()  # the open segment's data, size, hash and offsets
        self._sync = threading.RLock()  # an fsync and its durable record; a commit
        self._stop = threading.Event()
        self.sync_error: StorageError | None = None
        ensure_segment_dir(directory)
        self._syncer: threading.Thread | None = None
        if background:
            self._syncer = threading.Thread(target=self._sync_loop, name="pitr-fsync",
                                            daemon=True)
            self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._fsync_every):
            try:
                self.sync()
            except StorageError as exc:
                self.sync_error = exc

    def stop(self) -> None:
        """End the fsync thread (after `close`)."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=60)

    # -- the stream ----------------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> None:
        with self._state:
            self._feed(data, now)

    def _feed(self, data: bytes, now: float) -> None:
        buf, commands = self._split.feed(data)
        begin, self._db_at_begin = self.offset, self.db
        out: list[bytes] = []
        second = int(now)
        self._stamp_into(out, second)
        for cmd in commands:
            length = cmd.end - cmd.start
            if self._tx is not None:
                self._tx.append(buf[cmd.start:cmd.end])
                self._tx_bytes += length
                if cmd.name == b"select":
                    self._tx_db = _db(cmd.arg1, self._tx_db)
                if cmd.name == b"exec":
                    out.extend(self._tx)
                    self.offset += self._tx_bytes
                    self.db = self._tx_db
                    self._tx, self._tx_bytes = None, 0
                    self._stamp_into(out, second)
                continue
            self.offset += length
            if cmd.name in LINK_ONLY or not cmd.name:
                if cmd.name == b"replconf" and cmd.arg1.lower() == b"getack":
                    self.acks += 1
                continue
            if cmd.name == b"multi":
                self._tx, self._tx_bytes, self._tx_db = [buf[cmd.start:cmd.end]], length, \
                    self.db
                self.offset -= length
                continue
            if cmd.name == b"select":
                self.db = _db(cmd.arg1, self.db)
            out.append(buf[cmd.start:cmd.end])
        if out:
            self._write(b"".join(out), second, begin + 1)

    @property
    def received(self) -> int:
        """The offset of the last byte received (for REPLCONF ACK and PSYNC)."""
        return self.offset + self._tx_bytes + len(self._split.buf)

    def tick(self, now: float) -> None:
        """Once per loop: the idle second's stamp, the fsync, the rotation when due."""
        if self.sync_error is not None:
            raise self.sync_error
        with self._state:
            out: list[bytes] = []
            self._stamp_into(out, int(now))
            self._db_at_begin = self.db
            if out:
                self._write(out[0], int(now), self.offset + 1)
        mono = time.monotonic()
        if self._syncer is None and mono - self._synced_at >= self._fsync_every:
            self.sync()
        seg = self._open
        if seg is not None and self._tx is None and (
                seg.size >= self._max_bytes or mono - seg.opened >= self._max_age):
            with self._state:
                self._rotate(int(now))

    def _rotate(self, second: int) -> None:
        """Close the segment and open the next at once (with its first stamp): a link that
        drops now ends an open segment, which says so."""
        self.close(ROTATED)
        out: list[bytes] = []
        self._stamp_into(out, second)
        self._db_at_begin = self.db
        self._write(out[0], second, self.offset + 1)

    def _stamp_into(self, out: list[bytes], second: int) -> None:
        if self._tx is None and second > self._last_stamp:
            self._new_stamps.append([second, self.offset, sum(map(len, out))])
            out.append(stamp(second))
            self._last_stamp = second

    def _write(self, data: bytes, second: int, first_offset: int) -> None:
        """Append `data` (that starts at `first_offset`) to the open segment, or a new one."""
        seg = self._open or self._start(second, first_offset)
        seg.last_time = max(seg.last_time, self._last_stamp)
        for st in self._new_stamps:
            seg.stamps.append([st[0], st[1], st[2] + seg.size])
        self._new_stamps.clear()
        try:
            write_all(_FdWriter(seg.fd), data)
        except OSError as exc:
            raise StorageError(f"cannot write segment {seg.stem}: {exc.strerror}") from None
        seg.hasher.update(data)
        seg.size += len(data)
        self.bytes += len(data)
        if seg.size >= self._max_bytes and self._tx is None:
            self._rotate(second)

    def _start(self, second: int, first_offset: int) -> _Open:
        stem = layout.segment_stem(self.replid, first_offset)
        path = self.dir / (stem + layout.SEGMENT_OPEN_EXT)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create segment {path}: {exc.strerror}") from None
        self._open = _Open(stem, fd, first_offset, second, self._db_at_begin,
                           hashlib.sha256(), opened=time.monotonic())
        return self._open

    # -- durability ----------------------------------------------------------------------

    def sync(self) -> None:
        """fsync the open segment and record what is durable in `.progress`: a snapshot of
        size, offset and hash first (brief), then the slow part without holding the reader."""
        self._synced_at = time.monotonic()
        with self._state:
            seg = self._open
            if seg is None:
                return
            try:
                fd = os.dup(seg.fd)
            except OSError as exc:
                raise StorageError(f"cannot fsync segment {seg.stem}: {exc.strerror}") from None
            progress = {"size": seg.size, "last_offset": self.offset,
                        "first_time": seg.first_time, "last_time": seg.last_time,
                        "db": seg.db, "last_db": self.db, "base": self.base,
                        "sha256": seg.hasher.hexdigest(),
                        "stamps": [list(st) for st in seg.stamps]}
        try:
            with self._sync:
                if self._open is not seg:
                    return  # committed meanwhile: its record is gone with it
                os.fsync(fd)
                write_atomic(self.dir / (seg.stem + layout.SEGMENT_PROGRESS_EXT),
                             json.dumps(progress).encode())
                self.durable = Durable(int(progress["last_offset"]), seg.last_time)
                self.partial = SegmentMeta(
                    replid=self.replid, first_offset=seg.first_offset,
                    last_offset=int(progress["last_offset"]), first_time=seg.first_time,
                    last_time=int(progress["last_time"]), size=int(progress["size"]),
                    sha256=str(progress["sha256"]), base=self.base, db=seg.db,
                    last_db=int(progress["last_db"]), ended=OPEN,
                    stamps=progress["stamps"])
        except OSError as exc:
            raise StorageError(f"cannot fsync segment {seg.stem}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def close(self, ended: str) -> SegmentMeta | None:
        """Commit the open segment (none open: nothing). A transaction still open stays in
        memory: it belongs to the next segment."""
        with self._state, self._sync:
            return self._close(ended)

    def _close(self, ended: str) -> SegmentMeta | None:
        seg = self._open
        if seg is None:
            return None
        self.sync()
        self._open, self.partial = None, None
        os.close(seg.fd)
        meta = SegmentMeta(replid=self.replid, first_offset=seg.first_offset,
                           last_offset=self.offset, first_time=seg.first_time,
                           last_time=seg.last_time, size=seg.size,
                           sha256=seg.hasher.hexdigest(), base=self.base, db=seg.db,
                           last_db=self.db, ended=ended, stamps=seg.stamps)
        commit(self.dir, seg.stem, meta)
        self.segments += 1
        self._last_stamp = -1  # the next segment starts with a stamp of its own
        log.info("pitr_segment_closed", segment=meta.stem, size=meta.size, ended=ended,
                 first_offset=meta.first_offset, last_offset=meta.last_offset)
        self._closed(meta)
        return meta

    def abandon(self) -> None:
        """Close the file without committing (the process goes on; `recover` decides)."""
        with self._state, self._sync:
            if self._open is not None:
                with contextlib.suppress(OSError):
                    os.close(self._open.fd)
                self._open = None


class _FdWriter:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | memoryview, /) -> int:
        return os.write(self._fd, data)


def _db(arg: bytes, current: int) -> int:
    return int(arg) if arg.isdigit() else current


def ensure_segment_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {directory}: {exc.strerror}") from None


def commit(directory: Path, stem: str, meta: SegmentMeta) -> None:
    """`.open` -> `.resp`, then the metadata (the commit marker), then `.progress` goes."""
    try:
        opened = directory / (stem + layout.SEGMENT_OPEN_EXT)
        if opened.exists():
            os.rename(opened, directory / (stem + layout.SEGMENT_DATA_EXT))
            fsync_dir(directory)
        write_atomic(directory / (stem + layout.SEGMENT_META_EXT), meta.to_json())
        (directory / (stem + layout.SEGMENT_PROGRESS_EXT)).unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot commit segment {stem}: {exc.strerror}") from None


def recover(directory: Path) -> list[SegmentMeta]:
    """Commit what a killed backupd left durable: each uncommitted segment is cut to the
    length its `.progress` names, checked against that SHA-256 and committed as ended by a
    restart; one without a usable `.progress` held nothing durable and is removed."""
    recovered: list[SegmentMeta] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list {directory}: {exc.strerror}") from None
    present = set(names)
    for name in names:
        parsed = layout.segment_of(name)
        if parsed is None or parsed[2] not in (layout.SEGMENT_OPEN_EXT, layout.SEGMENT_DATA_EXT):
            continue
        replid, first, _ = parsed
        stem = layout.segment_stem(replid, first)
        if stem + layout.SEGMENT_META_EXT in present:
            continue
        meta = _recover_one(directory, directory / name, stem, replid, first)
        if meta is not None:
            recovered.append(meta)
    return recovered


def _recover_one(directory: Path, path: Path, stem: str, replid: str,
                 first: int) -> SegmentMeta | None:
    progress_path = directory / (stem + layout.SEGMENT_PROGRESS_EXT)
    try:
        progress = json.loads(progress_path.read_bytes())
        size = int(progress["size"])
        with open(path, "r+b") as fh:
            data = fh.read(size)
            if len(data) != size or hashlib.sha256(data).hexdigest() != progress["sha256"]:
                raise ValueError("the durable part does not match its record")
            fh.truncate(size)
            os.fsync(fh.fileno())
        meta = SegmentMeta(replid=replid, first_offset=first,
                           last_offset=int(progress["last_offset"]),
                           first_time=int(progress["first_time"]),
                           last_time=int(progress["last_time"]), size=size,
                           sha256=progress["sha256"], base=str(progress["base"]),
                           db=int(progress["db"]), last_db=int(progress["last_db"]),
                           ended=RESTARTED, stamps=[[int(v) for v in st]
                                                    for st in progress["stamps"]])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("pitr_segment_discarded", segment=stem, why=str(exc) or type(exc).__name__,
                    hint="nothing of it was durable; the link resumes from the last "
                         "durable offset")
        path.unlink(missing_ok=True)
        progress_path.unlink(missing_ok=True)
        return None
    commit(directory, stem, meta)
    log.info("pitr_segment_recovered", segment=stem, size=meta.size,
             last_offset=meta.last_offset)
    return meta
