"""Prometheus metrics in a private registry, so only backupd's own series are exported.

The daemon's default is the module-level `METRICS`; it fills the series from the CycleResult of
each run. Tests build their own `Metrics()` to start from zero.

Alert on `time() - backupd_last_success_timestamp_seconds`: it is seeded at start-up from the
newest local backup, so a restart does not reset it to 0 and page someone.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from backupd import __version__
from backupd.manifest import Manifest

if TYPE_CHECKING:
    from backupd.pitr.link import LinkStatus

# Backups take seconds (small Redis) to hours (tens of GB over a slow disk).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# `*_created` series double the output and nobody alerts on them; this process is backupd's own.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every series backupd exports; one instance per registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.last_success = Gauge("backupd_last_success_timestamp_seconds",
                                  "Unix time of the last successful backup", registry=r)
        self.last_attempt = Gauge("backupd_last_attempt_timestamp_seconds",
                                  "Unix time the last backup attempt started", registry=r)
        self.backups = Counter("backupd_backups", "Backup attempts by outcome",
                               ["outcome"], registry=r)
        self.duration = Histogram("backupd_backup_duration_seconds",
                                  "Duration of successful backups", buckets=DURATION_BUCKETS,
                                  registry=r)
        self.size = Gauge("backupd_backup_size_bytes", "Size of the last successful backup",
                          ["kind"], registry=r)
        self.keys = Gauge("backupd_backup_keys", "Keys in the last successful backup",
                          registry=r)
        self.shards = Gauge("backupd_backup_shards", "Shards in the last successful backup "
                            "(0: not a cluster backup)", registry=r)
        self.slots = Gauge("backupd_backup_slots_covered", "Hash slots the last successful "
                           "cluster backup covers (16384 when complete; 0: not a cluster)",
                           registry=r)
        self.uploads_pending = Gauge("backupd_uploads_pending",
                                     "Local backups not yet uploaded to S3", registry=r)
        self.retention_deleted = Counter("backupd_retention_deleted",
                                         "Backups deleted by retention", ["location"], registry=r)
        self.skipped = Counter("backupd_skipped_runs",
                               "Scheduled runs not started (overlap: the previous run was "
                               "still going; missed: later than schedule.misfire_grace)",
                               ["reason"], registry=r)
        self.drill_success = Gauge("backupd_drill_last_success_timestamp_seconds",
                                   "Unix time of the last successful restore drill", registry=r)
        self.drills = Counter("backupd_drills", "Scheduled restore drills by outcome",
                              ["outcome"], registry=r)
        self.pitr_lag = Gauge("backupd_pitr_lag_seconds",
                              "Now minus the newest durable second of the point-in-time link",
                              registry=r)
        self.pitr_link_up = Gauge("backupd_pitr_link_up",
                                  "1 while the point-in-time replication link streams",
                                  registry=r)
        self.pitr_segments = Gauge("backupd_pitr_segments",
                                   "Segments closed by the point-in-time link since the start",
                                   registry=r)
        self.pitr_bytes = Gauge("backupd_pitr_bytes",
                                "Bytes written into segments since the start", registry=r)
        Info("backupd_build", "backupd version", registry=r).info({"version": __version__})
        for outcome in ("success", "failure"):  # export zeros, so rate() works from the start
            self.backups.labels(outcome=outcome)
            self.drills.labels(outcome=outcome)
        for kind in ("raw", "stored"):
            self.size.labels(kind=kind)
        for reason in ("overlap", "missed"):
            self.skipped.labels(reason=reason)
        for location in ("local", "s3"):
            self.retention_deleted.labels(location=location)

    def backup_started(self, at: float | None = None) -> None:
        self.last_attempt.set(time.time() if at is None else at)

    def backup_committed(self, manifest: Manifest, at: float | None = None) -> None:
        """A new backup exists locally (also used at start-up with the newest one on disk).

        Set even when the rest of the run (upload) then fails: the series say how fresh the
        newest backup is; `backups_total{outcome}` says whether whole runs succeed.
        """
        self.last_success.set(time.time() if at is None else at)
        self.size.labels(kind="raw").set(manifest.raw_size)
        self.size.labels(kind="stored").set(manifest.stored_size)
        self.keys.set(manifest.keys)
        cluster = manifest.cluster
        self.shards.set(len(cluster.shards) if cluster is not None else 0)
        self.slots.set(cluster.slots_covered if cluster is not None else 0)

    def run_succeeded(self, duration_s: float) -> None:
        """A whole run (pending uploads, backup, upload, prune) succeeded."""
        self.backups.labels(outcome="success").inc()
        self.duration.observe(duration_s)

    def backup_failed(self) -> None:
        self.backups.labels(outcome="failure").inc()

    def pruned(self, location: str, deleted: int) -> None:
        if deleted:
            self.retention_deleted.labels(location=location).inc(deleted)

    def run_skipped(self, reason: str) -> None:
        self.skipped.labels(reason=reason).inc()

    def drill_succeeded(self, at: float | None = None) -> None:
        self.drill_success.set(time.time() if at is None else at)
        self.drills.labels(outcome="success").inc()

    def drill_failed(self) -> None:
        self.drills.labels(outcome="failure").inc()

    def watch_pitr(self, status: LinkStatus, started: float) -> None:
        """The point-in-time series read the link's status at each scrape."""
        self.pitr_lag.set_function(lambda: time.time() - (
            status.durable_time if status.durable_time is not None else started))
        self.pitr_link_up.set_function(lambda: 1.0 if status.up else 0.0)
        self.pitr_segments.set_function(lambda: status.segments)
        self.pitr_bytes.set_function(lambda: status.bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()

