"""The real `backupd` CLI in a subprocess against a real redis-server."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import filelock
import pytest

from tests.conftest import (
    PASSWORD,
    RedisServer,
    Server,
    fill,
    last_line,
    run_cli,
    write_config,
)


def backup(config: Path, *extra: str) -> str:
    proc = run_cli("-c", str(config), "backup", *extra)
    assert proc.returncode == 0, proc.stderr
    return last_line(proc.stdout)


@pytest.mark.matrix
def test_backup_list_verify(setup: tuple[Path, RedisServer, Path],
                            server_under_test: Server) -> None:
    config, _, backups = setup
    backup_id = backup(config, "--tag", "before-upgrade")
    manifest = json.loads((backups / f"{backup_id}.json").read_text())
    assert manifest["keys"] == 1001 and manifest["keys_per_db"] == {"db0": 1001}
    assert manifest["rdb_version"] == server_under_test.rdb_version
    assert manifest["rdb_checksum"] == "ok" and manifest["trigger"] == "manual"
    assert manifest["redis"]["version"] == server_under_test.version  # Valkey's real version
    assert manifest["redis"]["server"] == server_under_test.kind
    assert manifest["tag"] == "before-upgrade" and manifest["format_version"] == 1
    assert manifest["created_at"].endswith("Z") and manifest["compression"] == "zstd"
    artifact = backups / manifest["artifact"]
    assert artifact.name == f"{backup_id}.rdb.zst"
    assert manifest["stored_size"] == artifact.stat().st_size
    for path in (artifact, backups / f"{backup_id}.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700

    listed = run_cli("-c", str(config), "list", "--json")
    assert listed.returncode == 0
    entries = json.loads(listed.stdout)
    assert [e["id"] for e in entries] == [backup_id]
    assert entries[0]["locations"] == ["local"] and entries[0]["redis_version"]
    assert entries[0]["server"] == server_under_test.kind
    table = run_cli("-c", str(config), "list")
    assert backup_id in table.stdout and "1001" in table.stdout
    assert server_under_test.label in table.stdout  # "Valkey 8.1.8", not "7.2.4"

    verified = run_cli("-c", str(config), "verify", "--deep")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "redis-check-rdb" in verified.stdout and backup_id in verified.stdout


def test_newest_first_and_verify_all(setup: tuple[Path, RedisServer, Path]) -> None:
    config, _, _ = setup
    ids = [backup(config) for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    listed = json.loads(run_cli("-c", str(config), "list", "--json").stdout)
    assert [e["id"] for e in listed] == ids[::-1]
    proc = run_cli("-c", str(config), "verify", "--all")
    assert proc.returncode == 0 and proc.stdout.count("ok ") == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "missing"])
def test_verify_detects_corruption(setup: tuple[Path, RedisServer, Path], damage: str) -> None:
    config, _, backups = setup
    good = backup(config)
    bad = backup(config)
    artifact = backups / f"{bad}.rdb.zst"
    data = bytearray(artifact.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        artifact.write_bytes(bytes(data))
    elif damage == "truncate":
        artifact.write_bytes(bytes(data[:-100]))
    elif damage == "manifest":
        (backups / f"{bad}.json").write_text("{not json")
    else:
        artifact.unlink()
    proc = run_cli("-c", str(config), "verify", "--all")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"CORRUPT  {bad}" in proc.stdout
    assert f"ok       {good}" in proc.stdout
    if damage in ("flip", "truncate"):
        single = run_cli("-c", str(config), "verify", bad)
        assert single.returncode == 3


def test_gzip_encrypted_backup_verifies_with_identity(
        tmp_path: Path, setup: tuple[Path, RedisServer, Path]) -> None:
    from pyrage import x25519

    identity = x25519.Identity.generate()
    config, server, backups = setup
    write_config(config, server, backups,
                 f'compression = "gzip"\ncompression_level = 6\n'
                 f'age_recipients = ["{identity.to_public()}"]')
    backup_id = backup(config)
    assert (backups / f"{backup_id}.rdb.gz.age").exists()
    plain = run_cli("-c", str(config), "verify", backup_id)
    assert plain.returncode == 0 and "give --identity-file" in plain.stdout
    key = tmp_path / "key.txt"
    key.write_text(f"# created: now\n{identity}\n")
    full = run_cli("-c", str(config), "verify", backup_id, "--identity-file", str(key))
    assert full.returncode == 0 and "rdb-crc:ok" in full.stdout
    other = tmp_path / "other.txt"
    other.write_text(str(x25519.Identity.generate()) + "\n")
    wrong = run_cli("-c", str(config), "verify", backup_id, "--identity-file", str(other))
    assert wrong.returncode == 3 and "cannot decrypt" in wrong.stdout
    assert str(identity) not in wrong.stdout + wrong.stderr


def test_second_backup_is_busy(setup: tuple[Path, RedisServer, Path]) -> None:
    config, _, backups = setup
    backups.mkdir(mode=0o700)
    with filelock.FileLock(backups / ".backupd.lock", timeout=0):
        proc = run_cli("-c", str(config), "backup")
    assert proc.returncode == 4
    assert "another backup is running" in proc.stderr


def test_leftovers_of_a_crash_are_not_backups_and_are_cleaned(
        setup: tuple[Path, RedisServer, Path]) -> None:
    config, _, backups = setup
    good = backup(config)
    orphan = backups / "20200101T000000Z-abcdef.rdb.zst"
    orphan.write_bytes(b"half written")
    temp = backups / f".{good[:-6]}123456.rdb.zst.tmp-1234abcd"
    temp.write_bytes(b"partial")
    foreign = backups / "notes.txt"
    foreign.write_text("mine")
    assert [e["id"] for e in json.loads(
        run_cli("-c", str(config), "list", "--json").stdout)] == [good]
    backup(config)
    assert not orphan.exists() and not temp.exists()
    assert foreign.exists(), "files that are not backupd's are never touched"


def test_anomaly_warning_recorded(setup: tuple[Path, RedisServer, Path]) -> None:
    config, server, backups = setup
    backup(config)
    server.client().flushall()
    second = backup(config)
    warnings = json.loads((backups / f"{second}.json").read_text())["warnings"]
    assert any("0 keys" in w for w in warnings)
    assert any("under half the size" in w for w in warnings)


def test_redis_down_exit_1(setup: tuple[Path, RedisServer, Path]) -> None:
    config, server, backups = setup
    server.stop()
    proc = run_cli("-c", str(config), "backup")
    assert proc.returncode == 1
    assert "cannot connect to Redis" in proc.stderr
    assert not any(p.name.endswith(".json") for p in backups.glob("*"))


def test_secrets_never_printed(tmp_path: Path,
                               redis_factory: Callable[..., RedisServer]) -> None:
    """Every failure path, run with a known password: it appears in no output."""
    server = redis_factory()
    fill(server, 10)
    config = write_config(tmp_path / "c.toml", server, tmp_path / "b")
    outputs = []
    for password in (PASSWORD, "wrong-" + PASSWORD):
        for args in (["backup"], ["config", "check"], ["list"], ["verify"], ["--help"]):
            proc = run_cli("-c", str(config), *args, password=password)
            outputs.append(proc.stdout + proc.stderr)
    server.stop()
    proc = run_cli("-c", str(config), "backup")
    outputs.append(proc.stdout + proc.stderr)
    assert all(PASSWORD not in text for text in outputs)
    assert any("rejected the password" in text for text in outputs)


def test_bad_config_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[redis]\nport = "six"\n')
    proc = run_cli("-c", str(config), "backup")
    assert proc.returncode == 2
    assert "redis.port" in proc.stderr and "expected an integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = run_cli("-c", str(tmp_path / "nope.toml"), "list")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_config_check_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[backup]\ndir = "/tmp/x"\n[notify]\n'
                      'webhook_url = "https://hooks.example/T000/very-secret-token"\n')
    proc = run_cli("-c", str(config), "config", "check")
    assert proc.returncode == 0, proc.stderr
    assert "very-secret-token" not in proc.stdout + proc.stderr
    assert 'webhook_url = "***"' in proc.stdout and 'password = "***"' in proc.stdout
    env_proc = run_cli("-c", str(config), "config", "check",
                       env={"BACKUPD_REDIS__PORT": "6380"})
    assert "port = 6380" in env_proc.stdout


def test_help_lists_exit_codes() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0 and "4  busy" in proc.stdout
    assert run_cli("backup", "--help").stdout.count("Exit codes") == 1


def test_console_script_and_module_agree() -> None:
    script = Path(sys.executable).parent / "backupd"
    via_script = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                timeout=60, check=False)
    assert via_script.returncode == 0
    assert via_script.stdout == run_cli("--version").stdout
    assert via_script.stdout.startswith("backupd, version")


@pytest.mark.matrix
def test_key_count_is_exact_from_the_rdb(tmp_path: Path,
                                         redis_factory: Callable[..., RedisServer]) -> None:
    """Behind an AOF rewrite the save forks later than INFO is read: the RDB's own count wins."""
    server = redis_factory("--appendonly", "yes")
    fill(server, 1000)
    backups = tmp_path / "backups"
    config = write_config(tmp_path / "c.toml", server, backups)
    client = server.client()
    client.config_set("rdb-key-save-delay", 2000)  # rewrite and save take ~2 s each
    client.bgrewriteaof()
    proc = subprocess.Popen(
        [sys.executable, "-m", "backupd", "--log-format", "json", "-c", str(config), "backup"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "REDIS_PASSWORD": PASSWORD})
    assert proc.stderr is not None
    for line in proc.stderr:
        if "bgsave_requested" in line:
            assert "Background saving scheduled" in line
            break
    client.set("written:before-the-fork", "1")  # INFO said 1001 keys; the RDB holds 1002
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    manifest = json.loads((backups / f"{last_line(out)}.json").read_text())
    assert manifest["keys"] == 1002
    assert manifest["keys_exact"] is True


def test_config_check_validates_schedule_and_notify(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[backup]\ndir = "/tmp/x"\n[schedule]\ncron = "61 * * * *"\n')
    proc = run_cli("-c", str(config), "config", "check")
    assert proc.returncode == 2 and "schedule.cron" in proc.stderr
    config.write_text('[backup]\ndir = "/tmp/x"\n[notify]\nwebhook_url = "ftp://x/secret-1"\n')
    proc = run_cli("-c", str(config), "config", "check")
    assert proc.returncode == 2 and "notify.webhook_url" in proc.stderr
    assert "secret-1" not in proc.stderr


def test_a_port_that_is_not_redis(tmp_path: Path) -> None:
    """Something else (here an HTTP server) answers on redis.port: a clear error, exit 1."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    (tmp_path / "d").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'[redis]\nport = {port}\ndata_dir = "{tmp_path / "d"}"\n'
                      f'[backup]\ndir = "{tmp_path / "b"}"\n')
    try:
        proc = run_cli("-c", str(config), "backup")
    finally:
        listener.close()
    assert proc.returncode == 1, proc.stderr
    assert "does not answer in the Redis protocol" in proc.stderr
    assert "unexpected_error" not in proc.stderr
