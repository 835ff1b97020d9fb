"""Notifications against a real local HTTP server, an unreachable port and a silent one."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import structlog

from backupd import config as config_mod
from backupd import logs
from backupd.config import NotifyConfig
from backupd.errors import ConfigError
from backupd.notify import Notifier, RunReport, redact
from tests.conftest import PASSWORD, free_port
from tests.httpcapture import CaptureServer

TOKEN = "tok-9f8e7d6c5b4a"


def report(event: str, **extra: object) -> RunReport:
    return RunReport(event, "scheduled", "2026-01-07T12:00:00Z", "2026-01-07T12:00:05Z", 5.0,
                     **extra)  # type: ignore[arg-type]


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def test_failure_posts_json_with_masked_error_and_pings_fail(capture: CaptureServer) -> None:
    logs.register_secret(PASSWORD)
    notifier = Notifier(NotifyConfig(webhook_url=f"{capture.url}/hook/{TOKEN}",
                                     healthchecks_url=f"{capture.url}/ping/{TOKEN}/",
                                     timeout=5.0))
    notifier.run_started()
    notifier.run_finished(report("backup_failure", error=f"AUTH failed with {PASSWORD}",
                                 error_type="RedisAuthError", consecutive_failures=2))
    assert [r.path for r in capture.received("GET")] == [f"/ping/{TOKEN}/start",
                                                         f"/ping/{TOKEN}/fail"]
    [post] = capture.received("POST", f"/hook/{TOKEN}")
    body = post.json()
    assert post.headers["Content-Type"] == "application/json"
    assert body["event"] == "backup_failure"
    assert body["error"] == "AUTH failed with ***"
    assert PASSWORD not in post.body.decode()
    assert body["host"] == socket.gethostname()
    assert body["duration_s"] == 5.0
    assert body["consecutive_failures"] == 2
    assert body["backup_id"] is None


def test_success_pings_and_posts_only_when_asked(capture: CaptureServer) -> None:
    quiet = Notifier(NotifyConfig(webhook_url=f"{capture.url}/hook",
                                  healthchecks_url=f"{capture.url}/ping", timeout=5.0))
    quiet.run_finished(report("backup_success", backup_id="20260107T120000Z-abcdef"))
    assert [(r.method, r.path) for r in capture.requests] == [("GET", "/ping")]

    loud = Notifier(NotifyConfig(webhook_url=f"{capture.url}/hook", on_success=True,
                                 timeout=5.0))
    loud.run_finished(report("backup_success", backup_id="20260107T120000Z-abcdef", keys=3,
                             raw_size=100, stored_size=40))
    body = capture.received("POST", "/hook")[0].json()
    assert (body["event"], body["backup_id"], body["raw_size"], body["stored_size"]) == (
        "backup_success", "20260107T120000Z-abcdef", 100, 40)


def test_drill_failure_does_not_ping_the_backup_check(capture: CaptureServer) -> None:
    notifier = Notifier(NotifyConfig(webhook_url=f"{capture.url}/hook",
                                     healthchecks_url=f"{capture.url}/ping", timeout=5.0))
    notifier.run_finished(report("drill_failure", error="restore failed"))
    assert [(r.method, r.path) for r in capture.requests] == [("POST", "/hook")]


def test_unreachable_endpoint_is_logged_without_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/hook/{TOKEN}"
    notifier = Notifier(NotifyConfig(webhook_url=url, healthchecks_url=url, timeout=5.0))
    with structlog.testing.capture_logs() as events:
        notifier.run_started()
        notifier.run_finished(report("backup_failure", error="boom"))
    failures = [e for e in events if e["event"] == "notification_failed"]
    assert {e["kind"] for e in failures} == {"webhook", "healthchecks"}
    assert len(failures) == 3
    assert TOKEN not in repr(events)
    assert all(e["target"].endswith("/***") for e in failures)


def test_error_status_and_silent_server_fail_within_the_timeout() -> None:
    with CaptureServer(status=500) as broken:
        notifier = Notifier(NotifyConfig(webhook_url=f"{broken.url}/hook", timeout=5.0))
        assert notifier.send_webhook(report("backup_failure")) is False
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        notifier = Notifier(NotifyConfig(webhook_url=f"http://127.0.0.1:{port}/h", timeout=0.3))
        started = time.monotonic()
        assert notifier.send_webhook(report("backup_failure")) is False
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(("key", "url"), [
    ("webhook_url", f"file:///etc/{TOKEN}"),
    ("healthchecks_url", f"ftp://user:{TOKEN}@example.com/x"),
    ("webhook_url", f"not a url {TOKEN}"),
])
def test_only_http_urls_are_accepted_and_never_echoed(key: str, url: str) -> None:
    with pytest.raises(ConfigError, match=f"notify.{key}") as info:
        config_mod.load(None, env={f"BACKUPD_NOTIFY__{key.upper()}": url})
    assert TOKEN not in str(info.value)


def test_redact_keeps_only_scheme_and_host() -> None:
    assert redact(f"https://hc-ping.com/{TOKEN}") == "https://hc-ping.com/***"
    assert redact(f"http://u:{TOKEN}@10.0.0.1:8080/x") == "http://10.0.0.1:8080/***"
