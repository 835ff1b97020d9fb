"""Tell someone: a JSON webhook and healthchecks.io-style pings, best effort.

Why best effort: a backup that succeeded must not be reported as failed because a chat webhook is
down, and a failure must still be counted and logged when the notification cannot go out. Every
request has `notify.timeout`, so a black-holed endpoint delays a run by at most that, once.

The URLs are secrets (their path is the credential, e.g. a healthchecks.io UUID or a Slack
token): logs show only scheme and host, and error text is masked with logs.mask.
The healthchecks.io dead man's switch also catches what no in-process check can: a daemon that
is gone entirely.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import structlog

from backupd import __version__, logs
from backupd.config import NotifyConfig

log = structlog.get_logger("backupd.notify")
USER_AGENT = f"backupd/{__version__}"


def redact(url: str) -> str:
    """`https://hc-ping.com/***`: enough to tell which endpoint failed, nothing secret."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname}{port}/***"


@dataclass(frozen=True)
class RunReport:
    """One finished run, as the webhook body describes it."""

    event: str  # backup_success | backup_failure | drill_success | drill_failure
    trigger: str
    started_at: str | None
    finished_at: str | None
    duration_s: float
    backup_id: str | None = None
    keys: int | None = None
    raw_size: int | None = None
    stored_size: int | None = None
    error: str | None = None
    error_type: str | None = None
    consecutive_failures: int = 0

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["error"] = logs.mask(self.error) if self.error else None
        return {**data, "host": socket.gethostname(), "backupd_version": __version__}


class Notifier:
    """Sends the configured notifications; every method returns without raising."""

    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg
        for url in (cfg.webhook_url, cfg.healthchecks_url):
            logs.register_secret(url)

    def run_started(self) -> None:
        self._ping("/start")

    def run_finished(self, report: RunReport) -> None:
        """Backup outcome: webhook (failures always, successes if on_success) and the ping."""
        failed = report.event.endswith("_failure")
        if self.cfg.webhook_url and (failed or self.cfg.on_success):
            self.send_webhook(report)
        if report.event.startswith("backup_"):
            self._ping("/fail" if failed else "")

    def send_webhook(self, report: RunReport) -> bool:
        data = json.dumps(report.to_json()).encode()
        return self._request(self.cfg.webhook_url, data, "webhook")

    def _ping(self, suffix: str) -> bool:
        if not self.cfg.healthchecks_url:
            return False
        return self._request(self.cfg.healthchecks_url.rstrip("/") + suffix, None,
                             "healthchecks")

    def _request(self, url: str, data: bytes | None, kind: str) -> bool:
        headers = {"User-Agent": USER_AGENT}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers,  # noqa: S310 - validated
                                         method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:  # noqa: S310
                response.read(4096)
            return True
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad URLs
            log.warning("notification_failed", kind=kind, target=redact(url),
                        error=logs.mask(f"{type(exc).__name__}: {exc}"))
            return False
