"""Storage backends: one protocol (base.py), one module per provider."""

from backupd.storage.base import DeleteResult, Listing, Orphan, Storage

__all__ = ["DeleteResult", "Listing", "Orphan", "Storage"]
