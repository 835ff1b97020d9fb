"""The sidecar's HTTP endpoint: `/metrics` for Prometheus and `/healthz` for people and probes.

Why not prometheus_client.start_http_server: it serves only the registry, and /healthz must share
the port (one port to publish in compose). A ThreadingHTTPServer in a daemon thread is enough;
each request only reads in-memory state, so a slow backup never blocks a scrape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from backupd import health
from backupd.config import parse_listen
from backupd.errors import OperationError
from backupd.metrics import CONTENT_TYPE, Metrics


class StatusServer:
    """Serves one Metrics registry and one health Tracker until `close()`."""

    def __init__(self, listen: str, metrics: Metrics, tracker: health.Tracker,
                 max_age: float) -> None:
        host, port = parse_listen(listen)
        handler = _handler(metrics, lambda: _health(tracker, max_age))
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise OperationError(f"cannot listen on metrics.listen {listen!r}: "
                                 f"{exc.strerror}") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,),
                                       name="status-http", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _health(tracker: health.Tracker, max_age: float) -> tuple[int, bytes]:
    state = tracker.state
    verdict = health.evaluate(state, time.time(), max_age)
    document = health.body(state, verdict)
    return (200 if verdict.ok else 503), json.dumps(document).encode()


def _handler(metrics: Metrics,
             healthz: Callable[[], tuple[int, bytes]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "backupd"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE, metrics.exposition())
            elif path == "/healthz":
                code, payload = healthz()
                self._send(code, "application/json", payload)
            else:
                self._send(404, "text/plain; charset=utf-8",
                           b"not found: try /metrics or /healthz\n")

        def _send(self, code: int, content_type: str, payload: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            """Scrapes every 15 s would drown the backup logs: no access log."""

    return Handler
