"""`backupd diff` and `backupd inspect`: checked against a brute-force comparison of
the servers' whole contents (tests/seed.py snapshot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer, last_line, run_cli, write_config
from tests.seed import seed, snapshot


def backup(config: Path) -> str:
    proc = run_cli("-c", str(config), "backup", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    return last_line(proc.stdout)


def bulk(client: redis.Redis, n: int) -> None:
    """Strings, small and big (hash-table encoded) hashes and sets, some with TTLs."""
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"bulk:s:{i}", f"v{i}", ex=30 * 86400 if i % 3 == 0 else None)
        if i % 10 == 0:
            size = 300 if i % 100 == 0 else 3
            pipe.hset(f"bulk:h:{i}", mapping={f"f{j}": j for j in range(size)})
            pipe.sadd(f"bulk:set:{i}", *(f"m{j}" for j in range(size)))
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()


def mutate(client: redis.Redis, n: int, salt: str) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(0, n, 97):
        pipe.delete(f"bulk:s:{i}")
        pipe.set(f"new:{salt}:{i}", "x")
    for i in range(1, n, 89):
        pipe.set(f"bulk:s:{i}", f"changed-{salt}", keepttl=True)
    for i in range(len(salt), n, 101):  # other keys each time: a TTL class changes
        pipe.expire(f"bulk:s:{i}", 3600)  # none or 30 days -> 1 hour
    pipe.hset("bulk:h:100", "extra", salt)
    pipe.delete("bulk:set:10")
    pipe.hset("bulk:set:10", "now", "a hash")  # type change
    pipe.execute()


def expected(a: dict[bytes, tuple[str, object, int]],
             b: dict[bytes, tuple[str, object, int]]) -> dict[str, set[str]]:
    return {"only_a": {k.decode() for k in a.keys() - b.keys()},
            "only_b": {k.decode() for k in b.keys() - a.keys()},
            "changed": {k.decode() for k in a.keys() & b.keys() if a[k] != b[k]}}


def run_diff(config: Path, *args: str) -> dict[str, set[str]]:
    proc = run_cli("-c", str(config), "diff", *args, "--list", "--json", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    found: dict[str, set[str]] = {"only_a": set(), "only_b": set(), "changed": set()}
    for entry in data["keys"]:
        found[entry["category"]].add(entry["key"])
    assert {c: len(v) for c, v in found.items()} == {c: data["total"][c] for c in found}
    return found


def check_against_brute_force(tmp_path: Path, server: RedisServer, n: int) -> None:
    client = redis.Redis(port=server.port, password=server.password)
    seed(client)
    bulk(client, n)
    config = write_config(tmp_path / "config.toml", server, tmp_path / "backups")
    first, in_first = backup(config), snapshot(client)
    mutate(client, n, "b")
    second, in_second = backup(config), snapshot(client)
    mutate(client, n, "live")
    client.delete("oauth:client:c3")
    live = snapshot(client)

    want = expected(in_first, in_second)
    assert all(want.values())
    assert run_diff(config, first, second) == want
    assert run_diff(config, second, "live") == expected(in_second, live)


def test_diff_matches_a_brute_force_comparison(tmp_path: Path,
                                               redis_server: RedisServer) -> None:
    check_against_brute_force(tmp_path, redis_server, 3000)


@pytest.mark.slow
def test_diff_matches_a_brute_force_comparison_on_100k_keys(
        tmp_path: Path, redis_server: RedisServer) -> None:
    check_against_brute_force(tmp_path, redis_server, 100_000)


def test_diff_counts_per_prefix_and_inspect_shows_the_schema(
        tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    seed(client)
    config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups")
    backup_id = backup(config)
    client.delete("oauth:client:c3")
    client.set("oauth:client:c5", "{}")
    proc = run_cli("-c", str(config), "diff", "--keys", "oauth:client:*")
    assert proc.returncode == 0, proc.stderr
    assert f"A = backup {backup_id}" in proc.stdout
    assert "only in A 1, only in B 0, changed 1 (value 1), same 18" in proc.stdout
    assert any(line.split() == ["oauth:client:", "1", "0", "1", "18"]
               for line in proc.stdout.splitlines())

    proc = run_cli("-c", str(config), "inspect", "--json")
    assert proc.returncode == 0, proc.stderr
    prefixes = json.loads(proc.stdout)["prefixes"]
    assert prefixes["db0 oauth:client:"]["keys"] == 20
    assert prefixes["db0 oauth:client:"]["ttl"] == {"none": 20}
    assert prefixes["db0 oauth:token:"]["ttl"] == {"<=30d": 50}
    assert prefixes["db0 oauth:refresh:"]["ttl"] == {"<=1y": 50}
    assert prefixes["db0 oauth:state:"]["ttl"] == {"<5m": 5}
    assert prefixes["db0 oauth:user_tokens:"]["types"] == {"set": 10}
    assert prefixes["db0 oauth:client:"]["memory"] > 0


def test_diff_and_inspect_without_a_throwaway_server_fail_clearly(
        tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    seed(client)
    config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups")
    backup(config)
    config.write_text(config.read_text() + '\n[verify]\nredis_server = "/nonexistent/redis"\n')
    for args in (("diff",), ("inspect",)):
        proc = run_cli("-c", str(config), *args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "not an executable" in proc.stderr
    assert not [p for p in (tmp_path / "backups").iterdir() if p.name.startswith(".backupd-keys")]
