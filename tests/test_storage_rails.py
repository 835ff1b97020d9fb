"""What sits on top of a storage, on MemoryStorage (milliseconds, faults on demand): the safety
rails of retention, the catch-up of pending uploads, and choosing a backup from listings.
The end-to-end tests (test_offsite.py, the fault suite) run the same paths on real backends."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from backupd.actions.catalog import catalog, lookup
from backupd.actions.prune import ORPHAN_MIN_AGE, prune_location
from backupd.actions.restore.staging import _tolerant_catalog
from backupd.actions.upload import DONE, PENDING, pending, upload_pending
from backupd.errors import BackupdError, BackupMissing, IntegrityError, StorageError
from backupd.manifest import Manifest
from backupd.retention import Policy
from backupd.storage import layout
from backupd.storage.local import LocalStorage
from tests.memory_storage import MemoryStorage
from tests.test_storage_s3 import T0, make_backup

KEEP_2 = Policy(keep_last=2)
NOW = T0 + timedelta(days=3)


def filled(tmp_path: Path, count: int, name: str = "memory", upload: str = DONE
           ) -> tuple[MemoryStorage, list[Manifest]]:
    """A storage holding `count` backups an hour apart, oldest first in the returned list."""
    store = MemoryStorage(name, now=T0)
    manifests = []
    for i in range(count):
        path, man = make_backup(tmp_path, 100, T0 + timedelta(hours=i))
        man = man.with_upload(upload)
        store.put(path, man)
        manifests.append(man)
    store.calls.clear()
    return store, manifests


# -- retention's rails ---------------------------------------------------------------------


def test_prune_deletes_what_the_policy_drops(tmp_path: Path) -> None:
    store, mans = filled(tmp_path, 4)
    report = prune_location(store, KEEP_2, now=NOW)
    assert report.ok and sorted(report.deleted) == sorted(m.id for m in mans[:2])
    assert store.listing().manifests == mans[:1:-1]


def test_a_failed_listing_deletes_nothing(tmp_path: Path) -> None:
    store, _ = filled(tmp_path, 4)
    store.faults.listing = StorageError("S3: cannot list bucket b prefix 'p/': boom")
    report = prune_location(store, KEEP_2, now=NOW)
    assert report.error is not None and "cannot list backups, nothing deleted" in report.error
    assert not report.ok and report.deleted == []
    assert not any(c.startswith("delete") for c in store.calls)


def test_an_incomplete_listing_deletes_nothing(tmp_path: Path) -> None:
    store, mans = filled(tmp_path, 4)
    store.faults.incomplete = True
    report = prune_location(store, KEEP_2, now=NOW)
    assert report.error == "the listing may be incomplete, nothing deleted"
    assert not any(c.startswith("delete") for c in store.calls)
    store.faults.incomplete = False
    store.faults.unreadable = {mans[3].id}  # one manifest could not be read: same rail
    report = prune_location(store, KEEP_2, now=NOW)
    assert report.error == "the listing may be incomplete, nothing deleted"
    assert len(store.objects) == 8


def test_a_dry_run_deletes_nothing(tmp_path: Path) -> None:
    store, mans = filled(tmp_path, 4)
    report = prune_location(store, KEEP_2, now=NOW, dry_run=True)
    assert [d.backup_id for d in report.decisions if not d.keep] == [m.id for m in mans[1::-1]]
    assert report.deleted == [] and len(store.objects) == 8


def test_pending_local_backups_are_kept_but_not_pending_remote_ones(tmp_path: Path) -> None:
    local, mans = filled(tmp_path, 3, name="local", upload=PENDING)
    report = prune_location(local, Policy(keep_last=1), now=NOW)
    assert report.ok and report.deleted == []
    assert [d.reasons for d in report.decisions] == [("last",), ("upload pending",),
                                                     ("upload pending",)]
    remote, mans = filled(tmp_path, 3, name="s3", upload=PENDING)
    assert sorted(prune_location(remote, Policy(keep_last=1), now=NOW).deleted) == sorted(
        m.id for m in mans[:2])


def test_locked_backups_are_reported_not_failed(tmp_path: Path) -> None:
    store, mans = filled(tmp_path, 3)
    store.faults.locked = {mans[0].id}
    report = prune_location(store, KEEP_2, now=NOW)
    assert report.ok and report.locked == [mans[0].id] and report.deleted == []
    assert mans[0] in store.listing().manifests


def test_a_refused_delete_fails_the_prune_and_keeps_the_backup(tmp_path: Path) -> None:
    store, mans = filled(tmp_path, 4)
    store.faults.delete = {mans[0].id: "AccessDenied"}
    report = prune_location(store, KEEP_2, now=NOW)
    assert not report.ok and report.failed == {mans[0].id: "AccessDenied"}
    assert report.deleted == [mans[1].id]
    assert mans[0] in store.listing().manifests


def test_only_old_orphans_are_deleted_and_only_when_asked(tmp_path: Path) -> None:
    store, mans = filled(tmp_path, 2)
    old, young = (layout.temp_name(layout.artifact_name(m.id, "zstd", True), "x") for m in mans)
    store.place(old, b"half", modified=NOW - ORPHAN_MIN_AGE - timedelta(minutes=1))
    store.place(young, b"in flight", modified=NOW - timedelta(minutes=5))
    report = prune_location(store, KEEP_2, now=NOW)
    assert report.orphans_deleted == [] and {o.name for o in report.orphans} == {old, young}
    report = prune_location(store, KEEP_2, now=NOW, orphans=True)
    assert report.ok and report.orphans_deleted == [old]
    assert [o.name for o in store.listing().orphans] == [young]


# -- pending uploads -----------------------------------------------------------------------


def local_with_pending(tmp_path: Path, count: int) -> tuple[LocalStorage, list[Manifest]]:
    directory = tmp_path / "backups"
    directory.mkdir()
    local = LocalStorage(directory)
    mans = []
    for i in range(count):
        path, man = make_backup(directory, 100, T0 + timedelta(hours=i))
        local.write_manifest(man.with_upload(PENDING))
        mans.append(man.with_upload(PENDING))
        assert path == local.artifact_path(man)
    return local, mans


def test_pending_uploads_go_oldest_first_and_are_marked_done(tmp_path: Path) -> None:
    local, mans = local_with_pending(tmp_path, 3)
    remote = MemoryStorage("s3")
    result = upload_pending(local, remote)
    assert result.uploaded == [m.id for m in mans] and result.failed == {}
    assert remote.calls == [f"put {m.id}" for m in mans]
    assert pending(local) == []
    assert [m.upload for m in remote.listing().manifests] == [DONE] * 3
    assert all(local.read_manifest(m.id).upload == DONE for m in mans)


def test_one_failed_upload_stays_pending_and_does_not_stop_the_others(tmp_path: Path) -> None:
    local, mans = local_with_pending(tmp_path, 3)
    remote = MemoryStorage("s3")
    remote.faults.put = {mans[1].id: StorageError("S3: upload failed: InternalError")}
    result = upload_pending(local, remote)
    assert result.uploaded == [mans[0].id, mans[2].id]
    assert list(result.failed) == [mans[1].id] and "InternalError" in result.failed[mans[1].id]
    assert "marked pending" in result.failed[mans[1].id]
    assert [m.id for m in pending(local)] == [mans[1].id]


def test_without_keep_local_the_uploaded_copy_leaves_the_directory(tmp_path: Path) -> None:
    local, mans = local_with_pending(tmp_path, 2)
    remote = MemoryStorage("s3")
    assert upload_pending(local, remote, keep_local=False).uploaded == [
        m.id for m in mans]
    assert local.listing().manifests == [] and len(remote.listing().manifests) == 2


# -- choosing a backup ---------------------------------------------------------------------


def test_the_catalog_merges_locations_newest_first(tmp_path: Path) -> None:
    local, mans = filled(tmp_path, 3, name="local")
    remote = MemoryStorage("s3")
    for man in mans[:2]:
        with local.open_artifact(man) as stream:
            (tmp_path / man.artifact).write_bytes(stream.read())
        remote.put(tmp_path / man.artifact, man)
    found = catalog([local, remote])
    assert [(e.manifest.id, e.locations) for e in found.entries] == [
        (mans[2].id, ["local"]), (mans[1].id, ["local", "s3"]), (mans[0].id, ["local", "s3"])]
    assert found.find("latest").manifest == mans[2]
    assert found.find(mans[0].id).locations == ["local", "s3"]


def test_finding_a_broken_or_missing_backup_says_which(tmp_path: Path) -> None:
    store, mans = filled(tmp_path, 2, name="local")
    store.place(layout.manifest_name(mans[0].id), b"{not json")
    found = catalog([store])
    with pytest.raises(IntegrityError, match=f"backup {mans[0].id} in local is corrupt"):
        found.find(mans[0].id)
    gone = mans[1].id[:-1] + ("0" if mans[1].id[-1] != "0" else "1")
    with pytest.raises(StorageError, match=f"backup {gone} does not exist"):
        found.find(gone)
    with pytest.raises(StorageError, match="there are no backups yet"):
        catalog([MemoryStorage()]).find("latest")


def test_an_unreachable_location_does_not_block_choosing_from_the_other(tmp_path: Path) -> None:
    local, mans = filled(tmp_path, 2, name="local")
    remote = MemoryStorage("s3")
    remote.faults.listing = StorageError("S3: cannot reach the S3 endpoint 127.0.0.1:9")
    found = _tolerant_catalog([local, remote], strict=False)
    assert found.find("latest").manifest == mans[1] and list(found.listings) == ["local"]
    with pytest.raises(StorageError, match="cannot reach"):
        _tolerant_catalog([local, remote], strict=True)  # --location given: no fallback
    with pytest.raises(StorageError, match="cannot reach"):
        _tolerant_catalog([remote], strict=False)  # nowhere else to choose from


def mirror(store: MemoryStorage, name: str) -> MemoryStorage:
    """Another location holding the same backups."""
    copy = MemoryStorage(name, now=T0)
    copy.objects = dict(store.objects)
    return copy


def test_an_id_is_read_directly_with_the_errors_of_a_listing(tmp_path: Path) -> None:
    local, mans = filled(tmp_path, 3, name="local")
    remote = mirror(local, "s3")
    entry = lookup([local, remote], mans[0].id)
    assert (entry.manifest, entry.locations) == (mans[0], ["local", "s3"])
    assert "listing" not in local.calls + remote.calls  # one manifest read, one artifact check
    assert local.calls == [f"read_manifest {mans[0].id}", f"artifact_problem {mans[0].id}"]
    for selector in (mans[1].id, mans[2].id, "nope"):
        expected = catalog([local, remote])
        try:
            want: object = expected.find(selector)
        except BackupdError as exc:  # the listing's error is what lookup must raise
            want = (type(exc), str(exc))
        try:
            got: object = lookup([local, remote], selector)
        except BackupdError as exc:
            got = (type(exc), str(exc))
        assert got == want


def test_an_id_whose_artifact_is_gone_is_corrupt_unless_another_location_has_it(
        tmp_path: Path) -> None:
    local, mans = filled(tmp_path, 2, name="local")
    remote = mirror(local, "s3")
    del local.objects[mans[1].artifact]
    listed = catalog([local])
    with pytest.raises(IntegrityError) as by_listing:
        listed.find(mans[1].id)
    with pytest.raises(IntegrityError) as direct:
        lookup([local], mans[1].id)
    assert str(direct.value) == str(by_listing.value)
    assert f"backup {mans[1].id} in local is corrupt: artifact" in str(direct.value)
    assert direct.value.exit_code == 3
    assert lookup([local, remote], mans[1].id).locations == ["s3"]
    local.place(layout.manifest_name(mans[0].id), b"{not json")
    with pytest.raises(IntegrityError, match=f"backup {mans[0].id} in local is corrupt"):
        lookup([local], mans[0].id)


def test_an_unreadable_location_fails_an_id_unless_it_may_be_skipped(tmp_path: Path) -> None:
    local, mans = filled(tmp_path, 2, name="local")
    remote = mirror(local, "s3")
    remote.faults.unreadable.add(mans[0].id)
    with pytest.raises(StorageError, match="cannot read the manifest") as err:
        lookup([local, remote], mans[0].id)
    assert not isinstance(err.value, BackupMissing)
    skipped: list[str] = []
    entry = lookup([local, remote], mans[0].id, lambda s, exc: skipped.append(s.name))
    assert (entry.locations, skipped) == (["local"], ["s3"])
    with pytest.raises(StorageError, match=f"backup {mans[0].id} does not exist"):
        lookup([remote], mans[0].id, lambda s, exc: None)
