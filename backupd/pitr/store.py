"""Closed segments where they are kept: the backup directory's `pitr/` and the bucket's
`<prefix>pitr/`, with the names of storage/layout.py (nothing else there is listed, opened or
deleted). The metadata is written last, in both: a segment without it does not exist."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from backupd.errors import IntegrityError, StorageError
from backupd.fsio import atomic_file, write_all
from backupd.pitr.segments import MAX_META_BYTES, OPEN, SegmentMeta, parse_meta
from backupd.storage import layout
from backupd.streams import CHUNK

if TYPE_CHECKING:
    from backupd.storage.s3 import S3Storage

META_READERS = 8


@dataclass
class SegmentListing:
    segments: list[SegmentMeta] = field(default_factory=list)  # by (replid, first offset)
    broken: dict[str, str] = field(default_factory=dict)  # name -> why
    sizes: dict[str, int] = field(default_factory=dict)  # data name -> stored size


class SegmentStore(Protocol):
    name: str

    def listing(self) -> SegmentListing: ...

    def open_segment(self, meta: SegmentMeta) -> contextlib.AbstractContextManager[BinaryIO]:
        ...

    def put_segment(self, data: Path, meta: SegmentMeta) -> None: ...

    def delete_segments(self, metas: Iterable[SegmentMeta]) -> list[str]:
        """Delete segments, metadata first; returns the stems that could not be deleted."""
        ...


class LocalSegments:
    name = "local"

    def __init__(self, backup_dir: Path) -> None:
        self.dir = backup_dir / layout.SEGMENT_DIR

    def listing(self) -> SegmentListing:
        out = SegmentListing()
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        except OSError as exc:
            raise StorageError(f"cannot list {self.dir}: {exc.strerror}") from None
        present = set(names)
        for name in names:
            parsed = layout.segment_of(name)
            if parsed is None or parsed[2] != layout.SEGMENT_META_EXT:
                continue
            try:
                with open(self.dir / name, "rb") as fh:
                    meta = parse_meta(fh.read(MAX_META_BYTES), name)
            except (OSError, IntegrityError) as exc:
                out.broken[name] = str(getattr(exc, "strerror", None) or exc)
                continue
            if meta.data_name not in present:
                out.broken[name] = f"{meta.data_name} is missing"
                continue
            out.sizes[meta.data_name] = (self.dir / meta.data_name).stat().st_size
            out.segments.append(meta)
        out.segments.sort(key=lambda m: (m.replid, m.first_offset))
        return out

    @contextlib.contextmanager
    def open_segment(self, meta: SegmentMeta) -> Iterator[BinaryIO]:
        try:
            fh = open(self.dir / meta.data_name, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise StorageError(f"cannot open segment {meta.stem}: {exc.strerror}") from None
        with fh:
            yield fh

    def put_segment(self, data: Path, meta: SegmentMeta) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dest = self.dir / meta.data_name
        if data.resolve() != dest.resolve():
            with open(data, "rb") as src, atomic_file(dest) as out:
                while chunk := src.read(CHUNK):
                    write_all(out, chunk)
        with atomic_file(self.dir / meta.meta_name) as out:
            write_all(out, meta.to_json())

    def delete_segments(self, metas: Iterable[SegmentMeta]) -> list[str]:
        failed = []
        for meta in metas:
            try:
                (self.dir / meta.meta_name).unlink(missing_ok=True)
                (self.dir / meta.data_name).unlink(missing_ok=True)
            except OSError:
                failed.append(meta.stem)
        return failed


class S3Segments:
    name = "s3"

    def __init__(self, storage: S3Storage) -> None:
        self._s3 = storage
        self.prefix = storage.prefix + layout.SEGMENT_DIR + "/"

    def _keys(self) -> dict[str, int]:
        s3 = self._s3
        found: dict[str, int] = {}
        try:
            paginator = s3.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=s3.bucket, Prefix=self.prefix,
                                           Delimiter="/"):
                for obj in page.get("Contents", []):
                    name = obj.get("Key", "")[len(self.prefix):]
                    if layout.segment_of(name) is not None:
                        found[name] = int(obj.get("Size", 0))
        except _boto_errors() as exc:
            raise s3.reasons.error(f"cannot list the segments in bucket {s3.bucket}",
                                   exc) from None
        return found

    def listing(self) -> SegmentListing:
        """Closed segments, and the uploaded pieces of an open one that no closed segment
        covers (they end the window where the last one ends)."""
        out = SegmentListing()
        keys = self._keys()
        metas = [n for n in keys
                 if _ext(n) in (layout.SEGMENT_META_EXT, layout.SEGMENT_PART_META_EXT)]
        with ThreadPoolExecutor(max_workers=META_READERS) as pool:
            results = list(pool.map(self._read_meta, metas))
        closed = [m for m in results if isinstance(m, SegmentMeta) and m.ended != OPEN]
        for name, got in zip(metas, results, strict=True):
            if isinstance(got, str):
                out.broken[name] = got
            elif got.ended == OPEN and any(covers(c, got) for c in closed):
                continue  # its segment closed: the piece is a leftover
            elif got.data_name not in keys:
                out.broken[name] = f"{got.data_name} is missing"
            else:
                out.sizes[got.data_name] = keys[got.data_name]
                out.segments.append(got)
        out.segments.sort(key=lambda m: (m.replid, m.first_offset))
        return out

    def _read_meta(self, name: str) -> SegmentMeta | str:
        s3 = self._s3
        try:
            body = s3.client.get_object(Bucket=s3.bucket, Key=self.prefix + name)["Body"]
            try:
                data = body.read(MAX_META_BYTES)
            finally:
                body.close()
            return parse_meta(data, name)
        except IntegrityError as exc:
            return str(exc)
        except _boto_errors() as exc:
            return s3.reasons.reason(exc, self.prefix + name)

    @contextlib.contextmanager
    def open_segment(self, meta: SegmentMeta) -> Iterator[BinaryIO]:
        with self._s3._open(self.prefix + meta.data_name, meta.stem) as fh:
            yield fh

    def put_segment(self, data: Path, meta: SegmentMeta) -> None:
        s3 = self._s3
        args: dict[str, Any] = s3.object_args(meta.base, meta.sha256)
        key = self.prefix + meta.data_name
        try:
            with open(data, "rb") as fh:
                s3.client.put_object(Bucket=s3.bucket, Key=key, Body=fh, **args)
            s3.client.put_object(Bucket=s3.bucket, Key=self.prefix + meta.meta_name,
                                 Body=meta.to_json(), ContentType="application/json",
                                 **{k: v for k, v in args.items() if k != "Metadata"})
        except OSError as exc:
            raise StorageError(f"cannot read segment {data}: {exc.strerror}") from None
        except _boto_errors() as exc:
            raise s3.reasons.error(f"upload of segment {meta.stem} failed", exc, key) from None
        if meta.ended != OPEN:
            self._forget_part(meta)

    def put_part(self, opened: Path, start: int, meta: SegmentMeta) -> None:
        """A piece of the open segment (`meta.size` bytes of `opened` from `start`, streamed
        from the file), then its metadata: a restore from the bucket alone reaches this far."""
        from backupd.storage.s3.multipart import FileRange

        s3 = self._s3
        key = self.prefix + meta.data_name
        args: dict[str, Any] = s3.object_args(meta.base, meta.sha256)
        try:
            with open(opened, "rb") as fh:
                body: dict[str, Any] = {"Body": FileRange(fh.fileno(), start, meta.size),
                                        "ContentLength": meta.size}
                s3.client.put_object(Bucket=s3.bucket, Key=key, **body, **args)
            s3.client.put_object(Bucket=s3.bucket, Key=self.prefix + meta.meta_name,
                                 Body=meta.to_json(), ContentType="application/json",
                                 **{k: v for k, v in args.items() if k != "Metadata"})
        except OSError as exc:
            raise StorageError(f"cannot read segment {opened}: {exc.strerror or exc}") from None
        except _boto_errors() as exc:
            raise s3.reasons.error(f"upload of the open segment {meta.segment} failed", exc,
                                   key) from None

    def _forget_part(self, meta: SegmentMeta, keys: Iterable[str] | None = None) -> None:
        """The pieces of a segment now closed in the bucket (best effort: they no longer
        count once it is there)."""
        s3 = self._s3
        try:
            names = self._keys() if keys is None else keys
        except StorageError:
            return
        for name in names:
            parsed = layout.segment_of(name)
            if parsed is not None and parsed[2] in (
                    layout.SEGMENT_PART_META_EXT, layout.SEGMENT_PART_EXT) and _holds(
                    meta, parsed[0], parsed[1]):
                with contextlib.suppress(*_boto_errors()):
                    s3.client.delete_object(Bucket=s3.bucket, Key=self.prefix + name)

    def delete_segments(self, metas: Iterable[SegmentMeta]) -> list[str]:
        s3 = self._s3
        failed = []
        try:
            keys = list(self._keys())
        except StorageError:
            keys = []  # pieces left over: hidden by their closed segment, or baseless
        for meta in metas:
            try:
                for name in (meta.meta_name, meta.data_name):
                    s3.client.delete_object(Bucket=s3.bucket, Key=self.prefix + name)
                self._forget_part(meta, keys)
            except _boto_errors():
                failed.append(meta.stem)
        return failed


def covers(closed: SegmentMeta, piece: SegmentMeta) -> bool:
    """The closed segment holds the piece's bytes (the piece then no longer counts)."""
    return _holds(closed, piece.replid, piece.first_offset)


def _holds(closed: SegmentMeta, replid: str, offset: int) -> bool:
    return closed.replid == replid and closed.first_offset <= offset <= max(
        closed.first_offset, closed.last_offset)


def _ext(name: str) -> str:
    parsed = layout.segment_of(name)
    return parsed[2] if parsed is not None else ""


def _boto_errors() -> tuple[type[BaseException], ...]:
    from backupd.storage.s3.errors import BOTO_ERRORS

    return BOTO_ERRORS


def stores(config: Any, location: str = "all",
           env: Any = None) -> list[SegmentStore]:
    """The segment stores of a configuration: local, and S3 when configured."""
    found: list[SegmentStore] = []
    if location in ("all", "local"):
        found.append(LocalSegments(Path(config.backup.dir)))
    if location in ("all", "s3") and config.s3.enabled:
        from backupd.storage.s3 import S3Storage

        found.append(S3Segments(S3Storage(config.s3, env)))
    return found
