"""Point-in-time restore end to end: `backupd run` with [pitr] follows a real Redis while a
writer records when each write was acknowledged; Redis is killed; `restore --to-time T` for
several T brings back every write acknowledged before T and none sent after it, from the
local segments and from S3 alone (local copies deleted)."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import S3_KEY_ID, S3_SECRET, RedisServer, s3_section, wait_until
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

# The newest write that may be missing before T: a write is stamped when backupd reads it.
# Measured here: 6-30 ms (docs/benchmarks.md); the bound leaves room for four test suites
# sharing the 2 cores.
LOSS_BOUND = 1.5
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
        ran = cli(config, "restore", "--to-time", _stamp(moment), "--yes", *args, timeout=180)
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
        assert "Point-in-time plan" in ran.stdout
        lost.append(check_moment(writer.writes, keys_of(server.port), moment, LOSS_BOUND))
    return lost


def _stamp(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.matrix
def test_restore_to_time_from_local_segments(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    config, _, writer, server = _record(tmp_path, redis_factory)
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
    # A segment corrupted in the bucket: the window ends before it, later times are refused.
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=S3_KEY_ID,
                      aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(
        Bucket=bucket, Prefix="redis/prod/pitr/")["Contents"] if o["Key"].endswith(".resp"))
    victim = keys[len(keys) // 2]
    meta = json.loads(s3.get_object(Bucket=bucket, Key=victim[:-5] + ".json")["Body"].read())
    body = bytearray(s3.get_object(Bucket=bucket, Key=victim)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=victim, Body=bytes(body))
    listed = cli(config, "list", "--pitr", "--json", "--location", "s3")
    assert listed.returncode == 0, listed.stderr[-2000:]
    [chain] = json.loads(listed.stdout)["chains"]
    assert "corrupt" in chain["ends_because"]
    assert chain["to"] < _stamp(int(meta["first_time"]) + 1)
    later = cli(config, "restore", "--to-time", _stamp(int(meta["last_time"])), "--yes",
                "--from", "s3")
    assert later.returncode != 0 and "is corrupt" in later.stderr
    assert "window ends before it" in later.stderr
    earlier = int(meta["first_time"]) - 1
    if earlier > writer.writes[0][1] + 1:
        ran = cli(config, "restore", "--to-time", _stamp(earlier), "--yes", "--from", "s3")
        assert ran.returncode == 0, ran.stderr[-3000:]
        check_moment(writer.writes, keys_of(server.port), earlier, LOSS_BOUND)


def test_dry_run_names_base_segments_stamp_and_offset(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    config, _, writer, server = _record(tmp_path, redis_factory)
    moment = _moments(writer)[1]
    before = keys_of(server.port)
    ran = cli(config, "restore", "--to-time", _stamp(moment), "--dry-run")
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


def test_the_open_segment_reaches_s3_every_upload_interval(
        tmp_path: Path, redis_factory: Callable[..., RedisServer], moto_endpoint: str,
        bucket: str, no_aws_config: None) -> None:
    """backupd and its disk lost mid-segment: the bucket alone restores to seconds before,
    from pieces that each hold only what was new."""
    import boto3

    server = redis_factory("--repl-diskless-sync-delay", "0")
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "config.toml", server, backups,
                         s3_section(moto_endpoint, bucket) + "", segment="1h")
    config.write_text(config.read_text().replace('segment = "1h"',
                                                 'segment = "1h"\nupload_interval = "1s"'))
    daemon = start_link(config, backups)
    client = server.client()
    client.set("written", "before the loss")
    written = datetime.now(UTC).timestamp()
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=S3_KEY_ID,
                      aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def pieces() -> list[dict[str, object]]:
        out = []
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix="redis/prod/pitr/").get(
                "Contents", []):
            if obj["Key"].endswith(".part.json"):
                out.append(json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])[
                    "Body"].read()))
        return sorted(out, key=lambda m: int(m["first_offset"]))  # type: ignore[call-overload]

    def piece_after(moment: float) -> bool:
        return any(int(m["last_time"]) >= moment + 2 for m in pieces())  # type: ignore[call-overload]

    wait_until(lambda: piece_after(written), 60, "the open segment's piece in the bucket")
    client.set("later", "in a later piece")
    later = datetime.now(UTC).timestamp()
    wait_until(lambda: piece_after(later), 60, "a later piece in the bucket")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.wait(10)
    found = pieces()
    assert len(found) >= 2
    for before, after in itertools.pairwise(found):
        assert after["first_offset"] == int(before["last_offset"]) + 1  # type: ignore[call-overload]
    opened = sum(f.stat().st_size for f in (backups / "pitr").glob("*.open"))
    sizes = sum(int(o["Size"]) for o in s3.list_objects_v2(
        Bucket=bucket, Prefix="redis/prod/pitr/")["Contents"] if o["Key"].endswith(".part"))
    assert 0 < sizes <= opened  # each piece only what is new: no prefix uploaded twice
    shutil.rmtree(backups)
    backups.mkdir()
    client.flushall()
    ran = cli(config, "restore", "--to-time", _stamp(int(later) + 2), "--yes",
              "--from", "s3")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert client.get("written") == "before the loss"
    assert client.get("later") == "in a later piece"
    client.close()
