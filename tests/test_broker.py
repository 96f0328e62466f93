"""The embedded broker belongs to the process that started it: that process, not a terminal, stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# Starts a broker and, once interrupted, tells whether the broker still answers, then stops it on exit.
OWNER = """
import socket, time
from detector.broker import EmbeddedBroker
with EmbeddedBroker() as broker:
    print("started", flush=True)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(1)  # what the owner does before it stops the broker (a daemon: finish its batch, commit)
        with socket.create_connection((broker.host, broker.port), timeout=2):
            print("the broker still answers", flush=True)
"""


def test_a_terminal_interrupt_reaches_the_owner_of_the_broker_which_stops_it_in_its_own_time() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert owner.stdout is not None and owner.stdout.readline().strip() == "started"

    os.killpg(owner.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group

    output, _ = owner.communicate(timeout=30)
    assert "the broker still answers" in output
    assert owner.returncode == 0
