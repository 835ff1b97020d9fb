"""backupd: backup and restore daemon for Redis."""

__version__ = "0.1.0"
