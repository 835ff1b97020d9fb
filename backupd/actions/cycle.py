"""One full backup cycle, as `backupd backup` and each scheduled run do it.

Order matters: pending uploads first (an S3 outage must not pile up), then the new backup,
its upload, and only then retention, so that pruning never runs before the new backup is
complete and verified.
"""

from __future__ import annotations

from collections.abc import Mapping

from backupd.actions.backup import run_backup
from backupd.config import Config
from backupd.manifest import Manifest


def run_cycle(config: Config, *, trigger: str = "manual", tag: str = "",
              env: Mapping[str, str] | None = None) -> Manifest:
    """Back up now; returns the new backup's manifest. Raises a BackupdError on failure."""
    return run_backup(config, trigger=trigger, tag=tag, env=env)
