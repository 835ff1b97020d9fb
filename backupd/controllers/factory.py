"""Build the controller for `restore.method` (or `--method`)."""

from __future__ import annotations

from collections.abc import Callable

import redis

from backupd.choices import RestoreMethod
from backupd.config import RestoreConfig
from backupd.controllers.base import Controller, Probe
from backupd.errors import UsageError

METHODS = tuple(m for m in RestoreMethod if m is not RestoreMethod.REPLICAOF)  # stop and start


def make_controller(method: str, cfg: RestoreConfig, *, answers: Probe,
                    connect: Callable[[], redis.Redis]) -> Controller:
    if method == RestoreMethod.COMMAND:
        from backupd.controllers.command import CommandController

        return CommandController(cfg, answers)
    if method == RestoreMethod.SHUTDOWN:
        from backupd.controllers.shutdown import ShutdownController

        return ShutdownController(connect)
    if method == RestoreMethod.DOCKER:
        from backupd.controllers.docker import DockerController

        return DockerController(cfg)
    raise UsageError(f"unknown restore method {method!r} (expected one of {', '.join(METHODS)})")
