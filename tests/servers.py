"""Servers for tests: `running_server` runs a server binary (Prometheus, Alertmanager) until ready;
`RestartableHttpServer` is the base of the tests' own HTTP servers (receivers, a fake Grafana)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

STARTUP_SECONDS = 20.0


@contextmanager
def running_server(
    name: str, command: list[str], url: str, log_path: Path, ready_path: str | None = "/-/ready"
) -> Iterator[str]:
    """Run `command` (its output to `log_path`) until `{url}{ready_path}` answers 200 (until it accepts
    connections when `ready_path` is None: no request that the server would pass on); yield `url`; stop it
    on exit (terminate, then kill). Raises `RuntimeError` with the end of the log when it exits or is not
    ready within `STARTUP_SECONDS`."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(name, process, url, log_path, ready_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(
    name: str, process: subprocess.Popen[bytes], url: str, log_path: Path, ready_path: str | None
) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                if ready_path is None:
                    address = httpx.URL(url)
                    socket.create_connection((address.host, address.port or 80), timeout=1).close()
                    return
                if client.get(f"{url}{ready_path}").status_code == 200:
                    return
            except (httpx.TransportError, OSError):
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{name} not ready after {STARTUP_SECONDS} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class RestartableHttpServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) that can `stop()` (connections refused) and
    `start()` again on the same port; a context manager that stops it. Subclasses give the handler
    (`_handler_class`) and call `start()` at the end of their `__init__`."""

    _thread_name = "test-http-server"

    def __init__(self) -> None:
        self._lifecycle = threading.Lock()  # start() and stop()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The port, the same across `stop()` and `start()`."""
        return self._port

    def start(self) -> None:
        """Listen (again, on the same port after `stop()`); a no-op while running."""
        with self._lifecycle:
            if self._server is not None:
                return
            server = ThreadingHTTPServer(("127.0.0.1", self._port), self._handler_class())
            server.daemon_threads = True
            self._port = server.server_address[1]
            self._server = server
            # A short poll interval: stop() waits for the serving loop to notice the shutdown.
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.01},
                name=self._thread_name,
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop listening: connections are refused until `start()`. A no-op when stopped."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            if server is None or thread is None:
                return
            server.shutdown()
            server.server_close()
            thread.join()
            self._server = self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError
