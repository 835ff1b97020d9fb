"""Named points in a backup or restore, where the crash-consistency tests stop the process.

TEST HOOK. Production never sets these variables; then `reached` is one comparison of a
constant read at import, and nothing else happens.

    BACKUPD_CRASH_AT=<stage>       SIGKILL this process when it reaches <stage> (as a power cut
                                   or an OOM kill would: no cleanup, no finally, no atexit).
    BACKUPD_PAUSE_AT=<stage>       at <stage>, create the file BACKUPD_PAUSE_FILE (holding our
    BACKUPD_PAUSE_FILE=<path>      pid) and wait until someone deletes it (at most
                                   PAUSE_LIMIT seconds), so that a test can break something
                                   (Redis, the disk) at exactly that point and then let go.

Stages (tests/faults/ kills at each of them):

  backup   snapshot    BGSAVE requested, nothing read or written yet (Redis may be saving)
           copy        1 MiB of the snapshot read into the pipeline (temp artifact open)
           compress    half of the snapshot read, or all of it when its size was only known
                       at the end (read while Redis wrote it) (only when compressing)
           encrypt     all of the snapshot read, encryption of the tail pending (only with age)
           manifest    artifact renamed into place, its manifest not written yet
           committed   manifest written (upload, if any, and prune still to come)
           upload      S3: artifact uploaded and checked, the remote manifest not written yet
           uploaded    S3: remote manifest written, the local one still says "pending"
           prune       a local backup's manifest deleted, its artifact not yet
           prune-s3    S3: the manifests of doomed backups deleted, their artifacts not yet
  restore  restore-fetch      1 MiB of the artifact staged
           restore-staged     staging complete and verified, nothing changed yet
           restore-snapshot   the pre-restore BGSAVE is done
           restore-<state>    the journal was just saved with <state> (quiescing, stopping,
                              swapping, swapped, restarting, done)
           restore-stopped    Redis is down, nothing swapped yet
           restore-moved      Redis's files are moved aside, the new ones not yet in place
           restore-started    the start command returned, Redis not checked yet
           restore-replicaof  replicaof method: the target was just made a replica of the
                              throwaway server, the sync not waited for yet
           restore-live-replicating, restore-live-rolling-back
                              replicaof method: the live journal was just saved, naming the
                              throwaway the target is about to replicate from
           restore-live-synced    replicaof method: the sync is complete, REPLICAOF NO ONE not
                              sent yet
           restore-live-released  replicaof method: a master again, the data not checked yet
           rollback-stopped   rollback: Redis is down, nothing moved back yet
           rollback-put-back  rollback: the previous files are back, Redis not started yet
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CRASH_ENV = "BACKUPD_CRASH_AT"
PAUSE_ENV = "BACKUPD_PAUSE_AT"
PAUSE_FILE_ENV = "BACKUPD_PAUSE_FILE"
PAUSE_LIMIT = 120.0

_CRASH_AT = os.environ.get(CRASH_ENV, "")
_PAUSE_AT = os.environ.get(PAUSE_ENV, "")
_PAUSE_FILE = os.environ.get(PAUSE_FILE_ENV, "")
ACTIVE = bool(_CRASH_AT or (_PAUSE_AT and _PAUSE_FILE))


def reached(stage: str) -> None:
    """Mark `stage`; kills or pauses the process only when a test asked for that stage."""
    if not ACTIVE:
        return
    if stage == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if stage == _PAUSE_AT and _PAUSE_FILE:
        _pause(Path(_PAUSE_FILE))


def _pause(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + PAUSE_LIMIT
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


class ByteMarks:
    """A pipeline observer (streams.ObservedReader) that marks stages by bytes seen:
    `marks` is [(byte count, stage)]; each stage is reached once, when that many bytes passed."""

    def __init__(self, marks: list[tuple[int, str]]) -> None:
        self._marks = sorted(marks) if ACTIVE else []
        self._seen = 0

    def __call__(self, data: bytes) -> None:
        if not self._marks:
            return
        self._seen += len(data)
        while self._marks and self._seen >= self._marks[0][0]:
            reached(self._marks.pop(0)[1])
