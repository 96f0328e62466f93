"""The embedded broker belongs to the process that started it: that process, not a terminal, stops it, and
it never outlives its owner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from detector.broker import free_port

pytestmark = pytest.mark.kafka

# Starts a broker on the port it is given and, once interrupted, tells whether the broker still answers
# (after a moment: a daemon finishes its batch and commits), then stops it on leaving the block.
OWNER = """
import socket, sys, time
from detector.broker import EmbeddedBroker
with EmbeddedBroker(port=int(sys.argv[1])) as broker:
    try:
        print("started", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(1)
        with socket.create_connection((broker.host, broker.port), timeout=2):
            print("the broker still answers", flush=True)
"""


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def gone_within(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while answers(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@contextmanager
def running(command: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    """`command` in a session of its own (as a shell runs it in a terminal), once it printed `ready`; killed
    with its process group on leaving, whatever happened."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        while line and ready not in line:
            line = process.stdout.readline()
        assert ready in line, "the command ended before it was ready"
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_a_terminal_interrupt_reaches_the_owner_of_the_broker_which_stops_it_in_its_own_time() -> None:
    port = free_port("127.0.0.1")
    with running([sys.executable, "-c", OWNER, str(port)], ready="started") as owner:
        os.killpg(owner.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group

        output, _ = owner.communicate(timeout=30)

    assert "the broker still answers" in output
    assert owner.returncode == 0
    assert gone_within(port, 10)  # stopped by its owner on the way out


def test_a_broker_whose_owner_is_killed_stops_too() -> None:
    port = free_port("127.0.0.1")
    with running([sys.executable, "-c", OWNER, str(port)], ready="started") as owner:
        assert answers(port)

        owner.kill()  # no chance to stop anything: the broker is out of its session, yet goes with it
        owner.wait(10)

        assert gone_within(port, 10)


def test_the_broker_command_stops_cleanly_when_its_terminal_closes(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    command = [str(Path(sys.executable).parent / "mia-detector"), "broker", "--port", str(port)]
    with running(command, ready="broker listening") as broker:
        os.killpg(broker.pid, signal.SIGHUP)  # what a terminal closing sends its session

        output, _ = broker.communicate(timeout=30)

    assert broker.returncode == 0, output  # stopped as on SIGTERM, not killed by the hang-up
    assert gone_within(port, 10)
