"""A fault-injecting HTTP proxy for S3: sits between backupd (boto3) and moto's server.

Each request is classified (`Request.op`: put-artifact, put-manifest, head, get, list, delete,
delete-objects, multipart-create, multipart-list, multipart-part, multipart-complete,
multipart-abort...) and matched against the armed faults in order. A fault applies to the
matching requests after `skip` of them went through, `times` times (None: forever), with one
of these actions:

  500 / 503   answer with an S3 XML error (InternalError / SlowDown) without forwarding
  reset       read the request, then close the connection with a TCP RST (nothing forwarded)
  stall       read the request, then hold the connection silent for `stall` seconds and close
              it (nothing forwarded): the client's read timeout fires
  lost        forward the request (the operation happens in S3), then reset the connection:
              the response is lost, as when a network drops it
  corrupt     flip one byte of the request body (bit rot on the way); answer 400 BadDigest
              when a checksum header no longer matches, as S3 does (moto does not check),
              else forward the damaged body

Everything that passes is forwarded unchanged; the proxy records every request and what it did
with it (`log`), and keeps the raw bytes of requests in `wire` so that tests can assert secrets
never travel. Runs in threads of the test process; `close()` unblocks stalled handlers.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
               "upgrade", "content-length", "expect"}
ERRORS = {400: ("BadDigest", "The Content-MD5 or checksum value that you specified did not match "
                     "what the server received."),
          500: ("InternalError", "We encountered an internal error. Please try again."),
          503: ("SlowDown", "Please reduce your request rate.")}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # /bucket/key (decoded)
    query: dict[str, list[str]]

    @property
    def key(self) -> str:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def op(self) -> str:
        q, m, key = self.query, self.method, self.key
        if "delete" in q and m == "POST":
            return "delete-objects"
        if "uploads" in q:
            return "multipart-create" if m == "POST" else "multipart-list"
        if "uploadId" in q:
            return {"PUT": "multipart-part", "POST": "multipart-complete",
                    "DELETE": "multipart-abort"}.get(m, "multipart")
        if not key:
            return "list" if m == "GET" else f"bucket-{m.lower()}"
        if "retention" in q:
            return "put-retention"
        if m == "PUT":
            return "put-manifest" if key.endswith(".json") else "put-artifact"
        return {"GET": "get", "HEAD": "head", "DELETE": "delete"}.get(m, m.lower())


@dataclass
class Fault:
    action: str  # "500", "503", "reset", "stall", "lost", "corrupt"
    match: Callable[[Request], bool]
    times: int | None = 1
    skip: int = 0
    stall: float = 3.0
    seen: int = 0
    fired: int = 0

    def applies(self, request: Request) -> bool:
        if not self.match(request):
            return False
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


def op_is(*ops: str) -> Callable[[Request], bool]:
    return lambda request: request.op in ops


@dataclass
class Entry:
    op: str
    method: str
    key: str
    outcome: str  # "forwarded <status>" or the fault action


@dataclass
class FaultProxy:
    upstream: str  # http://host:port of moto
    faults: list[Fault] = field(default_factory=list)
    log: list[Entry] = field(default_factory=list)
    wire: list[bytes] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def arm(self, action: str, *ops: str, times: int | None = 1, skip: int = 0,
            stall: float = 3.0, match: Callable[[Request], bool] | None = None) -> Fault:
        fault = Fault(action, match or op_is(*ops), times, skip, stall)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def ops(self, outcome_prefix: str = "") -> list[str]:
        with self._lock:
            return [e.op for e in self.log if e.outcome.startswith(outcome_prefix)]

    def choose(self, request: Request) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.applies(request):
                    return fault
        return None

    def record(self, request: Request, outcome: str, raw: bytes) -> None:
        with self._lock:
            self.log.append(Entry(request.op, request.method, request.key, outcome))
            self.wire.append(raw)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets and stalls make handlers fail on purpose


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        request = Request(self.command, unquote(parts.path),
                          parse_qs(parts.query, keep_blank_values=True))
        body = self._body()
        raw = (f"{self.requestline}\r\n{self.headers}").encode("utf-8", "replace") + body
        fault = self.owner.choose(request)
        action = fault.action if fault else ""
        if action in ("500", "503"):
            self.owner.record(request, action, raw)
            self._error(int(action))
        elif action == "reset":
            self.owner.record(request, action, raw)
            self._reset()
        elif action == "stall":
            self.owner.record(request, action, raw)
            assert fault is not None
            self.owner._closing.wait(fault.stall)
            self._reset()
        else:
            if action == "corrupt" and body:
                flipped = bytearray(body)
                flipped[len(flipped) // 2] ^= 0x01
                body = bytes(flipped)
                if not self._digests_match(body):  # what S3 does; moto does not check
                    self.owner.record(request, "corrupt: BadDigest", raw)
                    self._error(400)
                    return
            status, reason, headers, payload = self._forward(request, parts.query, body)
            self.owner.record(request, action or f"forwarded {status}", raw)
            if action == "lost":
                self._reset()
                return
            self.send_response(status, reason)
            for name, value in headers:
                if name.lower() not in HOP_HEADERS:
                    self.send_header(name, value)
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            if self.command == "HEAD":
                self.send_header("Content-Length", length or "0")
            else:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    def _forward(self, request: Request, query: str, body: bytes
                 ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        target = urlsplit(self.owner.upstream)
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            path = urlsplit(self.path).path + (f"?{query}" if query else "")
            conn.request(request.method, path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            return response.status, response.reason, response.getheaders(), payload
        finally:
            conn.close()

    def _digests_match(self, body: bytes) -> bool:
        """Whether the body still matches the checksum headers the client sent, if any."""
        sha = self.headers.get("x-amz-checksum-sha256")
        md5 = self.headers.get("Content-MD5")
        if sha and sha != base64.b64encode(hashlib.sha256(body).digest()).decode():
            return False
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        return not (md5 and md5 != base64.b64encode(digest).decode())

    def _error(self, status: int) -> None:
        code, message = ERRORS[status]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0), so the client sees a reset, not a clean EOF."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
