"""A TCP proxy a test controls: put it between the detector and a server (PostgreSQL, the broker), then
`cut` it to make the server unreachable (open connections reset, new ones refused) and `restore` it."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType
from typing import Self


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port` from a background thread (`start`/`close`,
    or a `with` block)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self.connections = 0  # accepted and forwarded, over the proxy's life

    def start(self) -> Self:
        self._thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until `restore`."""
        self._cut.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.1):
                if key.data is None:
                    self._accept(selector)
                else:
                    self._forward(selector, key.fileobj, key.data)  # type: ignore[arg-type]
            with self._lock:
                live = {sock for pair in self._pairs for sock in pair}
            for key in list(selector.get_map().values()):
                if key.data is not None and key.fileobj not in live:
                    selector.unregister(key.fileobj)
        selector.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        if self._cut.is_set():
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            _reset(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
        with self._lock:
            self._pairs.append((client, upstream))
        self.connections += 1
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)

    def _forward(self, selector: selectors.BaseSelector, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
            if data:
                sink.setblocking(True)
                sink.sendall(data)
                sink.setblocking(False)
                return
        except OSError:
            pass
        with self._lock:
            self._pairs = [pair for pair in self._pairs if source not in pair]
        for sock in (source, sink):
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a network failure or a killed server looks to the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()
