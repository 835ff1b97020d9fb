"""The names backupd gives its files and objects, and the one rule for "is this name ours".

In a backup directory, and directly under an S3 prefix (no further '/'):

    <id>.json                      the manifest: written last, the commit marker
    <id>.rdb[.zst|.gz][.age]       the artifact (`Manifest.artifact`)
    <id>.shard-NNN.rdb[...]        the artifact of shard NNN of a cluster backup (`Manifest.
                                   cluster`; shard 000 is also `Manifest.artifact`)
    .<name>.tmp-<random>           a temp file being written (local only; renamed when done)
    <name> (incomplete upload <t>) an incomplete multipart upload of <name> (S3 only): `t` is
                                   the first UPLOAD_TOKEN characters of its upload id

Anything else is not ours, and is never listed, opened or deleted. Every name is derived from a
backup id, which is checked before it becomes a path or a key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from backupd.choices import Compression
from backupd.errors import UsageError

ID_PATTERN = r"\d{8}T\d{6}Z-[0-9a-f]{6}"
ID_LEN = 23  # len("YYYYMMDDTHHMMSSZ-xxxxxx")
MANIFEST_EXT = ".json"
COMPRESSION_EXT: dict[str, str] = {Compression.ZSTD: ".zst", Compression.GZIP: ".gz",
                                   Compression.NONE: ""}
TEMP_MARK = ".tmp-"  # in the name of a file being written: `.<final name>.tmp-<random>`
UPLOAD_TOKEN = 12  # leading characters of an upload id that name its orphan

_ID_RE = re.compile(rf"^{ID_PATTERN}$")
_TOKEN = re.compile(rf"[A-Za-z0-9._~+=/-]{{1,{UPLOAD_TOKEN}}}")  # an orphan's upload id start
_UPLOAD_NAME = re.compile(rf"(?P<name>.+) \(incomplete upload (?P<token>{_TOKEN.pattern})\)")


def is_valid_id(text: str) -> bool:
    return isinstance(text, str) and _ID_RE.fullmatch(text) is not None  # `$` allows a "\n"


def check_id(text: str) -> str:
    """Validate an id from a user, a file name or an object key before it is used as a path."""
    if not is_valid_id(text):
        raise UsageError(f"{text[:64]!r} is not a backup id (expected YYYYMMDDTHHMMSSZ-xxxxxx)")
    return text


def artifact_name(backup_id: str, compression: str, encrypted: bool) -> str:
    return f"{backup_id}.rdb{COMPRESSION_EXT[compression]}{'.age' if encrypted else ''}"


SHARD_MARK = ".shard-"
MAX_SHARDS = 1000  # three digits


def shard_artifact_name(backup_id: str, index: int, compression: str, encrypted: bool) -> str:
    """The artifact of one shard of a cluster backup: `<id>.shard-NNN.rdb...`, ours by the
    same rule as every name that starts with the id."""
    if not 0 <= index < MAX_SHARDS:
        raise UsageError(f"a cluster backup has at most {MAX_SHARDS} shards")
    name = artifact_name(backup_id, compression, encrypted)
    return f"{backup_id}{SHARD_MARK}{index:03d}{name[ID_LEN:]}"


def is_artifact_name(name: str, backup_id: str, compression: str, encrypted: bool) -> bool:
    """`name` is the artifact of backup `backup_id`, or of one of its shards."""
    if compression not in COMPRESSION_EXT:
        return False
    if name == artifact_name(backup_id, compression, encrypted):
        return True
    index = name[ID_LEN + len(SHARD_MARK):ID_LEN + len(SHARD_MARK) + 3]
    return (len(index) == 3 and index.isascii() and index.isdigit()
            and name == shard_artifact_name(backup_id, int(index), compression, encrypted))


def manifest_name(backup_id: str) -> str:
    return check_id(backup_id) + MANIFEST_EXT


def manifest_id(name: str) -> str | None:
    """The id whose manifest `name` is, or None."""
    backup_id = name[: -len(MANIFEST_EXT)]
    return backup_id if name.endswith(MANIFEST_EXT) and is_valid_id(backup_id) else None


def check_no_manifest(names: Iterable[str]) -> None:
    """UsageError if one of the names a caller wants deleted as orphans is a manifest: that
    would delete a backup (its commit marker) behind the retention's back."""
    for name in names:
        if manifest_id(name) is not None:
            raise UsageError(f"{name[:80]!r} is not the name of an orphaned backup object "
                             "or incomplete upload")


def owner(name: str) -> str | None:
    """The backup id a stored name (an artifact, a manifest, or a leftover of either) belongs
    to, or None if the name is not ours: `<id>.` followed by anything but '/'."""
    if "/" in name or len(name) <= ID_LEN or name[ID_LEN] != ".":
        return None
    backup_id = name[:ID_LEN]
    return backup_id if is_valid_id(backup_id) else None


def is_ours_local(name: str) -> bool:
    """A file of a backup directory that backupd wrote: `<id>...` or a temp file
    `.<id>....tmp-xxxx`."""
    if name.startswith(".") and TEMP_MARK in name:
        name = name[1:]
    return is_valid_id(name[:ID_LEN])


def temp_name(final: str, suffix: str) -> str:
    """The name of the temp file a writer of `final` uses until its rename."""
    return f".{final}{TEMP_MARK}{suffix}"


def upload_token(upload_id: str) -> str | None:
    """The start of a multipart upload id that names its orphan, or None if it cannot."""
    token = upload_id[:UPLOAD_TOKEN]
    return token if _TOKEN.fullmatch(token) else None


def upload_orphan_name(name: str, token: str) -> str:
    return f"{name} (incomplete upload {token})"


def parse_upload_orphan_name(text: str) -> tuple[str, str] | None:
    """(name, token) of an upload's orphan name of ours, or None: such a name is never taken
    for an object's, so that deleting an orphan cannot hit the wrong kind of thing."""
    match = _UPLOAD_NAME.fullmatch(text)
    if match is None or owner(match["name"]) is None:
        return None
    return match["name"], match["token"]


# -- point-in-time segments (backupd/pitr) --------------------------------------------------
#
# Under `pitr/` in a backup directory and under `<prefix>pitr/` in a bucket:
#
#     <replid>-<first offset, 20 digits>.resp      the segment: the command stream as received
#     <replid>-<first offset, 20 digits>.json      its metadata: written last, the commit marker
#     <replid>-<first offset, 20 digits>.open      (local) the segment being written
#     <replid>-<first offset, 20 digits>.progress  (local) its durable length and offset
#     <replid>-<first offset, 20 digits>.part      (S3) a piece of the open segment: the bytes
#                                                  made durable since the previous piece
#     <replid>-<first offset, 20 digits>.part.json (S3) its metadata, written after it
#
# A `.resp` without its `.json` is never a segment: an open or interrupted one. A `.part`
# counts only while no closed segment (`.json`) of the same replid covers its first offset.

SEGMENT_DIR = "pitr"
SEGMENT_DATA_EXT = ".resp"
SEGMENT_META_EXT = ".json"
SEGMENT_OPEN_EXT = ".open"
SEGMENT_PROGRESS_EXT = ".progress"
SEGMENT_PART_EXT = ".part"
SEGMENT_PART_META_EXT = ".part.json"
_SEGMENT_RE = re.compile(r"^(?P<replid>[0-9a-f]{40})-(?P<offset>\d{20})"
                         r"(?P<ext>\.resp|\.json|\.open|\.progress|\.part\.json|\.part)$")


def segment_stem(replid: str, first_offset: int) -> str:
    """The common part of a segment's names; ValueError for a replid or offset not ours."""
    stem = f"{replid}-{first_offset:020d}"
    if first_offset < 0 or _SEGMENT_RE.fullmatch(stem + SEGMENT_META_EXT) is None:
        raise ValueError(f"not a segment name: replid {replid[:48]!r} offset {first_offset}")
    return stem


def segment_of(name: str) -> tuple[str, int, str] | None:
    """(replid, first offset, extension) of a segment file name of ours, or None."""
    match = _SEGMENT_RE.fullmatch(name)
    if match is None:
        return None
    return match["replid"], int(match["offset"]), match["ext"]
