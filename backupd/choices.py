"""The closed sets of values a key or flag takes; config choices, click choices and the
factories keyed by them are all derived from these, so a new value is added in one place."""

from __future__ import annotations

from enum import StrEnum


class Compression(StrEnum):
    ZSTD = "zstd"
    GZIP = "gzip"
    NONE = "none"


class RestoreMethod(StrEnum):
    DOCKER = "docker"
    COMMAND = "command"
    SHUTDOWN = "shutdown"
    REPLICAOF = "replicaof"


class Location(StrEnum):
    LOCAL = "local"
    S3 = "s3"


ALL_LOCATIONS = "all"  # `--location all`: every configured location


class Checksum(StrEnum):
    """The checksum S3 stores with each object (`s3.checksum`)."""

    SHA256 = "sha256"
    CRC32 = "crc32"
    NONE = "none"


def values(choices: type[StrEnum]) -> list[str]:
    """The values of `choices`, in definition order (click.Choice, error messages)."""
    return [member.value for member in choices]
