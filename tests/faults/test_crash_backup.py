"""Crash consistency of `backupd backup`: SIGKILL at every named stage and at random times.

After each kill: `backupd list` shows exactly the complete backups (locally and in S3) and
`verify --all` passes for them; nothing without a manifest is listed or considered by prune;
the lock is free; and the next run exits 0, uploads what was left pending and leaves no
leftovers behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RedisServer, s3_section, write_config
from tests.faults import harness
from tests.faults.harness import (
    STATS,
    Bucket,
    assert_consistent,
    cli,
    complete_local,
    deadline_wait,
    leftovers,
    populate,
    run_killed_at,
    set_save_delay,
    spawn,
)

KEEP_2 = "keep_last = 2\nkeep_hourly = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n"


@dataclass
class Env:
    config: Path
    encrypted: Path  # the same, with age recipients (the encrypt stage)
    backups: Path
    bucket: Bucket | None
    identity: Path
    server: RedisServer
    logs: Path


def make_env(tmp_path: Path, server: RedisServer, s3: Bucket | None, age_key: tuple[str, Path],
             keep: str = KEEP_2) -> Env:
    backups = tmp_path / "backups"
    body = f"[retention]\n{keep}\n"
    if s3 is not None:
        body += s3_section(s3.endpoint, s3.name, "[s3.retention]\n" + keep)
    config = write_config(tmp_path / "c.toml", server, backups, body)
    recipient, identity = age_key
    encrypted = write_config(tmp_path / "age.toml", server, backups,
                             f"age_recipients = [{json.dumps(recipient)}]\n{body}")
    return Env(config, encrypted, backups, s3, identity, server, tmp_path / "logs")


def next_run_succeeds(env: Env) -> str:
    """The run after a crash: exit 0 (never 4: the lock is free), nothing pending, no
    leftovers; returns the new id."""
    proc = cli(env.config, "backup")
    assert proc.returncode == 0, proc.stderr[-3000:]
    harness.no_traceback(proc.stderr)
    assert leftovers(env.backups) == [], leftovers(env.backups)
    assert all(m["upload"] in ("done", "none") for m in complete_local(env.backups).values())
    return proc.stdout.strip().splitlines()[-1]


def check(env: Env) -> dict[str, list[str]]:
    listed = assert_consistent(env.config, env.backups, bucket=env.bucket,
                               identity=env.identity)
    listed.setdefault("s3", [])
    return listed


LOCAL_STAGES = ("snapshot", "copy", "compress", "encrypt", "manifest", "committed", "prune")
S3_STAGES = ("committed", "upload", "uploaded", "prune-s3")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_kill_at_each_stage(tmp_path: Path, redis_factory: Callable[..., RedisServer],
                            moto_endpoint: str, request: pytest.FixtureRequest,
                            age_key: tuple[str, Path], where: str) -> None:
    server = redis_factory()
    populate(server.port, 30_000, 48, random_values=True)  # ~2 MiB RDB: all marks reached
    bucket = request.getfixturevalue("s3") if where == "s3" else None
    env = make_env(tmp_path, server, bucket, age_key)
    next_run_succeeds(env)
    next_run_succeeds(env)
    stages = LOCAL_STAGES if bucket is None else S3_STAGES
    before = check(env)
    for stage in stages:
        config = env.encrypted if stage == "encrypt" else env.config
        run_killed_at(config, stage, "backup")
        after = check(env)
        new_local = set(after["local"]) - set(before["local"])
        gone_local = set(before["local"]) - set(after["local"])
        new_s3 = set(after["s3"]) - set(before["s3"])
        gone_s3 = set(before["s3"]) - set(after["s3"])
        rest = leftovers(env.backups)
        if stage in ("snapshot", "copy", "compress", "encrypt", "manifest"):
            assert not new_local and not gone_local and not new_s3, (stage, after)
            if stage == "manifest":  # a whole artifact without its manifest: not a backup
                assert len(rest) == 1 and rest[0].endswith(".rdb.zst"), rest
        elif stage in ("committed", "upload"):
            (new,) = new_local
            state = "pending" if bucket is not None else "none"
            assert complete_local(env.backups)[new]["upload"] == state
            assert not new_s3
            if stage == "upload":
                assert bucket is not None
                assert any(new in key for key in bucket.orphans()), bucket.keys()
        elif stage == "uploaded":
            (new,) = new_local
            assert new_s3 == {new}
            assert complete_local(env.backups)[new]["upload"] == "pending"
        elif stage == "prune":
            assert len(new_local) == 1 and len(gone_local) == 1, (before, after)
            assert any(name.startswith(next(iter(gone_local))) for name in rest), rest
        elif stage == "prune-s3":
            assert bucket is not None
            assert len(gone_local) == 1 and len(gone_s3) == 1, (before, after)
            (gone,) = gone_s3
            assert [k for k in bucket.orphans() if gone in k], bucket.keys()
        next_run_succeeds(env)
        before = check(env)
        assert len(before["local"]) == 2, before
        assert len(before["s3"]) == (2 if bucket is not None else 0), before


@pytest.mark.slow
def test_kill_at_random_times(tmp_path: Path, redis_factory: Callable[..., RedisServer],
                              s3: Bucket, age_key: tuple[str, Path]) -> None:
    """At least 50 SIGKILLs at random moments of a backup with upload and prune."""
    seed = int(os.environ.get("BACKUPD_FAULT_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"random kill seed: {seed} (BACKUPD_FAULT_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    server = redis_factory()
    populate(server.port, 30_000, 64)
    set_save_delay(server.port, -5)  # 1 in 5 keys sleeps: the save takes ~0.5 s
    keep3 = KEEP_2.replace("keep_last = 2", "keep_last = 3")
    env = make_env(tmp_path, server, s3, age_key, keep=keep3)
    started = harness.monotonic()
    next_run_succeeds(env)
    duration = harness.monotonic() - started
    kills = runs = 0
    while kills < 52:
        runs += 1
        config = env.encrypted if runs % 3 == 0 else env.config
        spawned = spawn(config, "backup", logs=env.logs)
        finished = deadline_wait(spawned.proc, rng.uniform(0.0, duration * 1.15))
        if not finished:
            spawned.kill()
            kills += 1
        code = spawned.proc.returncode
        _, err = spawned.output()
        assert code in (0, -signal.SIGKILL), (code, err[-3000:])  # never 4: lock never stuck
        harness.no_traceback(err)
        check(env)
        if runs % 10 == 0:
            next_run_succeeds(env)
            check(env)
    STATS["random_kills"] += kills
    STATS["random_runs"] += runs
    next_run_succeeds(env)
    final = check(env)
    assert len(final["local"]) == 3 and len(final["s3"]) == 3, final
