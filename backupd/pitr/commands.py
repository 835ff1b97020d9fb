"""The master's command stream, split into commands as they arrive.

After the RDB a master sends RESP arrays only: the writes it executes (with SELECT before the
first one of a database, MULTI/EXEC around transactions), `PING` every
repl-ping-replica-period and `REPLCONF GETACK *`. The replication offset counts every byte of
it, those that never reach a segment included, so the splitter reports each command's length.
"""

from __future__ import annotations

from dataclasses import dataclass

from backupd.errors import SnapshotError

MAX_HEADER = 64  # "*<count>\r\n" / "$<length>\r\n" is never longer
MAX_ARGS = 1 << 24
MAX_BULK = 1 << 32  # a bulk string larger than Redis's proto-max-bulk-len limit
TRANSACTION = (b"multi", b"exec")
LINK_ONLY = (b"ping", b"replconf")  # link keepalives: never written into a segment


@dataclass(frozen=True, slots=True)
class Command:
    start: int  # position in the buffer
    end: int
    name: bytes  # lower case
    arg1: bytes  # the first argument (SELECT's db, REPLCONF's subcommand), or b""


class CommandSplitter:
    """Complete commands from a growing buffer: `feed` returns those that are complete;
    the rest stays buffered for the next `feed` (a command may span many reads)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> tuple[bytes, list[Command]]:
        """(buffer, commands): the commands' positions point into the returned buffer."""
        buf = self.buf + data if self.buf else data
        out: list[Command] = []
        pos, size = 0, len(buf)
        find = buf.find
        while pos < size:
            if buf[pos] != 0x2A:  # "*"
                if buf[pos] == 0x0A:  # a bare newline (keepalive): one byte of the offset
                    out.append(Command(pos, pos + 1, b"", b""))
                    pos += 1
                    continue
                raise SnapshotError(f"the replication stream is not RESP at byte {pos}: "
                                    f"{buf[pos:pos + 20]!r}")
            eol = find(b"\r\n", pos, pos + MAX_HEADER)
            if eol < 0:
                if size - pos >= MAX_HEADER:
                    raise SnapshotError("the replication stream has an overlong array header")
                break
            count = int(buf[pos + 1:eol])
            if not 0 < count <= MAX_ARGS:
                raise SnapshotError(f"the replication stream has an array of {count} items")
            cur = eol + 2
            name = arg1 = b""
            complete = True
            for i in range(count):
                eol = find(b"\r\n", cur, cur + MAX_HEADER)
                if eol < 0:
                    if size - cur >= MAX_HEADER:
                        raise SnapshotError("the replication stream has an overlong header")
                    complete = False
                    break
                if buf[cur] != 0x24:  # "$"
                    raise SnapshotError("the replication stream has a non-bulk argument")
                length = int(buf[cur + 1:eol])
                if not 0 <= length < MAX_BULK:
                    raise SnapshotError(f"the replication stream has a bulk of {length} bytes")
                body = eol + 2
                cur = body + length + 2
                if cur > size:
                    complete = False
                    break
                if i == 0:
                    name = buf[body:body + length].lower()
                elif i == 1 and length <= MAX_HEADER:
                    arg1 = buf[body:body + length]
            if not complete:
                break
            out.append(Command(pos, cur, name, arg1))
            pos = cur
        self.buf = buf[pos:]
        return buf, out
