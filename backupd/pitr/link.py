"""The replication link of `[pitr] enabled = true`: one replica connection, kept open.

A session: recover what a killed backupd left (segments.recover), then `PSYNC <replid>
<offset+1>` from the newest durable segment. `+CONTINUE`: the chain goes on. `+FULLRESYNC`
(first start, or the master's backlog no longer has the offset): the RDB becomes a regular
backup (the backup cycle, with S3 upload) and a new chain starts at its offset. Then the
command stream goes into segments (SegmentWriter) until the link drops or backupd stops; a
`REPLCONF ACK <offset>` goes back every pitr.ack_interval and for each `REPLCONF GETACK`. A silent
master (no byte, not even its PING, for redis.read_timeout) is a dropped link. Closed
segments are uploaded by a thread of their own, so a slow bucket never stalls the stream.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from backupd import discovery
from backupd.actions.cycle import run_cycle  # here, not in the link's thread: imports race
from backupd.config import Config
from backupd.errors import BackupdError, SnapshotError
from backupd.pitr.pieces import Pieces
from backupd.pitr.segments import LINK_DOWN, OPEN, STOPPED, SegmentMeta, SegmentWriter, recover
from backupd.pitr.store import LocalSegments, S3Segments, SegmentStore
from backupd.replication import ReplicationStream

log = structlog.get_logger("backupd.pitr")

RECV = 1 << 20
POLL = 0.2  # the loop's socket timeout: stamps, fsync and ACKs run at least this often
RETRY_FIRST, RETRY_LONGEST = 1.0, 30.0


@dataclass
class LinkStatus:
    """What metrics and /healthz show (written by the link thread, read by others)."""

    up: bool = False
    durable_time: int | None = None  # unix seconds of the newest fsynced stamp
    segments: int = 0
    bytes: int = 0
    chain: str = ""  # the base backup id
    error: str = ""


class Link:
    def __init__(self, config: Config, env: Mapping[str, str] | None = None,
                 stop: threading.Event | None = None,
                 on_durable: Callable[[int], object] | None = None) -> None:
        self.config = config
        self._on_durable = on_durable
        self.env = env
        self.stop = stop or threading.Event()
        self.status = LinkStatus()
        self.local = LocalSegments(Path(config.backup.dir))
        self._uploads: queue.Queue[SegmentMeta | None] = queue.Queue()
        self._uploader: threading.Thread | None = None
        self._writer: SegmentWriter | None = None
        self._counted = (0, 0)  # segments and bytes of the sessions before this one

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Sessions until `stop`, with a growing pause after each failure."""
        if self.config.s3.enabled:
            self._uploader = threading.Thread(target=self._upload_loop, name="pitr-upload",
                                              daemon=True)
            self._uploader.start()
        pause = RETRY_FIRST
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.session()
            except (BackupdError, OSError) as exc:
                self.status.error = str(exc)
                log.warning("pitr_link_lost", error=str(exc), retry_in=pause)
            finally:
                self.status.up = False
            if time.monotonic() - started > RETRY_LONGEST:
                pause = RETRY_FIRST
            if self.stop.wait(pause):
                break
            pause = min(pause * 2, RETRY_LONGEST)
        self._uploads.put(None)
        if self._uploader is not None:
            self._uploader.join(timeout=self.config.s3.read_timeout)

    def session(self) -> None:
        for meta in recover(self.local.dir):
            self._uploads.put(meta)
        resume = self._resume_point()
        endpoint = discovery.resolve(self.config.redis, self.env)
        stream = ReplicationStream(endpoint, rdb_only=False,
                                   resume=(resume.replid, resume.last_offset) if resume else None)
        try:
            offset: int | None
            if stream.continued and resume is not None:
                base, db = resume.base, resume.last_db
                replid = stream.master_replid or resume.replid
                offset = resume.last_offset
            else:
                base, db = self._take_base(stream, resume), 0
                replid, offset = stream.master_replid, stream.master_repl_offset
            if offset is None or not replid:
                raise SnapshotError("the master named no replication offset: the link needs "
                                    "PSYNC (grant +psync)")
            sock, rest = stream.detach()
        finally:
            stream.close()
        self._stream(sock, rest, base, replid, offset, db)

    def _resume_point(self) -> SegmentMeta | None:
        """The newest durable segment: the link goes on from its last offset."""
        segments = self.local.listing().segments
        if not segments:
            return None
        return max(segments, key=lambda m: (m.last_time, m.last_offset))

    def _take_base(self, stream: ReplicationStream, resume: SegmentMeta | None) -> str:
        if resume is not None:
            log.warning("pitr_new_chain", previous=resume.base, ended_at=resume.last_time,
                        why="the master answered the partial resync with a full one (its "
                            "backlog no longer has the offset): the new chain starts at a "
                            "new base; the time between is a gap")
        result = run_cycle(self.config, trigger="pitr", tag="pitr base", prune=False,
                           env=self.env, stream=stream)
        log.info("pitr_base", id=result.manifest.id, replid=stream.master_replid,
                 offset=stream.master_repl_offset)
        return result.manifest.id

    def _stream(self, sock: socket.socket, rest: bytes, base: str, replid: str, offset: int,
                db: int) -> None:
        cfg = self.config.pitr
        writer = SegmentWriter(self.local.dir, base=base, replid=replid, offset=offset, db=db,
                               fsync_every=cfg.fsync, max_age=cfg.segment,
                               closed=self._uploads.put, background=True)
        self._writer = writer
        self._counted = (self.status.segments, self.status.bytes)
        self.status.chain, self.status.up, self.status.error = base, True, ""
        log.info("pitr_link_up", base=base, replid=replid, offset=offset)
        ended = LINK_DOWN
        sock.settimeout(POLL)
        last_data = last_ack = time.monotonic()
        try:
            if rest:
                writer.feed(rest, time.time())
            while not self.stop.is_set():
                try:
                    data: bytes | None = sock.recv(RECV)
                except TimeoutError:
                    data = None
                if data == b"":
                    raise SnapshotError("the master closed the replication link")
                mono = time.monotonic()
                if data:
                    writer.feed(data, time.time())
                    last_data = mono
                elif mono - last_data > self.config.redis.read_timeout:
                    raise SnapshotError(f"no data (not even the master's PING) for "
                                        f"redis.read_timeout {self.config.redis.read_timeout:g}s")
                writer.tick(time.time())
                if writer.acks or mono - last_ack >= self.config.pitr.ack_interval:
                    _ack(sock, writer.received)
                    writer.acks, last_ack = 0, mono
                self._publish(writer)
            ended = STOPPED
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            try:
                writer.close(ended)
            except BackupdError as exc:
                log.warning("pitr_segment_not_closed", error=str(exc))
                writer.abandon()
            writer.stop()
            self._publish(writer)
            self._writer = None

    def _publish(self, writer: SegmentWriter) -> None:
        st = self.status
        if writer.durable is not None and writer.durable.time != st.durable_time:
            st.durable_time = writer.durable.time
            if self._on_durable is not None:
                self._on_durable(writer.durable.time)
        st.segments = self._counted[0] + writer.segments
        st.bytes = self._counted[1] + writer.bytes

    # -- uploads -------------------------------------------------------------------------

    def _upload_piece(self, remote: S3Segments, pieces: Pieces) -> None:
        """What the open segment made durable since the last piece, if anything."""
        writer = self._writer
        try:
            piece = pieces.next(writer.partial if writer is not None else None)
            if piece is not None:
                remote.put_part(*piece)
                pieces.uploaded()
        except BackupdError as exc:
            log.warning("pitr_part_upload_failed", error=str(exc), retry_in=
                        self.config.pitr.upload_interval)

    def _upload_loop(self) -> None:
        """Each closed segment to S3, and every upload_interval whatever is not there yet
        (a failed upload, segments recovered at start)."""
        from backupd.storage.s3 import S3Storage

        remote = S3Segments(S3Storage(self.config.s3, self.env))
        catch_up = True
        interval = self.config.pitr.upload_interval
        pieces = Pieces(self.local.dir)
        last_part = time.monotonic()
        while True:
            try:
                item = self._uploads.get(timeout=interval)
            except queue.Empty:
                item = None
                catch_up = True
            if time.monotonic() - last_part >= interval and not self.stop.is_set():
                last_part = time.monotonic()
                self._upload_piece(remote, pieces)
            if item is None and self.stop.is_set():
                try:  # the last segments, closed as backupd stops
                    upload_missing(self.local, remote)
                except BackupdError as exc:
                    log.warning("pitr_upload_failed", error=str(exc),
                                effect="uploaded by the next start")
                return
            try:
                if item is not None:
                    remote.put_segment(self.local.dir / item.data_name, item)
                if catch_up:
                    upload_missing(self.local, remote)
                    catch_up = False
            except BackupdError as exc:
                catch_up = True
                log.warning("pitr_upload_failed", error=str(exc),
                            retry_in=self.config.pitr.upload_interval)


def upload_missing(local: LocalSegments, remote: SegmentStore) -> list[str]:
    """Put every local segment the remote store lacks; their stems."""
    there = {m.stem for m in remote.listing().segments if m.ended != OPEN}  # not pieces
    done = []
    for meta in local.listing().segments:
        if meta.stem not in there:
            remote.put_segment(local.dir / meta.data_name, meta)
            done.append(meta.stem)
    return done


def _ack(sock: socket.socket, offset: int) -> None:
    text = str(offset).encode()
    sock.sendall(b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$%d\r\n%s\r\n" % (len(text), text))
