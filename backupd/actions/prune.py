"""`backupd prune`: apply retention to each location, behind safety rails.

The policy itself is a pure function (retention.plan). The rails here are about the data the
plan is made from: nothing is deleted when a listing failed or may be incomplete, only complete
backups (a manifest and its artifact, named by backupd's id format) are candidates, a local
backup whose upload is still pending is kept, and a plan that keeps nothing is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from backupd import manifest as mf
from backupd.config import Config
from backupd.errors import BackupdError
from backupd.retention import Decision, Policy, keep_chain_bases, plan
from backupd.storage.base import Orphan, Storage

if TYPE_CHECKING:
    from backupd.pitr.segments import SegmentMeta
    from backupd.pitr.store import SegmentStore

log = structlog.get_logger("backupd.prune")
ORPHAN_MIN_AGE = timedelta(days=1)  # younger leftovers may be an upload still in flight


@dataclass
class Report:
    location: str
    decisions: list[Decision] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    orphans: list[Orphan] = field(default_factory=list)
    orphans_deleted: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def as_json(self) -> dict[str, Any]:
        return {
            "location": self.location, "error": self.error,
            "backups": [{"id": d.backup_id, "action": "keep" if d.keep else "delete",
                         "reasons": list(d.reasons)} for d in self.decisions],
            "deleted": self.deleted, "locked": self.locked, "failed": self.failed,
            "orphans": [{"name": o.name, "modified": mf.format_time(o.modified),
                         "size": o.size} for o in self.orphans],
            "orphans_deleted": self.orphans_deleted,
        }


def policy_for(config: Config, location: str) -> Policy:
    return Policy.from_config(config.s3.retention if location == "s3" else config.retention)


def prune_location(storage: Storage, policy: Policy, *, now: datetime, dry_run: bool = False,
                   orphans: bool = False, chains: Chains | None = None) -> Report:
    """Plan and delete; a prune that could not run or could not delete is logged as a warning
    or an error (a backup run prunes too, and its exit code is about the backup). `chains`:
    the point-in-time segments beside the backups (bases kept, chains pruned with them)."""
    report = _prune(storage, policy, now=now, dry_run=dry_run, orphans=orphans, chains=chains)
    if report.error:
        log.warning("prune_skipped", location=storage.name, error=report.error)
    if report.failed:
        log.error("prune_failed", location=storage.name, failed=report.failed,
                  hint="what was not deleted is kept; the next prune tries again")
    return report


@dataclass(frozen=True)
class Chains:
    """The segment store of a location and how far back its windows are kept."""

    store: SegmentStore
    window: timedelta


def chains_for(config: Config, storage: Storage) -> Chains:
    from backupd.pitr.store import LocalSegments, S3Segments

    window = timedelta(seconds=config.pitr.window)
    if storage.name == "s3":
        from backupd.storage.s3 import S3Storage

        assert isinstance(storage, S3Storage)
        return Chains(S3Segments(storage), window)
    return Chains(LocalSegments(Path(config.backup.dir)), window)


def _prune(storage: Storage, policy: Policy, *, now: datetime, dry_run: bool,
           orphans: bool, chains: Chains | None = None) -> Report:
    report = Report(storage.name)
    try:
        listing = storage.listing()
    except BackupdError as exc:
        report.error = f"cannot list backups, nothing deleted: {exc}"
        return report
    report.orphans = listing.orphans
    if not listing.complete:
        report.error = "the listing may be incomplete, nothing deleted"
        return report
    decisions = plan([(m.id, mf.id_time(m.id)) for m in listing.manifests], policy, now=now)
    segments: list[SegmentMeta] = []
    if chains is not None:
        try:
            segments = chains.store.listing().segments
        except BackupdError as exc:
            report.error = f"cannot list the point-in-time segments, nothing deleted: {exc}"
            return report
        ends: dict[str, datetime] = {}
        for seg in segments:
            end = datetime.fromtimestamp(seg.last_time, UTC)
            ends[seg.base] = max(end, ends.get(seg.base, end))
        decisions = keep_chain_bases(decisions, ends, chains.window, now)
    pending = {m.id for m in listing.manifests if m.upload == "pending"}
    report.decisions = [_keep_pending(d) if d.backup_id in pending and storage.name == "local"
                        else d for d in decisions]
    doomed = [d.backup_id for d in report.decisions if not d.keep]
    if report.decisions and len(doomed) == len(report.decisions):
        report.error = "refusing a plan that deletes every backup"
        return report
    if dry_run:
        return report
    if doomed:
        result = storage.delete(doomed)
        report.deleted, report.locked, report.failed = result.deleted, result.locked, result.failed
        log.info("pruned", location=storage.name, deleted=len(result.deleted),
                 locked=len(result.locked), failed=result.failed or None)
    if chains is not None:
        _prune_chains(chains.store, segments, {d.backup_id for d in report.decisions
                                               if d.backup_id not in report.deleted}, report)
    old_orphans = [o.name for o in listing.orphans if now - o.modified > ORPHAN_MIN_AGE]
    if old_orphans and orphans:
        result = storage.delete_orphans(old_orphans)
        report.orphans_deleted = result.deleted
        report.failed.update(result.failed)
    elif old_orphans:
        log.warning("orphans_found", location=storage.name, count=len(old_orphans),
                    hint="`backupd prune --orphans` removes them")
    return report


def _prune_chains(store: SegmentStore, segments: list[SegmentMeta], bases: set[str],
                  report: Report) -> None:
    """Segments whose base is gone: a chain never outlives its base."""
    doomed = [s for s in segments if s.base not in bases]
    if not doomed:
        return
    failed = store.delete_segments(doomed)
    report.failed.update({stem: "segment not deleted" for stem in failed})
    log.info("pitr_segments_pruned", location=store.name, deleted=len(doomed) - len(failed),
             failed=failed or None)


def _keep_pending(decision: Decision) -> Decision:
    if decision.keep:
        return decision
    return dataclasses.replace(decision, keep=True, reasons=("upload pending",))


def prune(config: Config, chosen: Sequence[Storage], *, now: datetime, dry_run: bool = False,
          orphans: bool = False) -> list[Report]:
    return [prune_location(storage, policy_for(config, storage.name), now=now, dry_run=dry_run,
                           orphans=orphans, chains=chains_for(config, storage))
            for storage in chosen]
