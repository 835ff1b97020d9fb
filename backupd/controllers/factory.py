"""Build the controller for `restore.method` (or `--method`)."""

from __future__ import annotations

from collections.abc import Callable

import redis

from backupd.config import RestoreConfig
from backupd.controllers.base import Controller, Probe
from backupd.errors import UsageError

METHODS = ("docker", "command", "shutdown")


def make_controller(method: str, cfg: RestoreConfig, *, answers: Probe,
                    connect: Callable[[], redis.Redis]) -> Controller:
    if method == "command":
        from backupd.controllers.command import CommandController

        return CommandController(cfg, answers)
    if method == "shutdown":
        from backupd.controllers.shutdown import ShutdownController

        return ShutdownController(connect)
    if method == "docker":
        from backupd.controllers.docker import DockerController

        return DockerController(cfg)
    raise UsageError(f"unknown restore method {method!r} (expected one of {', '.join(METHODS)})")
