"""Segments without a server: what goes into them (commands exactly as received, stamps
between transactions, no keepalives), their offsets, what a killed writer leaves (only what
was durable), the metadata's strict parsing, and the windows they make."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from backupd.errors import IntegrityError
from backupd.manifest import Manifest, RedisFacts
from backupd.pitr import windows
from backupd.pitr.commands import CommandSplitter
from backupd.pitr.segments import (
    LINK_DOWN,
    ROTATED,
    SegmentMeta,
    SegmentWriter,
    parse_meta,
    recover,
)
from backupd.storage import layout

REPLID = "ab" * 20
BASE = "20261203T120000Z-abcdef"


def resp(*args: str) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg.encode()), arg.encode())
    return out


def writer(directory: Path, closed: list[SegmentMeta] | None = None,
           **kwargs: float) -> SegmentWriter:
    got = closed if closed is not None else []
    return SegmentWriter(directory, base=BASE, replid=REPLID, offset=100, db=0,
                         fsync_every=kwargs.get("fsync_every", 0.0),
                         max_age=kwargs.get("max_age", 3600.0), closed=got.append)


def test_commands_are_kept_as_received_without_keepalives(tmp_path: Path) -> None:
    closed: list[SegmentMeta] = []
    w = writer(tmp_path, closed)
    ping, getack = resp("PING"), resp("REPLCONF", "GETACK", "*")
    stream = resp("SELECT", "3") + resp("SET", "k", "v\r\n#TS:99") + ping + getack + b"\n"
    w.feed(stream[:7], 1000.2)  # a command split over reads
    w.feed(stream[7:], 1000.5)
    assert w.acks == 1
    assert w.offset == 100 + len(stream)
    w.close(LINK_DOWN)
    meta = closed[0]
    data = (tmp_path / meta.data_name).read_bytes()
    assert data == b"#TS:1000\r\n" + resp("SELECT", "3") + resp("SET", "k", "v\r\n#TS:99")
    assert (meta.first_offset, meta.last_offset) == (101, 100 + len(stream))
    assert meta.sha256 == hashlib.sha256(data).hexdigest() and meta.last_db == 3
    assert meta.ended == LINK_DOWN
    assert not list(tmp_path.glob("*.open")) and not list(tmp_path.glob("*.progress"))


def test_no_stamp_inside_a_transaction_and_one_right_after(tmp_path: Path) -> None:
    closed: list[SegmentMeta] = []
    w = writer(tmp_path, closed)
    w.feed(resp("SET", "a", "1"), 1000.0)
    tx = resp("MULTI") + resp("SET", "b", "2") + resp("EXEC")
    w.feed(tx[:20], 1001.0)
    w.tick(1002.0)  # the idle second's stamp waits for the EXEC
    before = w.offset
    w.feed(tx[20:] + resp("SET", "c", "3"), 1003.0)
    assert before == 100 + len(resp("SET", "a", "1"))  # a transaction counts at its EXEC
    w.close(ROTATED)
    data = (tmp_path / closed[0].data_name).read_bytes()
    assert data == (b"#TS:1000\r\n" + resp("SET", "a", "1") + b"#TS:1001\r\n" + tx
                    + b"#TS:1003\r\n" + resp("SET", "c", "3"))
    positions = [st[2] for st in closed[0].stamps]
    assert [data[p:p + 4] for p in positions] == [b"#TS:"] * 3


def test_redis_check_aof_truncates_a_segment_to_a_timestamp(tmp_path: Path) -> None:
    check = shutil.which("redis-check-aof")
    if check is None:
        pytest.skip("redis-check-aof is not installed")
    closed: list[SegmentMeta] = []
    w = writer(tmp_path, closed)
    for second in range(1000, 1004):
        w.feed(resp("SET", f"k{second}", "v"), second + 0.5)
    w.close(ROTATED)
    path = tmp_path / closed[0].data_name
    ran = subprocess.run([check, "--truncate-to-timestamp", "1001", str(path)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert path.read_bytes() == b"".join(
        b"#TS:%d\r\n" % s + resp("SET", f"k{s}", "v") for s in (1000, 1001))


def test_a_killed_writer_keeps_exactly_what_was_durable(tmp_path: Path) -> None:
    w = writer(tmp_path, fsync_every=3600.0)
    w.feed(resp("SET", "a", "1"), 1000.0)
    w.sync()
    durable = w.offset
    w.feed(resp("SET", "b", "2"), 1001.0)  # written, never fsynced or recorded
    w.abandon()
    opened = next(tmp_path.glob("*.open"))
    with open(opened, "ab") as fh:
        fh.write(b"*3\r\n$3\r\nSE")  # and a torn tail
    [meta] = recover(tmp_path)
    assert meta.last_offset == durable and meta.ended == "backupd restart"
    assert (tmp_path / meta.data_name).read_bytes() == b"#TS:1000\r\n" + resp("SET", "a", "1")
    assert parse_meta((tmp_path / meta.meta_name).read_bytes(), meta.meta_name) == meta
    assert recover(tmp_path) == []  # committed: nothing left to recover


def test_a_segment_without_durable_record_is_discarded(tmp_path: Path) -> None:
    w = writer(tmp_path, fsync_every=3600.0)
    w.feed(resp("SET", "a", "1"), 1000.0)
    w.abandon()
    assert recover(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_a_progress_record_that_does_not_match_discards_the_segment(tmp_path: Path) -> None:
    w = writer(tmp_path, fsync_every=3600.0)
    w.feed(resp("SET", "a", "1"), 1000.0)
    w.sync()
    w.abandon()
    opened = next(tmp_path.glob("*.open"))
    opened.write_bytes(b"X" + opened.read_bytes()[1:])  # the durable part changed
    assert recover(tmp_path) == []


@pytest.mark.parametrize("change", [
    {"format": 2}, {"size": "1"}, {"base": "../x"}, {"stamps": [[1, 2]]}, {"first_offset": 5},
])
def test_metadata_is_parsed_strictly(tmp_path: Path, change: dict[str, object]) -> None:
    closed: list[SegmentMeta] = []
    w = writer(tmp_path, closed)
    w.feed(resp("SET", "a", "1"), 1000.0)
    w.close(ROTATED)
    raw = json.loads(closed[0].to_json())
    raw.update(change)
    with pytest.raises(IntegrityError):
        parse_meta(json.dumps(raw).encode(), closed[0].meta_name)


def test_segment_names_are_ours_only_when_exact() -> None:
    stem = layout.segment_stem(REPLID, 7)
    assert layout.segment_of(stem + ".json") == (REPLID, 7, ".json")
    for name in (stem + ".json.tmp", "x" + stem + ".resp", stem[:-1] + ".resp", "a/" + stem):
        assert layout.segment_of(name) is None
    with pytest.raises(ValueError, match="not a segment name"):
        layout.segment_stem("../etc", 1)


def test_splitter_refuses_what_is_not_resp() -> None:
    from backupd.errors import SnapshotError

    with pytest.raises(SnapshotError):
        CommandSplitter().feed(b"+OK\r\n")


def _base(offset: int = 100) -> Manifest:
    return Manifest(id=BASE, created_at="2026-12-03T12:00:00Z", trigger="pitr", tag="",
                    redis=RedisFacts(), rdb_version=10, rdb_checksum="ok", keys=0,
                    keys_per_db={}, raw_size=0, raw_sha256="0" * 64, stored_size=0,
                    stored_sha256="0" * 64, compression="none", encryption="none",
                    artifact=f"{BASE}.rdb",
                    replication={"master_replid": REPLID, "master_repl_offset": offset,
                                 "repl_offset_exact": True})


def _seg(first: int, last: int, t0: int, t1: int, ended: str = ROTATED) -> SegmentMeta:
    return SegmentMeta(replid=REPLID, first_offset=first, last_offset=last, first_time=t0,
                       last_time=t1, size=1, sha256="0" * 64, base=BASE, db=0, last_db=0,
                       ended=ended, stamps=[[t0, first - 1, 0]])


def test_windows_have_gaps_where_the_link_was_down() -> None:
    segs = [_seg(101, 200, 1000, 1010, LINK_DOWN), _seg(201, 300, 1030, 1040)]
    [chain] = windows.chains([_base()], segs)
    assert chain.pieces == [(1001, 1010), (1031, 1040)]
    assert chain.gaps == [windows.Gap(1010, 1031, "link down")]
    assert chain.covers(1005) and not chain.covers(1020) and not chain.covers(1031 - 1)


def test_a_missing_or_unusable_segment_ends_the_window() -> None:
    segs = [_seg(101, 200, 1000, 1010), _seg(251, 300, 1010, 1020)]
    [chain] = windows.chains([_base()], segs)
    assert chain.pieces == [(1001, 1010)] and "segment missing" in chain.ends_because
    segs = [_seg(101, 200, 1000, 1010), _seg(201, 300, 1010, 1020)]
    [chain] = windows.chains([_base()], segs, lambda s: "corrupt" if s.first_offset > 200
                             else "")
    assert chain.end == 1010 and "corrupt" in chain.ends_because
    [chain] = windows.chains([_base(offset=150)], segs)
    assert chain.pieces == [] and "segment missing" in chain.ends_because


def test_background_fsync_records_what_was_written_and_never_outlives_the_commit(
        tmp_path: Path) -> None:
    closed: list[SegmentMeta] = []
    w = SegmentWriter(tmp_path, base=BASE, replid=REPLID, offset=100, db=0, fsync_every=0.01,
                      max_age=3600.0, closed=closed.append, background=True)
    try:
        for i in range(200):
            w.feed(resp("SET", f"k{i}", "v" * 50), 1000.0 + i / 100)
        from tests.conftest import wait_until

        wait_until(lambda: w.durable is not None and w.durable.offset == w.offset, 10,
                   "the fsync thread's record")
        progress = json.loads(next(tmp_path.glob("*.progress")).read_text())
        data = next(tmp_path.glob("*.open")).read_bytes()
        assert progress["size"] == len(data)
        assert progress["sha256"] == hashlib.sha256(data).hexdigest()
        w.close(ROTATED)
    finally:
        w.stop()
    assert not list(tmp_path.glob("*.progress")) and closed[0].last_offset == w.offset
