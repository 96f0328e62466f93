"""The demo (`make run`): a simulated hour streamed through a local broker into the daemon, which catches
the attacks and pages no benign client, and says where to look next."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

PROJECT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.kafka
def test_the_demo_streams_its_traffic_through_the_daemon_and_catches_the_attacks_alone(
    tmp_path: Path,
) -> None:
    command = str(Path(sys.executable).parent / "mia-detector")  # as `make run` runs it, off the PATH
    demo = subprocess.run(
        [command, "--config", "examples/simulation.toml", "demo", "--workdir", str(tmp_path / "demo")],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert demo.returncode == 0, demo.stderr[-2000:]
    output = demo.stdout + demo.stderr
    streamed = re.search(r"(\d+) records streamed through the broker", output)
    consumed = re.search(r"daemon: (\d+) records: .* (\d+) alerts opened", output)
    assert streamed and consumed, output[-2000:]
    assert consumed.group(1) == streamed.group(1)  # every record read, none lost
    summary = orjson.loads((tmp_path / "demo" / "evaluation" / "summary.json").read_bytes())
    assert len(summary["kinds"]) >= 4  # every kind of attack the smoke scenario sends
    assert all(kind["detected"] == kind["attackers"] > 0 for kind in summary["kinds"]), summary["kinds"]
    assert summary["benign_clients"] > 0 and summary["benign_alerted"] == 0
    assert re.search(r"benign clients falsely alerted: 0/\d+", output), output[-2000:]
    assert f"{command} alerts list" in output  # a hint that runs as pasted
    assert "Traceback" not in output
