"""`running_server`: a server binary (Prometheus, Alertmanager) run for a test, ready or explained."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

STARTUP_SECONDS = 20.0


@contextmanager
def running_server(name: str, command: list[str], url: str, log_path: Path) -> Iterator[str]:
    """Run `command` (its output to `log_path`) until `{url}/-/ready` answers 200; yield `url`; stop it
    on exit (terminate, then kill). Raises `RuntimeError` with the end of the log when it exits or is
    not ready within `STARTUP_SECONDS`."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(name, process, url, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(name: str, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                if client.get(f"{url}/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{name} not ready after {STARTUP_SECONDS} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
