"""Manifests read from S3, kept for the life of the process.

A manifest is written once (the commit) and never changed, so the daemon, which lists the
bucket every cycle, need not GET every manifest again each time. An entry is keyed by where the
object is (endpoint, bucket, prefix, id) and by the ETag the listing reports: a manifest
rewritten in place (by hand, or by a damaged bucket) has another ETag and is read again. Only
manifests that parsed are kept; a delete drops its entries; the least recently used go first
when the cache is full.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from backupd.manifest import Manifest

CAPACITY = 4096  # manifests (a few KiB each): far more than any retention policy keeps


class Where(NamedTuple):
    endpoint: str
    bucket: str
    prefix: str
    backup_id: str


class ManifestCache:
    """Thread-safe: the listing reads manifests from a pool of threads."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[Where, str], Manifest] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, where: Where, etag: str) -> Manifest | None:
        if not etag:
            return None
        with self._lock:
            manifest = self._entries.get((where, etag))
            if manifest is not None:
                self._entries.move_to_end((where, etag))
            return manifest

    def put(self, where: Where, etag: str, manifest: Manifest) -> None:
        if not etag:
            return
        with self._lock:
            self._entries[(where, etag)] = manifest
            self._entries.move_to_end((where, etag))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def drop(self, wheres: Iterable[Where]) -> None:
        gone = set(wheres)
        with self._lock:
            for key in [k for k in self._entries if k[0] in gone]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


MANIFESTS = ManifestCache()
