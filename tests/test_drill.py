"""`backupd verify --drill`: the backup loaded into a throwaway redis-server on a unix socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import RedisServer, Server, last_line, run_cli
from tests.test_restore import forge_backup, rdb_with_version


def backup(config: Path) -> str:
    proc = run_cli("-c", str(config), "backup", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    return last_line(proc.stdout)


@pytest.mark.matrix
def test_drill_loads_the_backup(setup: tuple[Path, RedisServer, Path],
                                server_under_test: Server) -> None:
    config, _, backups = setup
    backup_id = backup(config)
    proc = run_cli("-c", str(config), "verify", "--drill")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        f"ok       {backup_id} [local] drill ok: {server_under_test.label} loaded")
    assert "loaded 1001 keys" in proc.stdout and "manifest says 1001" in proc.stdout
    assert not [p for p in backups.iterdir() if p.name.startswith(".backupd-drill-")]

    manifest_path = backups / f"{backup_id}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["keys"] = 1000
    manifest_path.write_text(json.dumps(manifest))
    proc = run_cli("-c", str(config), "verify", "--drill", backup_id)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout and "manifest says 1000" in proc.stdout


def test_drill_says_when_the_server_is_older_than_the_rdb(
        setup: tuple[Path, RedisServer, Path]) -> None:
    config, server, backups = setup
    good = backup(config)
    newer = forge_backup(backups, good, rdb_with_version((server.dir / "dump.rdb").read_bytes(),
                                                          11))
    proc = run_cli("-c", str(config), "verify", "--drill", newer)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "older than this backup's RDB (version 11, Redis 7.2 or newer" in proc.stdout

    config.write_text(config.read_text() + '\n[verify]\nredis_server = "/nonexistent/redis"\n')
    proc = run_cli("-c", str(config), "verify", "--drill", good)
    assert proc.returncode == 1 and "not an executable" in proc.stderr
