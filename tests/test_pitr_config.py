"""[pitr]: the contract keys, their defaults, and durations that must be > 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd import config as cfg
from backupd.errors import ConfigError


def _load(tmp_path: Path, pitr: str) -> cfg.Config:
    path = tmp_path / "c.toml"
    path.write_text(f'[redis]\nhost = "h"\ndata_dir = "/data"\n[backup]\ndir = "{tmp_path}/b"\n'
                    f"[pitr]\n{pitr}\n")
    return cfg.load(path)


def test_defaults_and_keys(tmp_path: Path) -> None:
    p = _load(tmp_path, "enabled = true").pitr
    assert (p.enabled, p.fsync, p.segment, p.upload_interval, p.max_lag, p.window) == (
        True, 1.0, 300.0, 10.0, 30.0, 7 * 86400.0)


@pytest.mark.parametrize("line", ['fsync = "0s"', 'segment = "0s"', 'window = "0s"',
                                  'max_lag = "soon"', 'unknown = 1'])
def test_bad_values_are_refused(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match="pitr"):
        _load(tmp_path, line)
