"""One exception tree; every error carries the process exit code the CLI maps it to.

Exit codes (contract): 0 ok, 1 operation failed, 2 usage or config error, 3 integrity failure,
4 busy. Messages are written for the operator and never contain secrets.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_BUSY = 4


class BackupdError(Exception):
    """Base of every error backupd raises on purpose."""

    exit_code = EXIT_FAILED


class ConfigError(BackupdError):
    """The configuration (file, env or flags) is invalid; names the key and what is expected."""

    exit_code = EXIT_USAGE


class UsageError(BackupdError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = EXIT_USAGE


class OperationError(BackupdError):
    """A backup, upload, prune or restore step failed; nothing that was kept is lost."""


class RedisUnavailable(OperationError):
    """Redis cannot be reached (down, refused, timed out)."""


class RedisLoading(RedisUnavailable):
    """Redis answers, but with -LOADING: it is still loading its data (after a start)."""


class RedisAuthError(OperationError):
    """Redis rejected the credentials or the ACL user lacks a permission."""


class StaleReplica(OperationError):
    """The server is a replica whose data may be old (link down, never synced, silent)."""


class SnapshotError(OperationError):
    """BGSAVE was refused, failed, timed out or did not produce a new file."""


class InsufficientSpace(OperationError):
    """Not enough free space for a copy; checked before the work starts."""


class StorageError(OperationError):
    """A storage backend (local directory or S3) failed."""


class BackupMissing(StorageError):
    """This location does not hold the backup: told apart from a location that cannot be read,
    so that choosing a backup by id can look in the next location instead of failing."""


class UploadPending(StorageError):
    """The upload failed; the local copy is kept and marked pending."""


class RestoreError(OperationError):
    """A restore step failed; the message says whether it was rolled back."""


class RedisExited(RestoreError):
    """Redis came up after a restore's start and then exited or restarted (a crash loop)."""


class NeverAnswered(RestoreError):
    """Nothing answered on Redis's port within restore.answer_timeout of the start."""


class IntegrityError(BackupdError):
    """A backup is corrupt: checksum, CRC, header or manifest mismatch."""

    exit_code = EXIT_INTEGRITY


class BusyError(BackupdError):
    """Another backupd process holds the lock for this backup directory."""

    exit_code = EXIT_BUSY


class ClusterError(OperationError):
    """A Redis Cluster's slot map is incomplete, changed during a backup, or does not match a
    backup's; the message names the shard or the slots."""
