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
being computed. Nothing ever holds more than a few chunks of the file in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import queue
import secrets
import stat
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import pyrage
import zstandard

from backupd import zstd_frames
from backupd.errors import IntegrityError, StorageError
from backupd.rdb import HeaderCheck, RdbChecker, RdbInfo
from backupd.zstd_frames import FramedCompressor
from backupd.zstd_frames import decode as decode_zstd_frames

CHUNK = 1 << 20
READ_SIZE = 2 * CHUNK  # per read() of the source: fewer, larger steps through the stages
DEPTH = 2  # chunks waiting in each stage's queue: bounds memory, absorbs jitter
# write() calls of at most 128 KiB, like cp and cat: on the benchmark VM (kernel 6.18, ext4)
# 2 MiB writes into new page-cache pages cost 3-5x the kernel CPU of 128 KiB ones.
WRITE_SIZE = 128 * 1024
# Start the writeback of every 8 MiB written, so that the final fsync waits for the last few
# MiB only instead of the whole file.
WRITEBACK_EVERY = 8 * CHUNK
TEMP_MARK = ".tmp-"


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> Any: ...


Observer = Callable[[bytes], Any]


class ObservedReader(io.RawIOBase):
    """Passes every byte read through the observers (hashes, the RDB checker, a counter)."""

    def __init__(self, source: Readable, *observers: Observer) -> None:
        self._source = source
        self._observers = observers

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(CHUNK if size is None or size < 0 else size)
        if data:
            for observe in self._observers:
                observe(data)
        return data

    def readinto(self, buffer: Any, /) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ObservedWriter(io.RawIOBase):
    """Passes every byte written through the observers, then to `target` (if any)."""

    def __init__(self, target: Writable | None, *observers: Observer) -> None:
        self._target = target
        self._observers = observers

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        chunk = bytes(data)
        for observe in self._observers:
            observe(chunk)
        if self._target is not None:
            self._target.write(chunk)
        return len(chunk)


class _ZlibReader(io.RawIOBase):
    """gzip compression as a reader, for symmetry with zstd's stream_reader."""

    def __init__(self, source: Readable, level: int) -> None:
        self._source = source
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._buffer = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while len(self._buffer) < size and not self._done:
            data = self._source.read(CHUNK)
            if data:
                self._buffer += self._zlib.compress(data)
            else:
                self._buffer += self._zlib.flush()
                self._done = True
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def readinto(self, buffer: Any, /) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _ZlibWriter(io.RawIOBase):
    """gzip decompression as a writer; `close()` insists on a complete stream."""

    def __init__(self, target: Writable) -> None:
        self._target = target
        self._zlib = zlib.decompressobj(31)

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        try:
            self._target.write(self._zlib.decompress(bytes(data)))
        except zlib.error as exc:
            raise IntegrityError(f"the gzip stream is corrupt: {exc}") from None
        return len(data)

    def finish(self) -> None:
        self._target.write(self._zlib.flush())
        if not self._zlib.eof or self._zlib.unused_data:
            raise IntegrityError("the gzip stream is truncated or has trailing data")


class _Chunks:
    """Chunks from `next_chunk` (None at the end), consumed one by one (`for chunk in ...`) or as
    a byte stream (`read(n)`, which is how pyrage reads: 8 KiB at a time)."""

    def __init__(self, next_chunk: Callable[[], bytes | None]) -> None:
        self._next_chunk = next_chunk
        self._chunk = b""  # being read(), from _pos on
        self._pos = 0
        self._ended = False

    def _next(self) -> bytes | None:
        chunk = None if self._ended else self._next_chunk()
        self._ended = chunk is None
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        if self._pos < len(self._chunk):
            yield self._chunk[self._pos:]
        self._chunk, self._pos = b"", 0
        while (chunk := self._next()) is not None:
            yield chunk

    def read(self, size: int = -1, /) -> bytes:
        while self._pos >= len(self._chunk):
            chunk = self._next()
            if chunk is None:
                return b""
            self._chunk, self._pos = chunk, 0
        end = len(self._chunk) if size is None or size < 0 else self._pos + size
        data = self._chunk[self._pos:end]
        self._pos += len(data)
        return data


class _Relayed:
    """A stream handed to pyrage, which turns any exception raised while it reads or writes
    into its own EncryptError/DecryptError, keeping only the text: this keeps the original."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.error: BaseException | None = None

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self._stream.read(size)
        except BaseException as exc:
            self.error = exc
            raise
        return data

    def write(self, data: bytes, /) -> Any:
        try:
            return self._stream.write(data)
        except BaseException as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            flush = getattr(self._stream, "flush", None)
            if flush is not None:
                flush()
        except BaseException as exc:
            self.error = exc
            raise


def _through_pyrage(call: Callable[..., Any], source: Readable, target: Writable,
                    keys: list[Any]) -> None:
    """pyrage's encrypt_io/decrypt_io, raising what our own streams raised (a snapshot to read
    again, a full disk, a corrupt zstd stream) as itself rather than as a pyrage error."""
    reader, writer = _Relayed(source), _Relayed(target)
    try:
        call(reader, writer, keys)
    except Exception:
        error = reader.error or writer.error
        if error is not None:
            raise error from None
        raise


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
        chunks = _Chunks(self._queue.get)
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


def _fan_out(*observers: Observer) -> Observer:
    def observe(data: bytes) -> None:
        for each in observers:
            each(data)
    return observe


def _write_all(target: Writable, data: bytes | memoryview) -> None:
    """Write in WRITE_SIZE pieces, resuming after short writes (raw files)."""
    view = memoryview(data)
    while view:
        written = target.write(view[:WRITE_SIZE])
        view = view[written if isinstance(written, int) else WRITE_SIZE:]


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


class _FileSink:
    """Writes to `target` in WRITE_SIZE pieces. When `target` is a regular file, it also starts
    the kernel's writeback of every WRITEBACK_EVERY bytes while the rest is still being
    computed (sync_file_range: start, do not wait, keep the pages cached), so that the
    caller's fsync waits for the last few MiB only. A `follower` hears the byte count after
    each write (`target` must then be unbuffered: the bytes are in the file when it hears)."""

    def __init__(self, target: Writable, follower: Follower | None = None) -> None:
        self._target = target
        self._follower = follower
        self._fd = _regular_file(target)
        self._written = self._started = 0
        self._base = os.lseek(self._fd, 0, os.SEEK_CUR) if self._fd is not None else 0

    def write(self, data: bytes | memoryview, /) -> int:
        _write_all(self._target, data)
        self._written += len(data)
        if self._follower is not None:
            self._follower.written(self._written)
        if self._fd is not None and self._written - self._started >= WRITEBACK_EVERY:
            flush = getattr(self._target, "flush", None)
            if flush is not None:
                flush()  # a buffered file: its bytes must reach the kernel first
            _start_writeback(self._fd, self._base + self._started,
                             self._written - self._started)
            self._started = self._written
        return len(data)


def _regular_file(target: Writable) -> int | None:
    try:
        fd = int(target.fileno())  # type: ignore[attr-defined]
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a hint: no checks


def _load_sync_file_range() -> Any:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return func


_sync_file_range = _load_sync_file_range()


def copy_stream(source: Readable, target: Writable) -> None:
    while chunk := source.read(CHUNK):
        target.write(chunk)


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


class Counter:
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

    def __init__(self, raw: Counter, trust: bool) -> None:
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
    if compression == "zstd":
        workers = 2 if (os.cpu_count() or 1) > 1 else 1

        def trailer() -> tuple[int, bytes]:
            assert raw_digest is not None
            digest = raw_digest()
            return digest.size, bytes.fromhex(digest.sha256)

        return FramedCompressor(source, level, workers=workers,
                                trailer=trailer if raw_digest is not None else None)
    if compression == "gzip":
        return _ZlibReader(source, level)
    return source


def pack(source: Readable, dest: Path, *, compression: str, level: int,
         recipients: Sequence[str], follower: Follower | None = None,
         observe: Observer | None = None) -> PackResult:
    """Stream a raw RDB into the artifact `dest`, atomically: temp file, fsync, rename.

    The RDB is checked in the same pass; a snapshot that fails the check never becomes a file
    with a backup's name. A `follower` may read the file as it grows (see Follower); `observe`
    sees the raw RDB beside the check (the key sample).
    """
    raw, stored, checker = Counter(), Counter(), RdbChecker()
    checks = (raw, checker.update) if observe is None else (raw, checker.update, observe)
    tmp = dest.with_name(f".{dest.name}{TEMP_MARK}{secrets.token_hex(4)}")
    plain = compression == "none" and not recipients  # stored bytes == raw bytes: hash once
    try:
        access = os.O_WRONLY if follower is None else os.O_RDWR  # the follower reads it
        fd = os.open(tmp, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb", buffering=0) as fh:
            if follower is not None:
                follower.opened(fd, dest.name)
            sink = _FileSink(fh, follower)
            if plain:  # hashing is the critical path: it gets a thread, so does writing
                with _Stage(_fan_out(*checks)) as check, _Stage(sink.write) as out:
                    while chunk := source.read(READ_SIZE):
                        check(chunk)
                        out(chunk)
            else:
                # The raw SHA-256 and the RDB check in a thread: they run while this one
                # holds the GIL (in pyrage, in Python); 1 GB, zstd-3: 3.30 -> 3.27 s, with
                # age 3.86 -> 3.69 s. The header is checked here too: not an RDB stops at once.
                with _Stage(_fan_out(*checks)) as check:

                    def raw_digest() -> Digest:
                        check.close()  # the stage has hashed every byte read
                        return raw.digest()

                    reader = compress_reader(ObservedReader(source, HeaderCheck(), check),
                                             compression, level, raw_digest)
                    writer = ObservedWriter(sink, stored)
                    if recipients:
                        keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
                        _through_pyrage(pyrage.encrypt_io, reader, writer, keys)
                    else:
                        copy_stream(reader, writer)
            os.fsync(fh.fileno())
        rdb = checker.finish()
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        if follower is not None:
            follower.abandoned()
        raise StorageError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink_quietly(tmp)
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
    stored, raw, checker = Counter(), Counter(), RdbChecker()
    if encrypted and not identities:
        raise IntegrityError("the backup is encrypted and no identity was given")
    outputs: list[Observer] = [_fan_out(raw, checker.update)]
    if sink is not None:
        outputs.append(_FileSink(sink).write)
    recorded = _RecordedDigest(raw, trust_recorded)
    try:
        with contextlib.ExitStack() as stages:  # closing it waits for every stage to finish
            if not encrypted:
                outputs = [stages.enter_context(_Stage(output)) for output in outputs]
            if compression == "zstd" and not encrypted:
                hash_stored = stages.enter_context(_Stage(stored))

                def next_chunk() -> bytes:
                    chunk = source.read(READ_SIZE)
                    if chunk:
                        hash_stored(chunk)
                    return chunk

                decode_zstd_frames(next_chunk, _fan_out(*outputs),
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
                   stored: Counter, compression: str, encrypted: bool,
                   identities: Sequence[Any]) -> None:
    """The stored artifact decrypted and decompressed as one stream into `outputs`: the path
    of gzip, of no compression, and of everything encrypted (module docstring)."""
    raw_writer = ObservedWriter(None, *outputs)
    writer: Writable = raw_writer
    zstd_writer: Any = None
    zlib_writer: _ZlibWriter | None = None
    if compression == "zstd":
        writer = zstd_writer = zstandard.ZstdDecompressor().stream_writer(
            raw_writer, write_size=CHUNK, closefd=False)  # type: ignore[arg-type]
    elif compression == "gzip":
        writer = zlib_writer = _ZlibWriter(raw_writer)
    if encrypted:
        observed = ObservedReader(source, stored)  # hashed in READ_SIZE chunks,
        chunks = _Chunks(lambda: observed.read(READ_SIZE) or None)  # read in 8 KiB
        _through_pyrage(pyrage.decrypt_io, chunks, writer, list(identities))
    else:
        hash_stored = stages.enter_context(_Stage(stored))
        while chunk := source.read(READ_SIZE):
            hash_stored(chunk)
            writer.write(chunk)
    if zstd_writer is not None:
        zstd_writer.flush()
    if zlib_writer is not None:
        zlib_writer.finish()


def load_identities(path: str) -> list[Any]:
    """age identities (AGE-SECRET-KEY-1...) from a key file as written by age-keygen."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read identity file {path}: {exc}") from None
    identities = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                identities.append(pyrage.x25519.Identity.from_str(line))
            except Exception:  # pyrage raises IdentityError; never echo the key text
                raise IntegrityError(f"identity file {path} holds a line that is not an "
                                     "age identity (AGE-SECRET-KEY-1...)") from None
    if not identities:
        raise IntegrityError(f"identity file {path} holds no age identity")
    return identities


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, data: bytes, mode: int = 0o600) -> None:
    """Write small files (manifests, state) so that a crash leaves the old file or the new one."""
    tmp = dest.with_name(f".{dest.name}{TEMP_MARK}{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)
