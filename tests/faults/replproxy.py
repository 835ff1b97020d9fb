"""A TCP proxy in front of a real Redis that misbehaves on the replication stream: after
`after` bytes from the server it stalls (holds the connection, forwards nothing), cuts (closes
both sides), flips one byte, or drops `drop` bytes; it may also rewrite what the client sends
(to make a real server answer as an older one would)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field


@dataclass
class ReplProxy:
    upstream: int
    mode: str = ""  # "", "stall", "cut", "flip", "drop"
    after: int = 0
    drop: int = 0
    rewrite: tuple[bytes, bytes] | None = None  # client -> server: old, new
    port: int = 0
    sent: int = 0  # server -> client bytes forwarded
    _listener: socket.socket | None = None
    _closing: threading.Event = field(default_factory=threading.Event)
    _socks: list[socket.socket] = field(default_factory=list)

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._closing.set()
        for sock in [*self._socks, *([self._listener] if self._listener else [])]:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            server.settimeout(None)
            client.settimeout(None)
            self._socks += [client, server]
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                if self.rewrite is not None:
                    data = data.replace(*self.rewrite)
                server.sendall(data)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        with suppress(OSError):
            while data := server.recv(65536):
                start, self.sent = self.sent, self.sent + len(data)
                at = self.after - start
                if self.mode and self.sent > self.after:
                    if self.mode == "stall":
                        client.sendall(data[:at])
                        self._closing.wait()
                        return
                    if self.mode == "cut":
                        client.sendall(data[:at])
                        for sock in (client, server):  # shutdown: another thread is in recv
                            sock.shutdown(socket.SHUT_RDWR)
                            sock.close()
                        return
                    if self.mode == "flip" and at >= 0:
                        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                    if self.mode == "drop" and at >= 0:
                        data = data[:at] + data[at + self.drop:]
                client.sendall(data)


@contextmanager
def repl_proxy(upstream: int, **kwargs: object) -> Iterator[ReplProxy]:
    proxy = ReplProxy(upstream, **kwargs)  # type: ignore[arg-type]
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
