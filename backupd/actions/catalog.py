"""Which backups exist where: storages by location, and listings merged by id."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backupd import manifest as mf
from backupd.choices import ALL_LOCATIONS, Location
from backupd.config import Config
from backupd.errors import BackupMissing, IntegrityError, StorageError, UsageError
from backupd.manifest import Manifest
from backupd.storage.base import Listing, Storage
from backupd.storage.local import LocalStorage

LOCATIONS = (*Location, ALL_LOCATIONS)


def storages(config: Config, location: str = "all",
             env: Mapping[str, str] | None = None) -> list[Storage]:
    """The backends named by `--location`, local first."""
    if location not in LOCATIONS:
        raise UsageError(f"unknown location {location!r} (expected local, s3 or all)")
    chosen: list[Storage] = []
    if location in (Location.LOCAL, ALL_LOCATIONS):
        chosen.append(LocalStorage(Path(config.backup.dir)))
    if location in (Location.S3, ALL_LOCATIONS) and config.s3.enabled:
        from backupd.storage.s3 import S3Storage

        chosen.append(S3Storage(config.s3, env))
    if location == Location.S3 and not config.s3.enabled:
        raise UsageError("--location s3 needs s3.bucket to be set in the configuration")
    return chosen


@dataclass
class Entry:
    manifest: Manifest
    locations: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "id": m.id, "created_at": m.created_at, "trigger": m.trigger, "tag": m.tag,
            "keys": m.keys, "raw_size": m.raw_size, "stored_size": m.stored_size,
            "rdb_version": m.rdb_version, "redis_version": m.redis.version,
            "server": m.redis.server,
            "compression": m.compression, "encryption": m.encryption,
            "locations": self.locations, "upload": m.upload, "warnings": m.warnings,
            "shards": len(m.cluster.shards) if m.cluster is not None else None,
            "slots_covered": m.cluster.slots_covered if m.cluster is not None else None,
        }


@dataclass
class Catalog:
    entries: list[Entry]
    listings: dict[str, Listing]

    def find(self, selector: str) -> Entry:
        """`latest` or an exact id."""
        if selector == "latest":
            if not self.entries:
                raise StorageError("there are no backups yet")
            return self.entries[0]
        mf.check_id(selector)
        for entry in self.entries:
            if entry.manifest.id == selector:
                return entry
        for name, listing in self.listings.items():
            if selector in listing.broken:
                raise IntegrityError(f"backup {selector} in {name} is corrupt: "
                                     f"{listing.broken[selector]}")
        raise StorageError(f"backup {selector} does not exist")


def catalog(chosen: list[Storage]) -> Catalog:
    merged: dict[str, Entry] = {}
    listings: dict[str, Listing] = {}
    for storage in chosen:
        listing = storage.listing()
        listings[storage.name] = listing
        for manifest in listing.manifests:
            entry = merged.setdefault(manifest.id, Entry(manifest))
            entry.locations.append(storage.name)
    entries = sorted(merged.values(), key=lambda e: e.manifest.id, reverse=True)
    return Catalog(entries, listings)


def lookup(chosen: Sequence[Storage], backup_id: str,
           unavailable: Callable[[Storage, StorageError], None] | None = None) -> Entry:
    """An exact id, found by reading its manifest (and checking its artifact) in each location
    instead of listing them all: the same entry, errors and exit codes as `catalog().find`.
    A location that cannot be read raises, unless `unavailable` takes the error instead."""
    mf.check_id(backup_id)
    found: Entry | None = None
    broken: dict[str, str] = {}
    for storage in chosen:
        try:
            manifest = storage.read_manifest(backup_id)
            problem = storage.artifact_problem(manifest)
        except BackupMissing:
            continue
        except IntegrityError as exc:
            broken[storage.name] = str(exc)
            continue
        except StorageError as exc:
            if unavailable is None:
                raise
            unavailable(storage, exc)
            continue
        if problem is not None:
            broken[storage.name] = problem
            continue
        found = found or Entry(manifest)
        found.locations.append(storage.name)
    if found is not None:
        return found
    for name, why in broken.items():
        raise IntegrityError(f"backup {backup_id} in {name} is corrupt: {why}")
    raise StorageError(f"backup {backup_id} does not exist")


def find_in(storage: Storage, selector: str) -> Manifest:
    """`latest` (which needs the listing) or an exact id (read directly) in one location."""
    if selector == "latest":
        return catalog([storage]).find(selector).manifest
    return lookup([storage], selector).manifest
