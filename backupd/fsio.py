"""Writing files: one atomic writer for everything backupd writes, and the paced file sink of
the pipeline.

`atomic_file` is the only way a file of backupd's appears under its final name: written to a
temp file in the same directory (created with O_EXCL, mode 0600 unless told otherwise),
fsynced, renamed over the destination and the directory fsynced, so that a crash leaves the
old file or the new one, never a part; on any error the temp file is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from backupd.storage import layout
from backupd.streams import Writable

# write() calls of at most 128 KiB, like cp and cat: large writes into new page-cache pages
# cost several times the kernel CPU of small ones (docs/benchmarks.md).
WRITE_SIZE = 128 * 1024
# Start the writeback of every 8 MiB written, so that the final fsync waits for the last few
# MiB only instead of the whole file.
WRITEBACK_EVERY = 8 << 20


@contextlib.contextmanager
def atomic_file(dest: Path, mode: int = 0o600, *, readable: bool = False) -> Iterator[BinaryIO]:
    """An unbuffered new file that appears at `dest` when the block ends without an error
    (module docstring). `readable`: opened read-write, for a reader that follows the writes
    through the descriptor. Write with `write_all`: a raw file may write less than asked."""
    tmp = dest.with_name(layout.temp_name(dest.name, secrets.token_hex(4)))
    try:
        access = os.O_RDWR if readable else os.O_WRONLY
        fd = os.open(tmp, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(fd, "wb", buffering=0) as fh:
            yield fh
            os.fsync(fh.fileno())
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(dest: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a small file (a manifest, the state file) with `atomic_file`."""
    with atomic_file(dest, mode) as fh:
        write_all(fh, data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(target: Writable, data: bytes | memoryview) -> None:
    """Write in WRITE_SIZE pieces, resuming after short writes (raw files)."""
    view = memoryview(data)
    while view:
        written = target.write(view[:WRITE_SIZE])
        view = view[written if isinstance(written, int) else WRITE_SIZE:]


class FileSink:
    """Writes to `target` in WRITE_SIZE pieces. When `target` is a regular file, it also starts
    the kernel's writeback of every WRITEBACK_EVERY bytes while the rest is still being
    computed (sync_file_range: start, do not wait, keep the pages cached), so that the
    caller's fsync waits for the last few MiB only. `on_written` hears the byte count after
    each write (`target` must then be unbuffered: the bytes are in the file when it hears)."""

    def __init__(self, target: Writable, on_written: Callable[[int], None] | None = None) -> None:
        self._target = target
        self._on_written = on_written
        self._fd = _regular_file(target)
        self._written = self._started = 0
        self._base = os.lseek(self._fd, 0, os.SEEK_CUR) if self._fd is not None else 0

    def write(self, data: bytes | memoryview, /) -> int:
        write_all(self._target, data)
        self._written += len(data)
        if self._on_written is not None:
            self._on_written(self._written)
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
