"""Multi-frame zstd: compress and decompress independent frames on both cores.

A single zstd frame decompresses on one core only (about 1.0-1.2 s of CPU per GB of output on
the benchmark VM), the longest chain of the restore's staging. New artifacts are therefore a
sequence of independent frames of FRAME_SIZE bytes of input each: still one standard .zst
file (RFC 8878 allows any number of concatenated frames; `zstd -d` and every older backupd
read it). On the benchmark's 1 GB dataset they are as small as zstd's own multi-threaded
output at level 3 was (729.66 MB against 729.70 MB: its 2 MiB jobs lose history at their
edges too); data whose repetitions span more than a frame loses more (a synthetic 30 MB of
a 5000-word vocabulary: +3.9 %; 4 MiB frames would halve that for twice the memory).

Compression (`FramedCompressor`): the caller's thread reads the source (hashing and checking
the raw RDB as before) while COMPRESS_WORKERS threads compress the frames already read;
zstandard releases the GIL while it compresses. At most `IN_FLIGHT` frames are read ahead.

Decompression (`decode`): the frame boundaries are found without decompressing, by walking
each frame's header and its block headers (RFC 8878 sections 3.1.1 and 3.1.1.2); anything
malformed is an IntegrityError. A frame that declares its decompressed size, and a small one
(at most PARALLEL_MAX_OUTPUT), is decompressed whole by one of the worker threads; the results
go out in order. Any other frame (every artifact of older backupd versions is one frame of
unknown size) is decompressed in this thread as a stream, one block at a time, so that its
output comes in pieces of at most 128 KiB whatever the frame claims. Memory stays bounded
either way: a few frames of input and output, never a size taken from the file.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zstandard

from backupd.errors import IntegrityError
from backupd.runtime import keep_buffers
from backupd.streams import Readable

FRAME_SIZE = 2 << 20  # input bytes per frame written by FramedCompressor
COMPRESS_WORKERS = 2
DECOMPRESS_WORKERS = 2
IN_FLIGHT = 3  # frames submitted and not yet handed on (compressing or decompressing)
# A frame is decompressed whole, in a worker, only if it declares a size up to this one (and
# its compressed bytes stay under PARALLEL_MAX_INPUT); larger or unsized frames stream.
PARALLEL_MAX_OUTPUT = 16 << 20
PARALLEL_MAX_INPUT = PARALLEL_MAX_OUTPUT + (1 << 20)
SERIAL_OUTPUT = 1 << 20  # a streamed frame's output is handed on in pieces of about this size

MAGIC = b"\x28\xb5\x2f\xfd"  # 0xFD2FB528 little-endian
SKIPPABLE_MAGIC_LOW = 0x184D2A50  # ... to 0x184D2A5F
# backupd's own skippable frames (zstd -d and other readers skip them): the first frame of an
# artifact announces that its last frame records the RDB's size and SHA-256, so that a
# restore can trust the stored SHA-256 (which covers both) instead of hashing the RDB again.
BACKUPD_MAGIC = (SKIPPABLE_MAGIC_LOW | 0x0E).to_bytes(4, "little")
ANNOUNCE = b"backupd:frames:1:raw-digest-trailer"
DIGEST_TAG = b"backupd:raw-digest:"
BACKUPD_FRAME_MAX = 256  # larger skippable frames are never ours: skipped unread
BLOCK_MAX = 128 << 10  # Block_Maximum_Size can never exceed 128 KiB
_RAW, _RLE, _COMPRESSED = 0, 1, 2


def skippable_frame(payload: bytes) -> bytes:
    return BACKUPD_MAGIC + len(payload).to_bytes(4, "little") + payload


def digest_frame(size: int, sha256: bytes) -> bytes:
    return skippable_frame(DIGEST_TAG + size.to_bytes(8, "little") + sha256)


def parse_digest(payload: bytes) -> tuple[int, str] | None:
    """(size, hex SHA-256) from a digest frame's payload; None if it is not one."""
    if not payload.startswith(DIGEST_TAG) or len(payload) != len(DIGEST_TAG) + 8 + 32:
        return None
    body = payload[len(DIGEST_TAG):]
    return int.from_bytes(body[:8], "little"), body[8:].hex()


# -- compression ------------------------------------------------------------------------------


class FramedCompressor:
    """A reader of `source` compressed into independent zstd frames (each with its content size
    and checksum in the header), compressed by worker threads in parallel and returned in
    order. With `trailer` (called once the source is exhausted, returning the RDB's size and
    SHA-256), the output starts with the ANNOUNCE frame and ends with a digest frame."""

    def __init__(self, source: Readable, level: int, frame_size: int = FRAME_SIZE,
                 workers: int = COMPRESS_WORKERS,
                 trailer: Callable[[], tuple[int, bytes]] | None = None) -> None:
        keep_buffers()
        self._source = source
        self._trailer = trailer
        self._level = level
        self._frame_size = frame_size
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="zstd-compress")
        self._pending: collections.deque[Future[bytes]] = collections.deque()
        self._eof = False
        self._frames = 0
        self._out = skippable_frame(ANNOUNCE) if trailer is not None else b""
        self._pos = 0

    def _compress(self, data: bytes) -> bytes:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(
                level=self._level, write_content_size=True, write_checksum=True)
        return bytes(compressor.compress(data))

    def _read_frame(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < self._frame_size:
            data = self._source.read(self._frame_size - size)
            if not data:
                self._eof = True
                break
            parts.append(data)
            size += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fill(self) -> None:
        assert self._pool is not None
        while not self._eof and len(self._pending) < IN_FLIGHT:
            data = self._read_frame()
            if data or self._frames == 0:  # an empty input still makes one (empty) frame
                self._pending.append(self._pool.submit(self._compress, data))
                self._frames += 1

    def read(self, size: int = -1, /) -> bytes:
        while self._pos >= len(self._out):
            if self._pool is None and self._trailer is None:
                return b""
            self._fill()
            if not self._pending:
                self.close()
                if self._trailer is None:
                    return b""
                self._out, self._pos = digest_frame(*self._trailer()), 0
                self._trailer = None
                continue
            self._out, self._pos = self._pending.popleft().result(), 0
        end = len(self._out) if size is None or size < 0 else self._pos + size
        data = self._out[self._pos:end]
        self._pos += len(data)
        return data

    def close(self) -> None:
        """Stop the workers (at the end, or when the caller gives up: pack() failed)."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            pool.shutdown(wait=False)
            self._pool = None

    def __del__(self) -> None:
        self.close()


# -- decompression ----------------------------------------------------------------------------


class _Input:
    """Exact reads over the chunks of a stream."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next_chunk = next_chunk
        self._chunk = memoryview(b"")
        self._pos = 0
        self._ended = False
        self.offset = 0  # bytes consumed so far, for messages

    def at_end(self) -> bool:
        while self._pos >= len(self._chunk):
            if self._ended:
                return True
            chunk = self._next_chunk()
            if not chunk:
                self._ended = True
                return True
            self._chunk, self._pos = memoryview(chunk), 0
        return False

    def take(self, size: int, what: str) -> bytes | memoryview:
        """Exactly `size` bytes (a view into the chunk when it holds them all); IntegrityError
        (truncated) when the stream ends first."""
        if self._pos + size <= len(self._chunk):
            data = self._chunk[self._pos:self._pos + size]
            self._pos += size
            self.offset += size
            return data
        parts: list[memoryview] = []
        need = size
        while need:
            if self.at_end():
                raise IntegrityError(f"the zstd stream is truncated (in the {what} at byte "
                                     f"{self.offset})")
            piece = self._chunk[self._pos:self._pos + need]
            self._pos += len(piece)
            self.offset += len(piece)
            need -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def skip(self, size: int, what: str) -> None:
        while size:
            if self.at_end():
                raise IntegrityError(f"the zstd stream is truncated (in the {what} at byte "
                                     f"{self.offset})")
            step = min(size, len(self._chunk) - self._pos)
            self._pos += step
            self.offset += step
            size -= step


class _Header:
    __slots__ = ("checksum", "content_size", "raw")

    def __init__(self, raw: bytes, content_size: int | None, checksum: bool) -> None:
        self.raw = raw  # magic included
        self.content_size = content_size
        self.checksum = checksum


def _frame_header(source: _Input, magic: bytes | memoryview) -> _Header:
    """The rest of a frame header after its magic number (RFC 8878 3.1.1.1)."""
    start = source.offset - 4
    descriptor = source.take(1, "frame header")[0]
    if descriptor & 0x08:
        raise IntegrityError(f"the zstd frame at byte {start} sets a reserved header bit")
    single_segment = bool(descriptor & 0x20)
    fcs_flag = descriptor >> 6
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    did_size = (0, 1, 2, 4)[descriptor & 0x03]
    rest = source.take((0 if single_segment else 1) + did_size + fcs_size, "frame header")
    if not single_segment and (rest[0] >> 3) + 10 > 31:  # Exponent + 10 = windowLog
        raise IntegrityError(f"the zstd frame at byte {start} claims an impossible window")
    content_size = None
    if fcs_size:
        content_size = int.from_bytes(rest[len(rest) - fcs_size:], "little")
        if fcs_size == 2:
            content_size += 256
    raw = bytes(magic) + bytes([descriptor]) + bytes(rest)
    return _Header(raw, content_size, bool(descriptor & 0x04))


def _blocks(source: _Input, start: int) -> Any:
    """Yield (block header, block content) up to and including the last block."""
    while True:
        header = source.take(3, "block header")
        value = int.from_bytes(header, "little")
        kind = (value >> 1) & 0x03
        size = value >> 3
        if kind == 3:
            raise IntegrityError(f"the zstd frame at byte {start} has a block of the reserved "
                                 "type")
        if size > BLOCK_MAX:
            raise IntegrityError(f"the zstd frame at byte {start} has a block of {size} bytes "
                                 f"(at most {BLOCK_MAX})")
        yield header, source.take(1 if kind == _RLE else size, "block")
        if value & 1:
            return


class _Decompressors:
    """One ZstdDecompressor per worker thread (they are not thread-safe)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def whole(self, frame: bytes, size: int) -> bytes:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        if size == 0:
            # zstandard returns b"" for a declared size of 0 without looking at the blocks
            obj = decompressor.decompressobj()
            data = obj.decompress(frame)
            if data or not obj.eof or obj.unused_data:
                raise IntegrityError("a zstd frame declared empty is not")
            return b""
        try:
            data = decompressor.decompress(frame)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"the zstd stream is corrupt: {exc}") from None
        if len(data) != size:
            raise IntegrityError("a zstd frame decompressed to another size than it declares")
        return bytes(data)


def decode(next_chunk: Callable[[], bytes], emit: Callable[[bytes], Any],
           workers: int = DECOMPRESS_WORKERS,
           on_backupd_frame: Callable[[bytes], Any] | None = None) -> int:
    """Decompress the zstd stream read with `next_chunk` (b"" at the end) and pass its output,
    in order, to `emit`; the payloads of backupd's skippable frames go to `on_backupd_frame`,
    in stream order with the output. Returns the number of frames; IntegrityError for any
    malformed, truncated or corrupt frame, for trailing bytes that are not a frame, and for
    no frame."""
    keep_buffers()
    source = _Input(next_chunk)
    decompressors = _Decompressors()
    pending: collections.deque[Future[bytes]] = collections.deque()
    frames = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zstd-decompress") as pool:
        try:
            while not source.at_end():
                start = source.offset
                magic = source.take(4, "frame magic")
                number = int.from_bytes(magic, "little")
                if number & 0xFFFFFFF0 == SKIPPABLE_MAGIC_LOW:
                    size = int.from_bytes(source.take(4, "skippable frame"), "little")
                    if magic != BACKUPD_MAGIC or size > BACKUPD_FRAME_MAX \
                            or on_backupd_frame is None:
                        source.skip(size, "skippable frame")
                        continue
                    payload = bytes(source.take(size, "skippable frame"))
                    while pending:  # in order: everything before this frame first
                        emit(pending.popleft().result())
                    on_backupd_frame(payload)
                    continue
                if magic != MAGIC:
                    raise IntegrityError(f"no zstd frame at byte {start} (unknown magic "
                                         f"{magic.hex()})")
                header = _frame_header(source, magic)
                frames += 1
                declared = header.content_size
                if declared is not None and declared <= PARALLEL_MAX_OUTPUT:
                    parts: list[bytes | memoryview] = [header.raw]
                    length = len(header.raw)
                    for block_header, content in _blocks(source, start):
                        parts += (block_header, content)
                        length += 3 + len(content)
                        if length > PARALLEL_MAX_INPUT:
                            raise IntegrityError(f"the zstd frame at byte {start} is larger "
                                                 "than its declared content can be")
                    if header.checksum:
                        parts.append(source.take(4, "frame checksum"))
                    pending.append(pool.submit(decompressors.whole, b"".join(parts), declared))
                    while len(pending) >= IN_FLIGHT:
                        emit(pending.popleft().result())
                else:
                    while pending:  # in order: everything before this frame first
                        emit(pending.popleft().result())
                    _stream_frame(source, header, start, emit)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        while pending:
            emit(pending.popleft().result())
    if frames == 0:
        raise IntegrityError("the zstd stream holds no frame")
    return frames


def _stream_frame(source: _Input, header: _Header, start: int,
                  emit: Callable[[bytes], Any]) -> None:
    """Decompress one frame in this thread, block by block (at most 128 KiB out per block)."""
    obj = zstandard.ZstdDecompressor().decompressobj()
    out: list[bytes] = []
    size = 0
    produced = 0
    try:
        obj.decompress(header.raw)
        for block_header, content in _blocks(source, start):
            data = obj.decompress(bytes(block_header) + bytes(content))
            if data:
                out.append(data)
                size += len(data)
                if size >= SERIAL_OUTPUT:
                    emit(b"".join(out))
                    produced += size
                    out, size = [], 0
        if header.checksum:
            obj.decompress(source.take(4, "frame checksum"))
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"the zstd stream is corrupt: {exc}") from None
    if out:
        emit(b"".join(out))
        produced += size
    if not obj.eof or obj.unused_data:
        raise IntegrityError(f"the zstd frame at byte {start} did not end where its last "
                             "block does")
    if header.content_size is not None and produced != header.content_size:
        raise IntegrityError(f"the zstd frame at byte {start} decompressed to another size "
                             "than it declares")
