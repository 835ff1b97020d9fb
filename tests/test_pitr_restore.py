"""Point-in-time restore end to end: `backupd run` with [pitr] follows a real Redis while a
writer records when each write was acknowledged; Redis is killed; `restore --to-time T` for
several T brings back every write acknowledged before T and none sent after it, from the
local segments and from S3 alone (local copies deleted)."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import RedisServer, s3_section, wait_until
from tests.faults.harness import cli
from tests.pitr import (
    Writer,
    check_moment,
    keys_of,
    metas,
    open_segments,
    pitr_config,
    start_link,
    stop,
)

# The newest write that may be missing: what reached Redis but not backupd when it died.
# On this machine the stream arrives within milliseconds; the bound leaves room for the
# load of four test runs at once.
LOSS_BOUND = 0.5
WRITE_FOR = 6.0


def _record(tmp_path: Path, redis_factory: Callable[..., RedisServer],
            extra: str = "") -> tuple[Path, Path, Writer, RedisServer]:
    """Run the link while the writer writes; kill Redis; stop backupd; start an empty Redis
    on the same port. Returns (config, backups, writer, the empty server)."""
    server = redis_factory("--repl-diskless-sync-delay", "0")
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "config.toml", server, backups, extra)
    daemon = start_link(config, backups)
    writer = Writer(server.port).start()
    wait_until(lambda: writer.writes and writer.writes[-1][1] - writer.writes[0][1] > WRITE_FOR,
               60, "the writer's writes")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    writer.stop()
    wait_until(lambda: not open_segments(backups) and any(
        m["ended"] == "link down" for m in metas(backups)), 30, "the link-down segment")
    stop(daemon)
    server.proc = None
    for path in server.dir.glob("*"):
        if path.is_file() and path.suffix in (".rdb", ".aof"):
            path.unlink()
    server.start()
    return config, backups, writer, server


def _moments(writer: Writer) -> list[int]:
    first, last = writer.writes[0][1], writer.writes[-1][1]
    return [int(first) + 2, int((first + last) / 2), int(last) - 1]


def _restore_and_check(config: Path, server: RedisServer, writer: Writer,
                       *args: str) -> list[float]:
    lost = []
    for moment in _moments(writer):
        from datetime import UTC, datetime

        stamp = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ran = cli(config, "restore", "--to-time", stamp, "--yes", *args, timeout=180)
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
        assert "Point-in-time plan" in ran.stdout
        lost.append(check_moment(writer.writes, keys_of(server.port), moment, LOSS_BOUND))
    return lost


def test_restore_to_time_from_local_segments(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    config, backups, writer, server = _record(tmp_path, redis_factory)
    assert len(writer.writes) > 1000
    lost = _restore_and_check(config, server, writer)
    print(f"measured loss before T: {max(lost):.3f}s over {len(writer.writes)} writes")
    ran = cli(config, "restore", "--to-time", "2001-01-01T00:00:00Z", "--yes")
    assert ran.returncode != 0 and "no restorable window" in ran.stderr


def test_restore_to_time_from_s3_only(
        tmp_path: Path, redis_factory: Callable[..., RedisServer], moto_endpoint: str,
        bucket: str, no_aws_config: None) -> None:
    config, backups, writer, server = _record(
        tmp_path, redis_factory, s3_section(moto_endpoint, bucket))
    shutil.rmtree(backups / "pitr")
    for path in backups.glob("*.json"):
        path.unlink()
    for path in backups.glob("*.rdb*"):
        path.unlink()
    _restore_and_check(config, server, writer, "--from", "s3")


def test_dry_run_names_base_segments_stamp_and_offset(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    config, backups, writer, server = _record(tmp_path, redis_factory)
    moment = _moments(writer)[1]
    from datetime import UTC, datetime

    stamp = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = keys_of(server.port)
    ran = cli(config, "restore", "--to-time", stamp, "--dry-run")
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = ran.stdout
    assert "base     " in out and "segments " in out and "last offset" in out
    assert f"#TS:{moment - 1}" in out or "#TS:" in out
    assert keys_of(server.port) == before  # nothing changed


def test_to_time_without_segments_is_as_before(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "config.toml", server, backups)
    ran = cli(config, "backup")
    assert ran.returncode == 0, ran.stderr[-2000:]
    ran = cli(config, "restore", "--to-time", "2100-01-01T00:00:00Z", "--dry-run")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "no point-in-time segments" in ran.stdout
