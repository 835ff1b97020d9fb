"""The storage contract: what every backend does, run against each of them (restic's one suite
for every backend). LocalStorage on a directory, S3Storage on moto, and MemoryStorage, the
in-memory backend the fast tests of retention, uploads and backup selection run on: a
behaviour they rely on is held here to what the real backends do.

A new backend joins by adding a `Backend` in the `backend` fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from backupd.config import S3Config
from backupd.errors import BackupMissing, IntegrityError, StorageError, UsageError
from backupd.storage import layout
from backupd.storage.base import Storage
from backupd.storage.local import LocalStorage
from backupd.storage.s3 import S3Storage
from tests.memory_storage import MemoryStorage
from tests.test_storage_s3 import BUCKET, ENV, PREFIX, T0, make_backup


@dataclass
class Backend:
    storage: Storage
    place: Callable[[str, bytes], None]  # an object stored as-is, under the backend's name
    names: Callable[[], set[str]]  # every name stored, ours or not


def _local(tmp_path: Path) -> Backend:
    directory = tmp_path / "backups"
    directory.mkdir()
    return Backend(LocalStorage(directory), lambda n, d: (directory / n).write_bytes(d) and None,
                   lambda: {p.name for p in directory.iterdir()})


def _memory(_: Path) -> Backend:
    store = MemoryStorage()
    return Backend(store, store.place, lambda: set(store.objects))


@pytest.fixture(params=["local", "s3", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param != "s3":
        yield (_local if request.param == "local" else _memory)(tmp_path)
        return
    request.getfixturevalue("no_aws_config")
    mp = request.getfixturevalue("monkeypatch")
    for key, value in {**ENV, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        store = S3Storage(S3Config(bucket=BUCKET, prefix=PREFIX, region="us-east-1"), env=ENV)

        def names() -> set[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            return {o["Key"].removeprefix(PREFIX) for p in pages for o in p.get("Contents", [])}

        yield Backend(store, lambda n, d: client.put_object(Bucket=BUCKET, Key=PREFIX + n,
                                                            Body=d) and None, names)


def test_an_empty_storage_lists_nothing(backend: Backend) -> None:
    listing = backend.storage.listing()
    assert (listing.manifests, listing.orphans, listing.broken) == ([], [], {})
    assert listing.complete


def test_put_backups_are_listed_newest_first_and_read_back(backend: Backend,
                                                           tmp_path: Path) -> None:
    store = backend.storage
    old_path, old = make_backup(tmp_path, 5000, T0)
    new_path, new = make_backup(tmp_path, 700, T0 + timedelta(hours=1), compression="gzip",
                                encrypted=False)
    store.put(old_path, old)
    store.put(new_path, new)
    listing = store.listing()
    assert listing.manifests == [new, old]
    assert (listing.orphans, listing.broken, listing.complete) == ([], {}, True)
    assert store.read_manifest(old.id) == old
    with store.open_artifact(old) as stream:
        assert stream.read() == old_path.read_bytes()
    assert backend.names() == {old.artifact, layout.manifest_name(old.id), new.artifact,
                               layout.manifest_name(new.id)}


def test_an_artifact_without_manifest_is_an_orphan_until_deleted(backend: Backend,
                                                                  tmp_path: Path) -> None:
    path, man = make_backup(tmp_path, 321)
    backend.place(man.artifact, path.read_bytes())
    listing = backend.storage.listing()
    assert (listing.manifests, listing.broken) == ([], {})
    assert [(o.name, o.size) for o in listing.orphans] == [(man.artifact, 321)]
    assert listing.orphans[0].modified.tzinfo is not None
    result = backend.storage.delete_orphans([man.artifact])
    assert (result.deleted, result.failed) == ([man.artifact], {})
    assert backend.names() == set()


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"id": "x"}'])
def test_a_corrupt_manifest_is_broken_and_keeps_its_artifact(backend: Backend, tmp_path: Path,
                                                             body: bytes) -> None:
    path, man = make_backup(tmp_path)
    good_path, good = make_backup(tmp_path, when=T0 + timedelta(minutes=5))
    backend.storage.put(path, man)
    backend.storage.put(good_path, good)
    backend.place(layout.manifest_name(man.id), body)
    listing = backend.storage.listing()
    assert listing.manifests == [good]
    assert list(listing.broken) == [man.id] and "manifest" in listing.broken[man.id]
    assert listing.orphans == []  # the artifact of a broken backup is no orphan
    assert listing.complete
    with pytest.raises(IntegrityError):
        backend.storage.read_manifest(man.id)


def test_a_manifest_without_its_artifact_is_broken(backend: Backend, tmp_path: Path) -> None:
    _, man = make_backup(tmp_path)
    backend.place(layout.manifest_name(man.id), man.to_json())
    listing = backend.storage.listing()
    assert listing.manifests == [] and listing.orphans == []
    assert man.artifact in listing.broken[man.id] and "missing" in listing.broken[man.id]
    with pytest.raises(StorageError), backend.storage.open_artifact(man):
        pass
    # Read by id, without a listing: the same words.
    assert backend.storage.artifact_problem(backend.storage.read_manifest(man.id)) == \
        listing.broken[man.id]


def test_a_stored_backup_has_no_artifact_problem(backend: Backend, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    backend.storage.put(path, man)
    assert backend.storage.artifact_problem(backend.storage.read_manifest(man.id)) is None


def test_names_that_are_not_ours_are_never_listed_nor_deleted(backend: Backend,
                                                              tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    backend.storage.put(path, man)
    foreign = {"README", "notes.json", f"{man.id[:-1]}.json", f"{man.id[:-6]}ABCDEF.rdb",
               f"x{man.id}.rdb.zst"}
    for name in foreign:
        backend.place(name, b"not ours")
    listing = backend.storage.listing()
    assert listing.manifests == [man] and listing.orphans == [] and listing.broken == {}
    assert backend.storage.delete([man.id]).deleted == [man.id]
    assert backend.names() == foreign


def test_delete_removes_the_backup_and_only_it(backend: Backend, tmp_path: Path) -> None:
    backups = [make_backup(tmp_path, when=T0 + timedelta(hours=i)) for i in range(3)]
    for path, man in backups:
        backend.storage.put(path, man)
    result = backend.storage.delete([backups[0][1].id, backups[2][1].id])
    assert sorted(result.deleted) == sorted([backups[0][1].id, backups[2][1].id])
    assert (result.locked, result.failed) == ([], {})
    assert backend.storage.listing().manifests == [backups[1][1]]
    assert backend.names() == {backups[1][1].artifact, layout.manifest_name(backups[1][1].id)}


def test_a_missing_backup_is_a_storage_error_and_a_bad_id_a_usage_error(backend: Backend,
                                                                       tmp_path: Path) -> None:
    _, man = make_backup(tmp_path)
    with pytest.raises(BackupMissing, match="does not exist"):
        backend.storage.read_manifest(man.id)
    for bad in ("../etc", "20260301T120000Z-abcdeg", ""):
        with pytest.raises(UsageError):
            backend.storage.read_manifest(bad)
        with pytest.raises(UsageError):
            backend.storage.delete([bad])


def test_deleting_a_backup_that_does_not_exist_counts_as_deleted(backend: Backend,
                                                                 tmp_path: Path) -> None:
    path, kept = make_backup(tmp_path)
    _, gone = make_backup(tmp_path, when=T0 + timedelta(hours=1))
    backend.storage.put(path, kept)
    result = backend.storage.delete([gone.id])
    assert (result.deleted, result.locked, result.failed) == ([gone.id], [], {})
    assert backend.storage.listing().manifests == [kept]


def test_a_manifest_is_never_deleted_as_an_orphan(backend: Backend, tmp_path: Path) -> None:
    path, man = make_backup(tmp_path)
    backend.storage.put(path, man)
    leftover = layout.temp_name(f"{man.id[:-1]}0.rdb.zst", "abc123")
    backend.place(leftover, b"crashed write")
    with pytest.raises(UsageError, match="not the name of an orphaned"):
        backend.storage.delete_orphans([leftover, layout.manifest_name(man.id)])
    assert backend.storage.listing().manifests == [man]
    assert leftover in backend.names()  # refused before anything was deleted
