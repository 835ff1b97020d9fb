"""The open segment in the bucket in pieces: each only the bytes made durable since the last,
following on like segments, and gone once the closed segment is there (real SegmentWriter
files, S3 through moto's in-process mock)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from moto import mock_aws

from backupd.errors import StorageError
from backupd.pitr import windows
from backupd.pitr.link import upload_missing
from backupd.pitr.pieces import Pieces
from backupd.pitr.segments import LINK_DOWN, SegmentMeta
from backupd.pitr.store import LocalSegments, S3Segments
from backupd.storage.s3 import S3Storage
from tests.test_pitr_segments import _base, resp, writer
from tests.test_storage_s3 import BUCKET, storage_for


@pytest.fixture
def remote(no_aws_config: None) -> Iterator[S3Segments]:
    with mock_aws():
        storage: S3Storage = storage_for()
        storage.client.create_bucket(Bucket=BUCKET)
        yield S3Segments(storage)


def part_keys(remote: S3Segments) -> list[str]:
    s3 = remote._s3
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=remote.prefix)
    return [o["Key"] for o in listed.get("Contents", []) if ".part" in o["Key"]]


def upload(remote: S3Segments, pieces: Pieces, durable: SegmentMeta | None) -> SegmentMeta:
    piece = pieces.next(durable)
    assert piece is not None
    remote.put_part(*piece)
    pieces.uploaded()
    return piece[2]


def test_each_piece_holds_only_what_is_new_and_they_follow_on(
        tmp_path: Path, remote: S3Segments) -> None:
    closed: list[SegmentMeta] = []
    w = writer(tmp_path, closed)
    pieces = Pieces(tmp_path)
    w.feed(resp("SET", "a", "1") + resp("SELECT", "2"), 1000.1)
    w.sync()
    first = upload(remote, pieces, w.partial)
    assert pieces.next(w.partial) is None  # nothing new: no upload
    w.feed(resp("SET", "b", "2"), 1001.5)
    w.tick(1002.0)
    w.sync()
    second = upload(remote, pieces, w.partial)

    assert w.partial is not None
    opened = (tmp_path / (w.partial.stem + ".open")).read_bytes()
    assert first.size + second.size == w.partial.size == len(opened)
    assert (second.first_offset, second.db) == (first.last_offset + 1, 2)
    assert (first.last_time, second.first_time) == (1000, 1001)  # it starts with #TS:1001
    assert [st[0] for st in second.stamps] == [1001, 1002]
    listing = remote.listing()
    assert [m.stem for m in listing.segments] == [first.stem, second.stem]
    joined = b""
    for meta in listing.segments:
        with remote.open_segment(meta) as fh:
            joined += fh.read()
    assert joined == opened
    [chain] = windows.chains([_base()], listing.segments)
    assert chain.pieces == [(1001, 1002)] and not chain.gaps and not chain.ends_because

    meta = w.close(LINK_DOWN)
    assert meta is not None
    remote.put_segment(tmp_path / meta.data_name, meta)
    assert part_keys(remote) == []
    assert [m.stem for m in remote.listing().segments] == [meta.stem]


def test_a_closed_segment_hides_pieces_left_behind(tmp_path: Path,
                                                   remote: S3Segments) -> None:
    """A piece whose deletion failed (or a killed backupd's) never counts twice."""
    closed: list[SegmentMeta] = []
    w = writer(tmp_path, closed)
    pieces = Pieces(tmp_path)
    w.feed(resp("SET", "a", "1"), 1000.1)
    w.sync()
    upload(remote, pieces, w.partial)
    w.feed(resp("SET", "b", "2"), 1001.1)
    w.sync()
    upload(remote, pieces, w.partial)
    meta = w.close(LINK_DOWN)
    assert meta is not None
    s3 = remote._s3
    s3.client.put_object(Bucket=s3.bucket, Key=remote.prefix + meta.data_name,
                         Body=(tmp_path / meta.data_name).read_bytes())
    s3.client.put_object(Bucket=s3.bucket, Key=remote.prefix + meta.meta_name,
                         Body=meta.to_json())
    assert len(part_keys(remote)) == 4
    assert [m.stem for m in remote.listing().segments] == [meta.stem]
    assert remote.delete_segments([meta]) == []
    assert part_keys(remote) == [] and remote.listing().segments == []


def test_a_file_that_no_longer_matches_its_durable_record_is_not_uploaded(
        tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.feed(resp("SET", "a", "1"), 1000.1)
    w.sync()
    assert w.partial is not None
    path = tmp_path / (w.partial.stem + ".open")
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="no longer matches its durable record"):
        Pieces(tmp_path).next(w.partial)


def test_a_segment_closed_while_its_pieces_are_in_the_bucket_is_still_uploaded(
        tmp_path: Path, remote: S3Segments) -> None:
    """The catch-up after a failed upload: the first piece has the segment's name, but it
    is not the segment."""
    local = LocalSegments(tmp_path)
    w = writer(local.dir)
    pieces = Pieces(local.dir)
    w.feed(resp("SET", "a", "1"), 1000.1)
    w.sync()
    upload(remote, pieces, w.partial)
    meta = w.close(LINK_DOWN)
    assert meta is not None
    assert upload_missing(local, remote) == [meta.stem]
    assert part_keys(remote) == []
    assert [(m.stem, m.ended) for m in remote.listing().segments] == [(meta.stem, LINK_DOWN)]
