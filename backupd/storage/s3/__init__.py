"""The S3 (and S3-compatible) backend: client.py builds the client, errors.py turns errors into
operator sentences, storage.py lists, reads, puts, commits and deletes, multipart.py streams an
upload while pack() writes the artifact."""

from backupd.storage.s3.client import make_client
from backupd.storage.s3.multipart import (
    MIN_PART_SIZE,
    StreamingUpload,
    abort_open_uploads,
    part_size,
    stream_part_size,
)
from backupd.storage.s3.storage import META_ID, META_SHA256, S3Storage

__all__ = ["META_ID", "META_SHA256", "MIN_PART_SIZE", "S3Storage", "StreamingUpload",
           "abort_open_uploads", "make_client", "part_size", "stream_part_size"]
