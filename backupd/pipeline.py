"""Streaming transforms between a raw RDB and a stored artifact, in one pass and bounded memory.

Backup: raw reader -> (SHA-256 + RDB check) -> compress -> encrypt -> (SHA-256) -> temp file.
Unpack: stored reader -> (SHA-256) -> decrypt -> decompress -> (SHA-256 + RDB check) -> sink.

Where the work can overlap, it does (docs/benchmarks.md has the numbers behind each choice):
- zstd compresses and decompresses independent frames in two worker threads
  (backupd/zstd_frames.py), so a compressed backup or restore keeps both cores busy;
- hashing, checking and writing are `_Stage`s where that pays: threads fed through small
  bounded queues (hashlib, zstandard and file I/O release the GIL, so they run in parallel
  with this thread): in pack the raw SHA-256 and the RDB check always, the writes without
  compression or encryption; in unpack all three without encryption;
- pyrage holds the GIL while it encrypts or decrypts a chunk, and calls back into Python for
  every 8 KiB it reads and 64 KiB it writes: its streams stay in this thread.
Writes go out in pieces of at most 128 KiB and their writeback starts while the rest is still
being computed (fsio.FileSink). Nothing ever holds more than a few chunks of the file in
memory. The stream shapes are in streams.py, the gzip and age adapters in codecs.py, the
atomic file writer in fsio.py; this module puts them together and keeps the digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import pyrage
import zstandard

from backupd import zstd_frames
from backupd.choices import Compression
from backupd.codecs import ZlibReader, ZlibWriter, through_pyrage
from backupd.errors import IntegrityError, StorageError
from backupd.fsio import FileSink, atomic_file
from backupd.rdb import HeaderCheck, RdbChecker, RdbInfo
from backupd.streams import (
    CHUNK,
    Chunks,
    ObservedReader,
    ObservedWriter,
    Observer,
    Readable,
    Writable,
    copy_stream,
    fan_out,
)
from backupd.zstd_frames import FramedCompressor
from backupd.zstd_frames import decode as decode_zstd_frames

READ_SIZE = 2 * CHUNK  # per read() of the source: fewer, larger steps through the stages
DEPTH = 2  # chunks waiting in each stage's queue: bounds memory, absorbs jitter


class _Stage:
    """One step of a pipeline in a thread of its own: calling the stage queues a chunk for
    `consume`, which runs on every chunk in order. An exception in the stage is raised in the
    feeding thread, at its next call or at `close()`."""

    def __init__(self, consume: Observer) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(DEPTH)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(consume,), daemon=True)
        self._thread.start()

    def _run(self, consume: Observer) -> None:
        chunks = Chunks(self._queue.get)
        try:
            for chunk in chunks:
                consume(chunk)
        except BaseException as exc:  # handed to the feeding thread
            self._error = exc
        for _ in chunks:  # drain: the feeder must never block on a stage that stopped
            pass

    def __call__(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        """Mark the end, wait for the stage to finish, raise its error if it had one."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: stop the thread, keep the first error
            with contextlib.suppress(BaseException):
                self.close()


class Follower(Protocol):
    """Reads the artifact while pack() writes it (an upload in parts), from the file itself:
    it never holds up the pipeline and needs no copy of the bytes. Its methods must not raise.
    """

    def opened(self, fd: int, name: str) -> None:
        """The temp file is open at `fd` (readable; closed when pack returns: dup it to keep
        reading); `name` is the artifact's final name."""

    def written(self, size: int) -> None:
        """The file's first `size` bytes are written (called from the writing thread)."""

    def abandoned(self) -> None:
        """pack() failed: there will be no artifact; stop and discard everything."""


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


class Digester:
    """SHA-256 and byte count of everything fed to it (the count only, after `count_only`)."""

    def __init__(self) -> None:
        self._hash: Any = hashlib.sha256()
        self.size = 0

    def __call__(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)

    def count_only(self) -> None:
        self._hash = None

    def digest(self) -> Digest:
        return Digest(self.size, self._hash.hexdigest() if self._hash is not None else "")


class _RecordedDigest:
    """The RDB's size and SHA-256 as pack() recorded them in the artifact (zstd_frames: the
    first frame announces the digest frame that ends the artifact). Both are covered by the
    stored SHA-256, so when the caller checks that against the manifest, the recorded digest
    vouches for the RDB, and `trust` spares hashing it again: zstd checks every frame's
    content checksum and the RDB checker its CRC64, so what comes out is what went in."""

    def __init__(self, raw: Digester, trust: bool) -> None:
        self._raw = raw
        self._trust = trust
        self.announced = False
        self.recorded: tuple[int, str] | None = None

    def frame(self, payload: bytes) -> None:
        if payload == zstd_frames.ANNOUNCE and self._raw.size == 0 and self.recorded is None:
            self.announced = True
            if self._trust:
                self._raw.count_only()  # no RDB byte has been handed on yet
        elif (digest := zstd_frames.parse_digest(payload)) is not None:
            self.recorded = digest

    def check(self, computed: Digest) -> Digest:
        """The RDB's digest; IntegrityError when the artifact contradicts itself."""
        if not self.announced:
            return computed
        if self.recorded is None:
            raise IntegrityError("the artifact announces a digest of the RDB at its end and has "
                                 "none (truncated?)")
        size, sha256 = self.recorded
        if size != computed.size or (computed.sha256 and computed.sha256 != sha256):
            raise IntegrityError("the RDB differs from the digest recorded in the artifact")
        return Digest(size, sha256)


@dataclass(frozen=True)
class PackResult:
    raw: Digest
    stored: Digest
    rdb: RdbInfo


def compress_reader(source: Readable, compression: str, level: int,
                    raw_digest: Callable[[], Digest] | None = None) -> Readable:
    """`source` compressed, as a reader. zstd writes independent frames of FRAME_SIZE input
    bytes, compressed by two threads (backupd/zstd_frames.py): a restore decompresses them on
    both cores; the file is still one standard .zst. With `raw_digest` (the source's digest,
    asked for once the source has ended), its size and SHA-256 end the artifact
    (_RecordedDigest)."""
    if compression == Compression.ZSTD:
        workers = 2 if (os.cpu_count() or 1) > 1 else 1

        def trailer() -> tuple[int, bytes]:
            assert raw_digest is not None
            digest = raw_digest()
            return digest.size, bytes.fromhex(digest.sha256)

        return FramedCompressor(source, level, workers=workers,
                                trailer=trailer if raw_digest is not None else None)
    if compression == Compression.GZIP:
        return ZlibReader(source, level)
    return source


def pack(source: Readable, dest: Path, *, compression: str, level: int,
         recipients: Sequence[str], follower: Follower | None = None,
         observe: Observer | None = None) -> PackResult:
    """Stream a raw RDB into the artifact `dest`, atomically: temp file, fsync, rename.

    The RDB is checked in the same pass; a snapshot that fails the check never becomes a file
    with a backup's name. A `follower` may read the file as it grows (see Follower); `observe`
    sees the raw RDB beside the check (the key sample).
    """
    raw, stored, checker = Digester(), Digester(), RdbChecker()
    checks = (raw, checker.update) if observe is None else (raw, checker.update, observe)
    plain = compression == Compression.NONE and not recipients  # stored == raw: hash once
    try:
        with atomic_file(dest, readable=follower is not None) as fh:  # the follower reads it
            if follower is not None:
                follower.opened(fh.fileno(), dest.name)
            sink = FileSink(fh, follower.written if follower is not None else None)
            if plain:  # hashing is the critical path: it gets a thread, so does writing
                with _Stage(fan_out(*checks)) as check, _Stage(sink.write) as out:
                    while chunk := source.read(READ_SIZE):
                        check(chunk)
                        out(chunk)
            else:
                # The raw SHA-256 and the RDB check in a thread: they run while this one
                # holds the GIL (in pyrage, in Python; docs/benchmarks.md has the gain).
                # The header is checked here too: not an RDB stops at once.
                with _Stage(fan_out(*checks)) as check:

                    def raw_digest() -> Digest:
                        check.close()  # the stage has hashed every byte read
                        return raw.digest()

                    reader = compress_reader(ObservedReader(source, HeaderCheck(), check),
                                             compression, level, raw_digest)
                    writer = ObservedWriter(sink, stored)
                    if recipients:
                        keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
                        through_pyrage(pyrage.encrypt_io, reader, writer, keys)
                    else:
                        copy_stream(reader, writer)
            rdb = checker.finish()  # before the rename: a bad RDB never gets the name
    except OSError as exc:
        if follower is not None:
            follower.abandoned()
        raise StorageError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except BaseException:
        if follower is not None:
            follower.abandoned()
        raise
    return PackResult(raw.digest(), (raw if plain else stored).digest(), rdb)


@dataclass(frozen=True)
class UnpackResult:
    stored: Digest
    raw: Digest
    rdb: RdbInfo


def unpack(source: Readable, sink: Writable | None, *, compression: str, encrypted: bool,
           identities: Sequence[Any] = (), trust_recorded: bool = False) -> UnpackResult:
    """Stream a stored artifact back to the raw RDB (into `sink`, or nowhere to only check it).

    `trust_recorded`: for an artifact that records the RDB's digest (_RecordedDigest), return
    that digest instead of hashing the RDB; only for a caller that compares the stored digest
    with the manifest (a restore: the RDB's SHA-256 is a third of its staging CPU). `verify`
    hashes everything and also checks the recorded digest.

    Without encryption this thread reads (and, for zstd, finds the frames) while stages hash the
    stored bytes, hash and check the RDB, and write to `sink`, and two workers decompress zstd
    frames in parallel (backupd/zstd_frames.py; an artifact of one frame streams through this
    thread); with encryption everything runs here (see the module docstring)."""
    stored, raw, checker = Digester(), Digester(), RdbChecker()
    if encrypted and not identities:
        raise IntegrityError("the backup is encrypted and no identity was given")
    outputs: list[Observer] = [fan_out(raw, checker.update)]
    if sink is not None:
        outputs.append(FileSink(sink).write)
    recorded = _RecordedDigest(raw, trust_recorded)
    try:
        with contextlib.ExitStack() as stages:  # closing it waits for every stage to finish
            if not encrypted:
                outputs = [stages.enter_context(_Stage(output)) for output in outputs]
            if compression == Compression.ZSTD and not encrypted:
                hash_stored = stages.enter_context(_Stage(stored))

                def next_chunk() -> bytes:
                    chunk = source.read(READ_SIZE)
                    if chunk:
                        hash_stored(chunk)
                    return chunk

                decode_zstd_frames(next_chunk, fan_out(*outputs),
                                   on_backupd_frame=recorded.frame)
            else:
                _decode_stream(source, outputs, stages, stored, compression, encrypted,
                               identities)
        return UnpackResult(stored.digest(), recorded.check(raw.digest()), checker.finish())
    except pyrage.DecryptError as exc:
        raise IntegrityError(f"cannot decrypt the backup (wrong identity or corrupt): {exc}") \
            from None
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"the zstd stream is corrupt: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error (reading, or writing to `sink`)
            raise
        # pyrage reports a failed payload MAC (a damaged encrypted artifact) as a bare OSError
        raise IntegrityError(f"cannot decrypt the backup (corrupt): {exc}") from None


def _decode_stream(source: Readable, outputs: list[Observer], stages: contextlib.ExitStack,
                   stored: Digester, compression: str, encrypted: bool,
                   identities: Sequence[Any]) -> None:
    """The stored artifact decrypted and decompressed as one stream into `outputs`: the path
    of gzip, of no compression, and of everything encrypted (module docstring)."""
    raw_writer = ObservedWriter(None, *outputs)
    writer: Writable = raw_writer
    zstd_writer: Any = None
    zlib_writer: ZlibWriter | None = None
    if compression == Compression.ZSTD:
        writer = zstd_writer = zstandard.ZstdDecompressor().stream_writer(
            raw_writer, write_size=CHUNK, closefd=False)  # type: ignore[arg-type]
    elif compression == Compression.GZIP:
        writer = zlib_writer = ZlibWriter(raw_writer)
    if encrypted:
        observed = ObservedReader(source, stored)  # hashed in READ_SIZE chunks,
        chunks = Chunks(lambda: observed.read(READ_SIZE) or None)  # read in 8 KiB
        through_pyrage(pyrage.decrypt_io, chunks, writer, list(identities))
    else:
        hash_stored = stages.enter_context(_Stage(stored))
        while chunk := source.read(READ_SIZE):
            hash_stored(chunk)
            writer.write(chunk)
    if zstd_writer is not None:
        zstd_writer.flush()
    if zlib_writer is not None:
        zlib_writer.finish()
