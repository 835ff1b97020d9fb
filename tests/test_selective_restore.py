"""`backupd restore --keys`: some keys of a backup back into the running server,
on the auth service's schema (tests/seed.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from tests.conftest import (
    REDIS_SERVER,
    RedisServer,
    Server,
    last_line,
    matrix_server,
    run_cli,
    wait_until,
    write_config,
)
from tests.seed import seed, snapshot


def backup(config: Path) -> str:
    proc = run_cli("-c", str(config), "backup", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    return last_line(proc.stdout)


def undo_run(stdout: str) -> str:
    found = re.search(r"--undo-keys (\S+)", stdout)
    assert found, stdout
    return found.group(1)


@pytest.fixture
def seeded(tmp_path: Path, redis_server: RedisServer) -> tuple[Path, redis.Redis, str]:
    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    seed(client)
    config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups")
    return config, client, backup(config)


@pytest.mark.matrix
def test_lost_keys_come_back_with_their_ttls_and_nothing_else_changes(
        seeded: tuple[Path, redis.Redis, str], server_under_test: Server) -> None:
    config, client, backup_id = seeded
    original = snapshot(client)
    client.delete("oauth:client:c3", "oauth:user_tokens:u2", "oauth:token:t7")
    client.set("oauth:client:c5", '{"name": "rewritten by a bad deploy"}')
    untouched = snapshot(client)

    proc = run_cli("-c", str(config), "restore", backup_id, "--keys", "oauth:client:*",
                   "--keys", "oauth:user_tokens:*", "--keys", "oauth:token:t7", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 created, 0 replaced" in proc.stdout
    after = snapshot(client)
    for key in (b"oauth:client:c3", b"oauth:user_tokens:u2", b"oauth:token:t7"):
        assert after[key] == original[key]  # same value, same absolute expiry
    assert client.pttl("oauth:token:t7") > 29 * 86400 * 1000
    rest = {k: v for k, v in after.items()
            if k not in (b"oauth:client:c3", b"oauth:user_tokens:u2", b"oauth:token:t7")}
    assert rest == untouched  # --conflict skip left the rewritten client alone
    assert client.get("oauth:client:c5") == b'{"name": "rewritten by a bad deploy"}'


def test_replace_then_undo_round_trips(seeded: tuple[Path, redis.Redis, str]) -> None:
    config, client, _ = seeded
    original = snapshot(client)
    client.set("oauth:client:c5", '{"name": "rewritten"}')
    client.delete("oauth:client:c1")
    before = snapshot(client)

    proc = run_cli("-c", str(config), "restore", "latest", "--keys", "oauth:client:*",
                   "--conflict", "replace", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 created, 19 replaced" in proc.stdout
    assert snapshot(client) == original
    undo_file = next((config.parent / "backups" / ".backupd-undo").glob("*.jsonl"))
    assert undo_file.stat().st_mode & 0o777 == 0o600
    assert undo_file.parent.stat().st_mode & 0o777 == 0o700

    proc = run_cli("-c", str(config), "restore", "--undo-keys", undo_run(proc.stdout), "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "put back 19 replaced values, deleted 1 keys" in proc.stdout
    assert snapshot(client) == before


def test_dry_run_and_conflict_fail_change_nothing(
        seeded: tuple[Path, redis.Redis, str]) -> None:
    config, client, _ = seeded
    client.delete("oauth:client:c3", "oauth:client:c4")
    before = snapshot(client)
    proc = run_cli("-c", str(config), "restore", "--to-time", "2999-01-01T00:00:00Z",
                   "--keys", "oauth:client:*", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "db 0 oauth:client:*: restore 2, replace 0, skip (exists) 18, expired 0" \
        in proc.stdout
    assert "oauth:client:c3" in proc.stdout and "dry run" in proc.stdout

    proc = run_cli("-c", str(config), "restore", "--keys", "oauth:client:*",
                   "--conflict", "fail", "--yes")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "18 of the selected keys exist in the live server" in proc.stderr
    assert snapshot(client) == before
    assert not (config.parent / "backups" / ".backupd-undo").exists()


def test_an_expired_key_of_the_backup_is_skipped_and_counted(
        tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    seed(client)
    client.set("oauth:state:short", "s", px=1500)
    config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups")
    backup(config)
    wait_until(lambda: not client.exists("oauth:state:short"), 10, "the state key to expire")
    states = list(client.scan_iter("oauth:state:*"))
    client.delete(*states)

    proc = run_cli("-c", str(config), "restore", "--keys", "oauth:state:*", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(states)} created" in proc.stdout and "1 expired (skipped)" in proc.stdout
    assert not client.exists("oauth:state:short")
    assert 0 < client.pttl(states[0]) <= 300_000


def test_a_throwaway_newer_than_the_target_is_refused(
        tmp_path: Path, redis_server: RedisServer) -> None:
    newer = matrix_server("redis-8.2")
    if redis_server.binary != REDIS_SERVER:
        pytest.skip("the target must be Redis 7.0")
    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    seed(client)
    config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups",
                          f'[verify]\nredis_server = "{newer.binary}"\n')
    backup(config)
    client.delete("oauth:client:c1")
    proc = run_cli("-c", str(config), "restore", "--keys", "oauth:client:*", "--yes")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"is {newer.label}" in proc.stderr and "Redis 7.0" in proc.stderr
    assert "RDB version 12" in proc.stderr
    assert not client.exists("oauth:client:c1")


def test_undo_of_an_unknown_run_is_a_usage_error(seeded: tuple[Path, redis.Redis, str]) -> None:
    config, _, _ = seeded
    proc = run_cli("-c", str(config), "restore", "--undo-keys", "20260101T000000Z-abcdef",
                   "--yes")
    assert proc.returncode == 2 and "no undo record" in proc.stderr
    proc = run_cli("-c", str(config), "restore", "--undo-keys", "../etc", "--yes")
    assert proc.returncode == 2 and "not a selective-restore run id" in proc.stderr


def test_without_a_terminal_it_needs_yes(seeded: tuple[Path, redis.Redis, str]) -> None:
    config, client, _ = seeded
    client.delete("oauth:client:c1")
    proc = run_cli("-c", str(config), "restore", "--keys", "oauth:client:*")
    assert proc.returncode == 2 and "pass --yes" in proc.stderr
    assert not client.exists("oauth:client:c1")


def test_a_target_that_refuses_restore_says_how_to_undo(
        tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    seed(client)
    config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups")
    backup(config)
    client.delete("oauth:client:c1", "oauth:client:c2")
    client.acl_setuser("restorer", enabled=True, passwords=["+restorer-pw"], keys=["*"],
                       commands=["+@all", "-restore"])
    config.write_text(config.read_text().replace('[redis]\n', '[redis]\nusername = "restorer"\n'))
    proc = run_cli("-c", str(config), "restore", "--keys", "oauth:client:*", "--yes",
                   password="restorer-pw")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the target refused 2 keys" in proc.stderr and "--undo-keys" in proc.stderr
    assert not client.exists("oauth:client:c1")


def test_a_damaged_undo_record_is_refused(seeded: tuple[Path, redis.Redis, str]) -> None:
    config, client, _ = seeded
    client.set("oauth:client:c5", "changed")
    proc = run_cli("-c", str(config), "restore", "--keys", "oauth:client:c5",
                   "--conflict", "replace", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = undo_run(proc.stdout)
    path = config.parent / "backups" / ".backupd-undo" / f"{run}.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n{broken\n")
    proc = run_cli("-c", str(config), "restore", "--undo-keys", run, "--yes")
    assert proc.returncode == 1 and "line 2 is damaged" in proc.stderr
    assert client.get("oauth:client:c5") != b"changed"


def test_db_selects_one_database(tmp_path: Path, redis_server: RedisServer) -> None:
    zero = redis.Redis(port=redis_server.port, password=redis_server.password)
    one = redis.Redis(port=redis_server.port, password=redis_server.password, db=1)
    seed(zero)
    seed(one)
    config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups")
    backup(config)
    zero.delete("oauth:client:c1")
    one.delete("oauth:client:c1")
    proc = run_cli("-c", str(config), "restore", "--keys", "oauth:client:*", "--db", "1",
                   "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert one.exists("oauth:client:c1") and not zero.exists("oauth:client:c1")
    assert "db 1 oauth:client:*: restore 1" in proc.stdout and "db 0" not in proc.stdout
