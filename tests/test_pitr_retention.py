"""Retention with point-in-time chains: a base whose chain reaches into pitr.window is kept
whatever the backup policy says; pruning a base prunes its chain (segments never outlive
their base); a segment listing that fails deletes nothing."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

from backupd.actions.prune import Chains, prune_location
from backupd.errors import StorageError
from backupd.pitr.segments import ROTATED, SegmentMeta
from backupd.pitr.store import LocalSegments, SegmentListing
from backupd.retention import Policy
from tests.test_storage_rails import filled
from tests.test_storage_s3 import T0

NOW = T0 + timedelta(days=3)
WINDOW = timedelta(days=1)


def _segment(store: LocalSegments, base: str, first: int, last_time: float) -> SegmentMeta:
    data = store.dir.parent.parent / f"seg-{first}"
    data.write_bytes(b"#TS:1\r\n")

    meta = SegmentMeta(replid="cd" * 20, first_offset=first, last_offset=first + 9,
                       first_time=int(last_time) - 5, last_time=int(last_time), size=7,
                       sha256=hashlib.sha256(b"#TS:1\r\n").hexdigest(), base=base, db=0,
                       last_db=0, ended=ROTATED, stamps=[[int(last_time) - 5, first - 1, 0]])
    store.put_segment(data, meta)
    return meta


def test_a_base_inside_the_window_is_kept_and_an_old_chain_goes_with_its_base(
        tmp_path: Path) -> None:
    storage, mans = filled(tmp_path, 3)  # T0, T0+1h, T0+2h
    segs = LocalSegments(tmp_path / "backups")
    old = _segment(segs, mans[0].id, 1, (NOW - 2 * WINDOW).timestamp())
    live = _segment(segs, mans[1].id, 100, (NOW - timedelta(minutes=5)).timestamp())
    report = prune_location(storage, Policy(keep_last=1), now=NOW,
                            chains=Chains(segs, WINDOW))
    assert report.ok, report.failed
    assert report.deleted == [mans[0].id]  # the newest by policy, the live base by the window
    kept = {d.backup_id: d.reasons for d in report.decisions if d.keep}
    assert any("point-in-time base" in r for r in kept[mans[1].id])
    assert [m.stem for m in segs.listing().segments] == [live.stem]
    assert old.stem not in {m.stem for m in segs.listing().segments}


def test_segments_whose_base_is_gone_are_pruned(tmp_path: Path) -> None:
    storage, _ = filled(tmp_path, 2)
    segs = LocalSegments(tmp_path / "backups")
    _segment(segs, "20200101T000000Z-aaaaaa", 1, NOW.timestamp())
    prune_location(storage, Policy(keep_last=5), now=NOW, chains=Chains(segs, WINDOW))
    assert segs.listing().segments == []


class _Failing(LocalSegments):
    def listing(self) -> SegmentListing:
        raise StorageError("the segment listing failed")


def test_a_failed_segment_listing_deletes_nothing(tmp_path: Path) -> None:
    storage, _ = filled(tmp_path, 3)
    report = prune_location(storage, Policy(keep_last=1), now=NOW,
                            chains=Chains(_Failing(tmp_path / "b"), WINDOW))
    assert report.deleted == [] and "segments" in str(report.error)
    assert len(storage.listing().manifests) == 3
