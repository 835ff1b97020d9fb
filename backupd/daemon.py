"""`backupd run`: the long-running sidecar: scheduler, status endpoint, signals, shutdown.

Shape: a BackgroundScheduler runs the jobs in worker threads while the main thread owns the
signals. Why not BlockingScheduler: the shutdown grace needs "wait up to N seconds for the running
backup, but exit at once on a second signal", which shutdown(wait=True) cannot express.

Signals reach the main thread through `signal.set_wakeup_fd` on a pipe, and a finished job pokes
the same pipe; the Python-level handler does nothing. So no logic runs in signal context (setting
a threading.Event from a handler can deadlock on the Event's own lock) and nothing polls.

Shutdown (SIGTERM or SIGINT): no new runs start; a running backup gets `schedule.shutdown_grace`
to finish; then the process exits 0. If the grace expires, or a second signal arrives, it exits 0
at once without waiting: the kernel releases the flock on the backup directory, and the backup
commits its manifest last, so an abandoned backup is only `.<name>.tmp-XXXX` files that the next
run removes (clean_leftovers); it never looks like a backup. An S3 multipart upload it had open
is aborted first (within ABANDON_ABORT_S), so that no incomplete upload is left to be billed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import structlog
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from backupd import health, logs, notify, schedule
from backupd import manifest as mf
from backupd.config import Config
from backupd.errors import BackupdError
from backupd.health import iso_time
from backupd.jobs import Runner, save_state
from backupd.metrics import METRICS, Metrics
from backupd.storage.local import LocalStorage, ensure_dir
from backupd.web import StatusServer

log = structlog.get_logger("backupd.daemon")
BACKUP_JOB = "backup"
DRILL_JOB = "drill"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ABANDON_ABORT_S = 3.0  # at most this long aborting an open S3 upload before exiting


def run_daemon(config: Config, metrics: Metrics = METRICS) -> None:
    """Start, run until SIGTERM/SIGINT; returns normally (exit 0) after a clean stop.

    `config.load` has checked [schedule] and [notify]; a Config built otherwise still gets a
    ConfigError (exit 2) for a bad [schedule] here, before anything starts.
    """
    plan = schedule.plan(config)
    Daemon(config, plan, metrics).run()


class _Waker:
    """A self-pipe: signal numbers (written by the C-level handler) and job pokes (byte 0)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous_fd = -1
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, _ignore)

    def poke(self) -> None:
        # Full: the main thread wakes anyway. Closed: the daemon is exiting.
        with contextlib.suppress(OSError):
            os.write(self._write, b"\0")

    def wait(self, timeout: float) -> list[int]:
        """Bytes received within `timeout`: signal numbers, or 0 for a poke."""
        ready, _, _ = select.select([self._read], [], [], max(timeout, 0.0))
        if not ready:
            return []
        try:
            return list(os.read(self._read, 256))
        except BlockingIOError:
            return []

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The work happens in the main loop, woken by the wakeup fd."""


class Daemon:
    def __init__(self, config: Config, plan: schedule.Plan, metrics: Metrics) -> None:
        self.config = config
        self.plan = plan
        self.metrics = metrics
        self.waker = _Waker()
        self.scheduler = BackgroundScheduler(
            timezone=plan.timezone,
            # One worker: a drill (a throwaway redis-server holding the whole dataset) never runs
            # beside a backup; a job due meanwhile waits up to misfire_grace, then is "missed".
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": plan.misfire_grace},
        )
        self.tracker = health.Tracker(self._initial_state(time.time()),
                                      health.state_path(config))
        self.runner = Runner(config, metrics, self.tracker, notify.Notifier(config.notify),
                             next_run=self._next_run, on_idle=self.waker.poke)
        self.server: StatusServer | None = None
        self.link: Any = None  # backupd.pitr.link.Link with [pitr] enabled
        self.link_thread: threading.Thread | None = None

    def _start_link(self) -> None:
        """[pitr] enabled: the replication link runs in a thread of its own, all the time."""
        from backupd.pitr.link import Link

        self.link = Link(self.config, on_durable=lambda t: self.tracker.update(
            pitr_durable=float(t)))
        self.tracker.update(pitr_max_lag=self.config.pitr.max_lag)
        self.metrics.watch_pitr(self.link.status, time.time())
        self.link_thread = threading.Thread(target=self.link.run, name="pitr-link",
                                            daemon=True)
        self.link_thread.start()

    def _stop_link(self) -> None:
        if self.link is not None and self.link_thread is not None:
            self.link.stop.set()
            self.link_thread.join(timeout=self.config.redis.read_timeout)

    def run(self) -> None:
        self.waker.install()  # first: a signal during start-up is not lost
        try:
            self._start()
            signum = self._serve()
            self._stop(signum)
        finally:
            if self.server is not None:
                self.server.close()
            self.waker.close()

    def _start(self) -> None:
        cfg = self.config
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)  # we log its events
        if cfg.metrics.listen:
            self.server = StatusServer(cfg.metrics.listen, self.metrics, self.tracker,
                                       cfg.metrics.max_age)
        self.scheduler.add_listener(self._on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED
                                    | EVENT_JOB_ERROR)
        now = datetime.now(self.plan.timezone)
        first: dict[str, Any] = {"next_run_time": now} if cfg.schedule.run_on_start else {}
        self.scheduler.add_job(self.runner.backup, self.plan.backup, id=BACKUP_JOB,
                               name="backup", replace_existing=True, **first)
        if self.plan.drill is not None:
            self.scheduler.add_job(self.runner.drill, self.plan.drill, id=DRILL_JOB,
                                   name="restore drill", replace_existing=True)
        self.scheduler.start()
        first_due = now.timestamp() if cfg.schedule.run_on_start else self._next_run()
        self.tracker.update(first_due=first_due, next_run=self._next_run())
        save_state(self.tracker)
        log.info("daemon_started", schedule=self.plan.backup_text,
                 first_run=iso_time(first_due), run_on_start=cfg.schedule.run_on_start,
                 drill=cfg.schedule.drill or None, backup_dir=cfg.backup.dir,
                 metrics=self.server.address if self.server else None,
                 max_age_s=cfg.metrics.max_age, pid=os.getpid())
        self._say_whether_drills_can_work()
        if cfg.pitr.enabled:  # after the imports above: a thread importing beside them races
            self._start_link()
        gap = schedule.longest_gap(self.plan.backup, datetime.now(self.plan.timezone))
        if gap.total_seconds() > cfg.metrics.max_age:
            log.warning("max_age_shorter_than_schedule", longest_gap_s=gap.total_seconds(),
                        max_age_s=cfg.metrics.max_age,
                        effect="/healthz and `backupd health` will fail between runs")

    def _say_whether_drills_can_work(self) -> None:
        from backupd.actions.restore.drill import drill_server_fits

        fits, why = drill_server_fits(self.config)
        (log.info if fits else log.warning)("drill_server", fits=fits, detail=why)

    def _serve(self) -> int:
        """Heartbeat until a stop signal; returns the signal number."""
        while True:
            signals = [b for b in self.waker.wait(health.HEARTBEAT_S) if b]
            if signals:
                return signals[0]
            self.tracker.update(next_run=self._next_run())
            save_state(self.tracker)

    def _stop(self, signum: int) -> None:
        busy = self.runner.busy
        log.info("shutdown_requested", signal=signal.Signals(signum).name, backup_running=busy,
                 grace_s=self.plan.shutdown_grace if busy else None)
        self.runner.stopping.set()
        self.scheduler.shutdown(wait=False)
        self._stop_link()
        self.tracker.update(next_run=None)
        deadline = time.monotonic() + self.plan.shutdown_grace
        while self.runner.busy:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("shutdown_grace_expired", action="exiting without waiting for the "
                            "running job; the next run removes its temp files")
                self.tracker.update(stopped_at=time.time(), running=False)
                save_state(self.tracker)
                self._abandon()
            if any(self.waker.wait(remaining)):
                log.warning("second_signal", action="exiting at once; the next run removes "
                            "temp files of the interrupted job")
                self._abandon()
        self.tracker.update(stopped_at=time.time(), running=False)
        save_state(self.tracker)
        log.info("daemon_stopped")

    def _abandon(self) -> NoReturn:
        """Exit without waiting for the running job; its multipart upload to S3, if one is
        open, is aborted first (a few seconds at most), else it would stay, billed, until
        `prune --orphans` or a lifecycle rule aborts it."""
        if self.config.s3.enabled:
            from backupd.storage.s3 import abort_open_uploads

            abort_open_uploads(timeout=ABANDON_ABORT_S)
        _exit_now()

    def _next_run(self) -> float | None:
        job = self.scheduler.get_job(BACKUP_JOB)
        moment = getattr(job, "next_run_time", None) if job is not None else None
        return moment.timestamp() if isinstance(moment, datetime) else None

    def _on_event(self, event: JobEvent) -> None:
        """Runs in the scheduler thread: overlaps and misses are counted, never queued."""
        if event.job_id != BACKUP_JOB and event.code != EVENT_JOB_ERROR:
            log.warning("run_skipped", job=event.job_id, code=event.code)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            self.metrics.run_skipped("overlap")
            log.warning("run_skipped", job=event.job_id, reason="the previous run is still going")
        elif event.code == EVENT_JOB_MISSED:
            self.metrics.run_skipped("missed")
            log.warning("run_missed", job=event.job_id,
                        scheduled=iso_time(event.scheduled_run_time.timestamp()),
                        reason="later than schedule.misfire_grace")
        else:  # the job wrapper catches everything; this is a bug in it
            self.metrics.backup_failed()
            self.tracker.update(running=False)
            log.error("job_crashed", job=event.job_id,
                      error=logs.mask(repr(getattr(event, "exception", None))))

    def _initial_state(self, now: float) -> health.DaemonState:
        """Carry the last success over a restart: from the previous state file and the newest
        local backup, so metrics and /healthz do not start from 'never'."""
        state = health.DaemonState(started_at=now, updated_at=now)
        path = health.state_path(self.config)
        try:
            ensure_dir(path.parent)
            previous = health.read_state(path)
        except (ValueError, BackupdError) as exc:
            log.warning("state_not_loaded", error=str(exc))
            previous = None
        if previous is not None:
            state = replace(state, last_success=previous.last_success,
                            last_success_id=previous.last_success_id,
                            last_error=previous.last_error, last_error_at=previous.last_error_at)
            if previous.last_success is not None:
                self.metrics.last_success.set(previous.last_success)
        newest = _newest_local(Path(self.config.backup.dir))
        if newest is not None:
            created = mf.parse_time(newest.created_at).timestamp()
            if state.last_success is None or created >= state.last_success:
                state = replace(state, last_success=created, last_success_id=newest.id)
                self.metrics.backup_committed(newest, created)
        return state


def _newest_local(directory: Path) -> mf.Manifest | None:
    try:
        manifests = LocalStorage(directory).listing().manifests
    except BackupdError as exc:
        log.warning("backups_not_listed", error=str(exc))
        return None
    return max(manifests, key=lambda m: m.id, default=None)


def _exit_now() -> NoReturn:
    """Exit 0 without joining worker threads (one of them is the abandoned job)."""
    logging.shutdown()
    os._exit(0)
