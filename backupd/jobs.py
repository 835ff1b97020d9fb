"""What one scheduled run does around `run_cycle`: log context, metrics, health state, notify.

Why every exception is caught here: APScheduler logs and swallows job exceptions, so a failure
that is not recorded by the job itself would be invisible to /healthz and the metrics. The daemon
must never die from a failed run either; it tries again at the next scheduled time.

A run whose local backup was committed but whose upload failed (UploadPending) is a failed run
(counted, notified, last_error) that still made a fresh backup (last_success): health is about
having a recent restorable backup; the missing offsite copy shows in `backupd_uploads_pending`
and in the failure notification.

structlog context is bound inside the job because APScheduler's worker threads do not inherit
contextvars from the thread that scheduled them.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from backupd import logs
from backupd.actions.cycle import CycleResult, run_cycle

# At import, not in a job's thread: two scheduler threads importing the restore package at
# once saw it half-initialised (ImportError in a scheduled run).
from backupd.actions.restore.drill import DrillSkipped, drill_latest
from backupd.config import Config
from backupd.errors import BackupdError
from backupd.health import Tracker, iso_time
from backupd.manifest import Manifest
from backupd.metrics import Metrics
from backupd.notify import Notifier, RunReport

log = structlog.get_logger("backupd.daemon")
Cycle = Callable[..., CycleResult]
class Runner:
    """The daemon's jobs. `stopping` refuses new runs; `busy` tells shutdown what to wait for."""

    def __init__(self, config: Config, metrics: Metrics, tracker: Tracker, notifier: Notifier,
                 *, cycle: Cycle = run_cycle, next_run: Callable[[], float | None] = lambda: None,
                 on_idle: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.metrics = metrics
        self.tracker = tracker
        self.notifier = notifier
        self.cycle = cycle
        self.next_run = next_run
        self.on_idle = on_idle
        self.stopping = threading.Event()
        self._active = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._active > 0

    @contextmanager
    def _running(self, job: str) -> Iterator[bool]:
        """Count the job as active (for shutdown) and bind its log context; False = refused."""
        if self.stopping.is_set():
            log.info("run_refused", job=job, reason="the daemon is stopping")
            yield False
            return
        with self._lock:
            self._active += 1
        try:
            with structlog.contextvars.bound_contextvars(job=job, run=secrets.token_hex(4)):
                yield True
        finally:
            with self._lock:
                self._active -= 1
            self.on_idle()

    # -- backup ----------------------------------------------------------------------------

    def backup(self, trigger: str = "scheduled") -> None:
        """One run of the cycle; never raises."""
        with self._running("backup") as allowed:
            if allowed:
                self._backup(trigger)

    def _backup(self, trigger: str) -> None:
        started, t0 = time.time(), time.monotonic()
        committed: list[Manifest] = []
        self.metrics.backup_started(started)
        self.tracker.update(running=True, last_attempt=started)
        self._save()
        log.info("run_started", trigger=trigger)
        self.notifier.run_started()

        def on_backup(manifest: Manifest) -> None:  # the local backup is committed
            committed.append(manifest)
            at = time.time()
            self.metrics.backup_committed(manifest, at)
            self.tracker.update(last_success=at, last_success_id=manifest.id)

        try:
            result = self.cycle(self.config, trigger=trigger, prune=self.config.schedule.prune,
                                on_backup=on_backup)
            for report in result.prune_reports:
                self.metrics.pruned(report.location, len(report.deleted))
        except Exception as exc:
            self._refresh_pending()
            self._failed(exc, trigger, started, time.monotonic() - t0, committed)
            return
        self._refresh_pending()
        duration = time.monotonic() - t0
        manifest = result.manifest
        self.metrics.run_succeeded(duration)
        if not committed:  # a cycle that did not call on_backup
            on_backup(manifest)
        self.tracker.update(running=False, consecutive_failures=0)
        log.info("run_succeeded", id=manifest.id, duration_s=round(duration, 3),
                 uploaded=result.uploaded or None)
        self._finish()
        self.notifier.run_finished(RunReport(
            "backup_success", trigger, iso_time(started), iso_time(time.time()),
            round(duration, 3), backup_id=manifest.id, keys=manifest.keys,
            raw_size=manifest.raw_size, stored_size=manifest.stored_size))

    def _failed(self, exc: Exception, trigger: str, started: float, duration: float,
                committed: list[Manifest]) -> None:
        message = _message(exc)
        self.metrics.backup_failed()
        state = self.tracker.update(
            running=False, last_error=message, last_error_at=time.time(),
            consecutive_failures=self.tracker.state.consecutive_failures + 1)
        fields: dict[str, Any] = {
            "error": message, "error_type": type(exc).__name__, "duration_s": round(duration, 3),
            "consecutive_failures": state.consecutive_failures,
            "backup_id": committed[0].id if committed else None}
        if isinstance(exc, BackupdError):
            log.error("run_failed", **fields)
        else:  # a bug: keep the (masked) traceback
            log.exception("run_failed", **fields)
        self._finish()
        manifest = committed[0] if committed else None
        self.notifier.run_finished(RunReport(
            "backup_failure", trigger, iso_time(started), iso_time(time.time()),
            round(duration, 3), error=message, error_type=type(exc).__name__,
            consecutive_failures=state.consecutive_failures,
            backup_id=manifest.id if manifest else None,
            keys=manifest.keys if manifest else None,
            raw_size=manifest.raw_size if manifest else None,
            stored_size=manifest.stored_size if manifest else None))

    def _refresh_pending(self) -> None:
        if not self.config.s3.enabled:
            return
        try:
            from backupd.actions.upload import pending
            from backupd.storage.local import LocalStorage

            self.metrics.uploads_pending.set(len(pending(LocalStorage(Path(
                self.config.backup.dir)))))
        except Exception as exc:  # a metric must not turn a run into a failure
            log.warning("uploads_pending_unknown", error=_message(exc))

    # -- drill -----------------------------------------------------------------------------

    def drill(self) -> None:
        """The scheduled restore drill of the latest backup; never raises."""
        with self._running("drill") as allowed:
            if allowed:
                self._drill()

    def _drill(self) -> None:

        started, t0 = time.time(), time.monotonic()
        try:
            message = drill_latest(self.config)
        except DrillSkipped as exc:
            log.warning("drill_skipped", reason=str(exc))
            return
        except Exception as exc:
            message = _message(exc)
            log.error("drill_failed", error=message, error_type=type(exc).__name__)
            self.metrics.drill_failed()
            self.notifier.run_finished(RunReport(
                "drill_failure", "scheduled", iso_time(started), iso_time(time.time()),
                round(time.monotonic() - t0, 3), error=message, error_type=type(exc).__name__))
            return
        duration = round(time.monotonic() - t0, 3)
        self.metrics.drill_succeeded()
        log.info("drill_succeeded", duration_s=duration, result=message)
        self.notifier.run_finished(RunReport("drill_success", "scheduled", iso_time(started),
                                             iso_time(time.time()), duration))

    def _finish(self) -> None:
        self.tracker.update(next_run=self.next_run())
        self._save()

    def _save(self) -> None:
        save_state(self.tracker)


def save_state(tracker: Tracker) -> None:
    """Write the health state file; a failure is logged, never fatal (the backup may be fine)."""
    try:
        tracker.save()
    except OSError as exc:
        log.error("state_write_failed", error=logs.mask(f"{exc.strerror or exc}"))


def _message(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, BackupdError) else f"{type(exc).__name__}: {exc}"
    return logs.mask(text)
