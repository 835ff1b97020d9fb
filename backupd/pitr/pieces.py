"""The open segment in the bucket, in pieces: every pitr.upload_interval, the bytes made
durable since the previous piece, as a segment of their own (`ended` OPEN, `segment` naming
the open one). Each upload is only what is new, so a 64 MiB segment costs 64 MiB of uploads,
not the whole prefix again every interval. Pieces follow on (offsets, db) like segments do;
the segment, once closed and uploaded, covers them and they are deleted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backupd.errors import StorageError
from backupd.pitr.segments import SegmentMeta
from backupd.storage import layout
from backupd.streams import CHUNK


@dataclass
class _Sent:
    segment: str
    size: int  # bytes of the open segment already in pieces
    last: SegmentMeta | None  # the newest piece
    prefix: Any  # SHA-256 of those bytes: each new piece is checked to extend them


class Pieces:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._sent: _Sent | None = None
        self._pending: _Sent | None = None

    def next(self, durable: SegmentMeta | None) -> tuple[Path, int, SegmentMeta] | None:
        """(file, start, metadata) of the piece to upload now, or None when nothing is new.
        StorageError when the file no longer holds what was recorded durable."""
        if durable is None:
            return None
        sent = self._sent
        if sent is None or sent.segment != durable.stem:
            sent = _Sent(durable.stem, 0, None, hashlib.sha256())
        if durable.size <= sent.size:
            return None
        path = self.dir / (durable.stem + layout.SEGMENT_OPEN_EXT)
        piece_hash, prefix = hashlib.sha256(), sent.prefix.copy()
        _hash_range(path, sent.size, durable.size - sent.size, (piece_hash, prefix))
        if prefix.hexdigest() != durable.sha256:
            raise StorageError(f"segment {durable.stem} on disk no longer matches its "
                               "durable record")
        previous = sent.last
        stamps = [[sec, off, pos - sent.size] for sec, off, pos in durable.stamps
                  if pos >= sent.size]
        first_offset = durable.first_offset if previous is None else previous.last_offset + 1
        first_time = (durable.first_time if previous is None
                      else stamps[0][0] if stamps and stamps[0][2] == 0
                      else previous.last_time)
        meta = replace(durable, first_offset=first_offset, first_time=first_time,
                       size=durable.size - sent.size, sha256=piece_hash.hexdigest(),
                       db=durable.db if previous is None else previous.last_db,
                       stamps=stamps, segment=durable.stem)
        self._pending = _Sent(durable.stem, durable.size, meta, prefix)
        return path, sent.size, meta

    def uploaded(self) -> None:
        """The piece `next` gave is in the bucket: the next one starts after it."""
        self._sent = self._pending


def _hash_range(path: Path, start: int, length: int, hashers: tuple[Any, ...]) -> None:
    """Bytes [start, start + length) of `path` into every hasher, read as they are uploaded."""
    from backupd.storage.s3.multipart import FileRange

    try:
        with open(path, "rb") as fh:
            body = FileRange(fh.fileno(), start, length)
            while data := body.read(CHUNK):
                for hasher in hashers:
                    hasher.update(data)
    except OSError as exc:
        raise StorageError(f"cannot read segment {path}: {exc.strerror or exc}") from None
