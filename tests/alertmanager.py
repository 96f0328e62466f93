"""`running_alertmanager`: a real Alertmanager (the Debian `prometheus-alertmanager` binary) for a test.

CI installs it with `apt-get install -y --no-install-recommends prometheus-alertmanager`; a plain
`alertmanager` binary on the PATH (an upstream release) works as well.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from detector.broker import free_port
from tests.servers import running_server

BINARIES = ("prometheus-alertmanager", "alertmanager")

# One receiver that sends nothing; a short group_wait so that alerts are processed quickly.
CONFIG = """\
route:
  receiver: "null"
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: "null"
"""


def alertmanager_binary() -> str | None:
    """The path of the Alertmanager binary, or None when it is not installed."""
    for name in BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


@contextmanager
def running_alertmanager(directory: Path) -> Iterator[str]:
    """Start Alertmanager on 127.0.0.1 with its config, data and log under `directory`; yield its URL
    (`http://127.0.0.1:<port>`) once `/-/ready` answers; stop it on exit.

    Clustering is off. Raises `FileNotFoundError` when no binary is installed and `RuntimeError`
    (with the end of its log) when it exits or does not get ready in time.
    """
    binary = alertmanager_binary()
    if binary is None:
        raise FileNotFoundError(f"none of {BINARIES} is installed (apt-get install prometheus-alertmanager)")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "alertmanager.yml"
    config.write_text(CONFIG)
    storage = directory / "alertmanager-data"
    log_path = directory / "alertmanager.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    with running_server("alertmanager", command, url, log_path):
        yield url
