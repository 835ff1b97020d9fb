"""The snapshot over the replication protocol: `redis.source = "replication"`.

What redis-cli --rdb and every replica do (seen on Redis 7.0, 8.2 and Valkey 8.1): `REPLCONF capa
eof`, `REPLCONF rdb-only 1`, then `PSYNC ? -1` (its +FULLRESYNC reply names the replication id
and offset the snapshot is at; an ACL without +psync falls back to `SYNC`). The master sends
bare `\\n` keepalives while it prepares the RDB, then either `$<len>\\r\\n` + bytes (disk-based)
or `$EOF:<40 chars>\\r\\n` + RDB + the same 40 chars (diskless). `ReplicationStream` is a
readable for pipeline.pack(): the RDB bytes as they arrive, so the RDB check, compression,
encryption and upload run while the master sends. It never returns a short stream as a whole
one: a connection that ends early, a stall longer than redis.read_timeout (keepalives count as
life) or a transfer longer than redis.save_timeout raise SnapshotError, and pack() then keeps
nothing.

A server without `rdb-only` (Redis < 7.0) gets a plain full sync: the stream ends after the RDB
and the connection is closed there, before the master's command stream is read.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import redis
import structlog

from backupd.endpoint import Endpoint
from backupd.errors import RedisAuthError, RedisUnavailable, SnapshotError

log = structlog.get_logger("backupd.replication")

RECV = 1 << 20
HEAD_BYTES = 1 << 20  # kept for the key count (backup.count_keys)
MAX_LINE = 4096
EOF_MARK_LEN = 40
ACL_HINT = "grant +sync +replconf (and +psync for the exact replication offset)"
WAIT_LOGGED = 1.0  # a wait for the RDB longer than this is logged, with the hint


class ReplicationStream:
    """One full sync from `endpoint`, read as a stream of RDB bytes (see the module)."""

    def __init__(self, endpoint: Endpoint, *, rdb_only: bool = True,
                 resume: tuple[str, int] | None = None) -> None:
        """`rdb_only=False` keeps the connection for the command stream after the RDB
        (`detach`); `resume` = (replid, last offset received) asks for a partial resync,
        which `continued` says the master granted (then no RDB comes)."""
        self._endpoint = endpoint
        self._want_rdb_only = rdb_only
        self._resume = resume
        self.continued = False
        cfg = endpoint.cfg
        self._deadline = time.monotonic() + cfg.save_timeout
        self._buf = b""
        self._pending = b""  # diskless: the bytes that may still be the end mark
        self._mark: bytes | None = None
        self._left: int | None = None  # disk-based: bytes still to come
        self._done = False
        self.head = b""
        self.received = 0
        self.size: int | None = None  # known up front for the disk-based framing only
        self.framing = ""
        self.master_replid = ""
        self.master_repl_offset: int | None = None
        self.rdb_only = True
        try:
            self._sock: socket.socket | None = endpoint.open_socket(read_timeout=cfg.read_timeout)
        except OSError as exc:
            raise RedisUnavailable(f"cannot connect to {endpoint.where} for the replication "
                                   f"stream: {exc.strerror or exc}") from None
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    # -- the handshake ---------------------------------------------------------------------

    def _handshake(self) -> None:
        ep = self._endpoint
        if ep.password is not None:
            args = [ep.username, ep.password] if ep.username else [ep.password]
            reply = self._command("AUTH", *args)
            if reply.startswith("-"):
                user = ep.username or "default"
                raise RedisAuthError(f"{ep.where} rejected the password for user {user!r} "
                                     "(replication stream)")
        self._expect_ok(self._command("REPLCONF", "capa", "eof", "capa", "psync2"),
                        "REPLCONF capa eof")
        if self._want_rdb_only:
            reply = self._command("REPLCONF", "rdb-only", "1")
            if reply.startswith("-NOPERM"):
                self._refused("REPLCONF", reply)
            if reply.startswith("-"):
                self.rdb_only = False
                log.warning("replication_no_rdb_only", where=ep.where, reply=reply[:200],
                            action="full sync; the connection is closed right after the RDB")
        else:
            self.rdb_only = False
        started = time.monotonic()
        if self._resume is not None:
            self._send("PSYNC", self._resume[0], str(self._resume[1] + 1))
        else:
            self._send("PSYNC", "?", "-1")
        line = self._line()
        if line.startswith("+CONTINUE"):
            parts = line.split()
            assert self._resume is not None
            self.master_replid = parts[1] if len(parts) > 1 else self._resume[0]
            self.master_repl_offset = self._resume[1]
            self.continued, self._done = True, True
            log.info("replication_continued", where=ep.where, replid=self.master_replid,
                     offset=self.master_repl_offset)
            return
        if line.startswith("-NOPERM"):
            log.warning("replication_no_psync", where=ep.where,
                        action="SYNC instead: the manifest's master_repl_offset is INFO's "
                               "just before the sync, not the snapshot's exact offset",
                        hint="grant +psync")
            self._send("SYNC")
            line = self._line()
        elif line.startswith("+FULLRESYNC"):
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                self.master_replid, self.master_repl_offset = parts[1], int(parts[2])
            line = self._line()
        if line.startswith("-"):
            self._refused("SYNC", line)
        self._framing(line)
        waited = time.monotonic() - started
        if waited > WAIT_LOGGED:
            log.info("replication_waited", where=ep.where, seconds=round(waited, 2),
                     framing=self.framing,
                     hint="a diskless master waits repl-diskless-sync-delay (default 5s) "
                          "for more replicas first, or another replica's sync was running; "
                          "repl-diskless-sync-delay 0 removes the wait when no replica needs it")

    def _framing(self, line: str) -> None:
        if line.startswith("$EOF:") and len(line) == 5 + EOF_MARK_LEN:
            self._mark, self.framing = line[5:].encode(), "eof"
        elif line.startswith("$") and line[1:].isdigit():
            self._left = self.size = int(line[1:])
            self.framing = "length"
        else:
            raise SnapshotError(f"{self._endpoint.where} answered the sync with "
                                f"{line[:80]!r}, not an RDB transfer")
        log.info("replication_transfer", where=self._endpoint.where, framing=self.framing,
                 size=self.size, master_replid=self.master_replid or None,
                 master_repl_offset=self.master_repl_offset, rdb_only=self.rdb_only)

    def _refused(self, command: str, reply: str) -> None:
        if reply.startswith("-NOPERM"):
            raise RedisAuthError(f"{self._endpoint.where}: the ACL user may not run {command} "
                                 f"({reply[1:200]}); {ACL_HINT}")
        raise SnapshotError(f"{self._endpoint.where} refused the full sync: {reply[1:200]}")

    def _expect_ok(self, reply: str, what: str) -> None:
        if reply.startswith("-"):
            self._refused(what.split()[0], reply)

    def _command(self, *args: str) -> str:
        self._send(*args)
        return self._line()

    def _send(self, *args: str) -> None:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        try:
            self._socket().sendall(b"".join(parts))
        except OSError as exc:
            raise self._lost(exc) from None

    def _line(self) -> str:
        """The next reply line; bare "\\n" keepalives are skipped (they prove the master is
        alive: the read timeout starts again)."""
        while True:
            while b"\n" not in self._buf:
                if len(self._buf) > MAX_LINE:
                    raise SnapshotError(f"{self._endpoint.where} sent an overlong reply line")
                self._fill()
            line, self._buf = self._buf.split(b"\n", 1)
            if line.strip():
                return line.rstrip(b"\r").decode(errors="replace")

    # -- the transfer ----------------------------------------------------------------------

    def read(self, size: int = -1, /) -> bytes:
        while not self._done:
            data = self._buf or self._recv()
            self._buf = b""
            if self._left is not None:
                data, self._buf = data[:self._left], data[self._left:]
                self._left -= len(data)
                self._done = self._left == 0
            else:
                data = self._until_mark(data)
            if data:
                self._got(data)
                return data
        if self._want_rdb_only:
            self.close()
        return b""

    def _until_mark(self, data: bytes) -> bytes:
        assert self._mark is not None
        pending = self._pending + data
        end = pending.find(self._mark)
        if end >= 0:
            self._done, self._pending = True, b""
            self._buf = pending[end + len(self._mark):]  # the command stream's first bytes
            return pending[:end]
        keep = len(self._mark) - 1
        self._pending = pending[-keep:]
        return pending[:-keep]

    def _got(self, data: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]
        self.received += len(data)

    def _fill(self) -> None:
        self._buf += self._recv()

    def _recv(self) -> bytes:
        if time.monotonic() >= self._deadline:
            raise SnapshotError(f"the replication stream from {self._endpoint.where} took "
                                f"longer than redis.save_timeout "
                                f"({self._endpoint.cfg.save_timeout:g}s); nothing was kept")
        try:
            data = self._socket().recv(RECV)
        except OSError as exc:
            raise self._lost(exc) from None
        if not data:
            raise self._lost(None)
        return data

    def _lost(self, exc: OSError | None) -> SnapshotError:
        where = self._endpoint.where
        got = f"after {self.received} bytes of the RDB" + (
            f" of {self.size}" if self.size is not None else "")
        if isinstance(exc, TimeoutError):
            why = (f"no data (not even a keepalive) for redis.read_timeout "
                   f"{self._endpoint.cfg.read_timeout:g}s")
        elif exc is None:
            why = "the connection was closed"
        else:
            why = f"the connection failed ({exc.strerror or exc})"
        self.close()
        return SnapshotError(f"replication stream from {where}: {why} {got}; nothing was kept")

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise SnapshotError("the replication stream is closed")
        return self._sock

    def detach(self) -> tuple[socket.socket, bytes]:
        """The connection after the RDB (or the +CONTINUE) and the bytes of the command
        stream already read; the stream is closed for reading from here on."""
        if not self._done or self._sock is None:
            raise SnapshotError("the replication stream was detached before its RDB ended")
        sock, rest = self._sock, self._buf
        self._sock, self._buf = None, b""
        return sock, rest

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def facts(self, info: dict[str, Any]) -> dict[str, Any]:
        """The source facts for the manifest's `replication` field: role and the replication
        id and offset the snapshot is at (INFO's before the sync when PSYNC was denied)."""
        offset = self.master_repl_offset
        return {
            "master_replid": self.master_replid or str(info.get("master_replid", "")),
            "master_repl_offset": offset if offset is not None else int(
                info.get("master_repl_offset", 0)),
            "repl_offset_exact": offset is not None,
            "framing": self.framing, "rdb_only": self.rdb_only,
        }


def diskless_delay(client: redis.Redis) -> int | None:
    """repl-diskless-sync-delay when the master syncs diskless (its wait before each
    transfer); None when it does not, or CONFIG GET is not granted."""
    try:
        conf = client.config_get("repl-diskless-sync*")
    except redis.exceptions.RedisError:
        return None
    if conf.get("repl-diskless-sync") != "yes":
        return None
    try:
        return int(conf.get("repl-diskless-sync-delay") or 0)
    except ValueError:
        return None
