"""Restore that cannot be fooled (issue 11): what the restart really loads is checked before
and after, on real redis-server processes controlled like services (tests/test_restore.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_restore import (
    Service,
    backup,
    contents,
    populate,
    restore,
    rewrite,
    services,  # noqa: F401 - the fixture (parameters naming it: noqa F811)
)


def last_error(stderr: str) -> str:
    return str(json.loads(stderr.strip().splitlines()[-1])["error"])


@pytest.mark.parametrize("method", ["command", "shutdown"])
def test_runtime_aof_flag_does_not_decide_what_is_restored(
        tmp_path: Path, services: Callable[..., Service], method: str) -> None:  # noqa: F811
    """Case 1: started with appendonly yes, then CONFIG SET appendonly no: the restart loads
    the AOF directory, so it must hold the backup too."""
    service = services("--appendonly", "yes",
                       supervised="always" if method == "shutdown" else None)
    populate(service, "orig")
    client = service.client()
    client.config_set("appendonly", "no")
    client.close()
    rewrite(service, "backed-up", 120)
    expected = contents(service)
    config = service.config(tmp_path / "config.toml", tmp_path / "backups", method=method)
    backup_id = backup(config)
    rewrite(service, "newest", 80)

    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == expected
    base = service.dir / "appendonlydir" / "appendonly.aof.1.base.rdb"
    assert base.read_bytes() == (service.dir / "dump.rdb").read_bytes()
