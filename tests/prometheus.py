"""`running_prometheus`: a real Prometheus (the Debian `prometheus` binary) scraping given targets for a test,
and helpers to query it through its HTTP API.

CI installs it with `apt-get install -y --no-install-recommends prometheus` (which brings `promtool`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from detector.broker import free_port
from tests.servers import running_server

JOB = "mia-detector"  # the job name the self-monitoring rules select


def prometheus_binary() -> str | None:
    """The path of the Prometheus binary, or None when it is not installed."""
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    """The path of promtool, or None when it is not installed."""
    return shutil.which("promtool")


def config_text(
    scrape_targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    scrape: Mapping[str, Any] | None = None,
    jobs: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A Prometheus configuration scraping `scrape_targets` (host:port) as job `JOB` every second, with the
    scrape options `scrape` (`scheme`, `basic_auth`, `tls_config`, ...), and the further scrape configs
    `jobs` as given."""
    job = {"job_name": JOB, "static_configs": [{"targets": list(scrape_targets)}], **(scrape or {})}
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path.resolve()) for path in rule_files],
        "scrape_configs": [job, *jobs],
    }
    return json.dumps(config, indent=1)  # JSON is YAML


@contextmanager
def running_prometheus(
    tmp_path: Path,
    scrape_targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    scrape: Mapping[str, Any] | None = None,
    jobs: Sequence[Mapping[str, Any]] = (),
) -> Iterator[str]:
    """Start Prometheus on a free 127.0.0.1 port, scraping `scrape_targets` every second (see
    `config_text` for `scrape` and `jobs`) with its config, storage and log under `tmp_path`; yield its URL
    (`http://127.0.0.1:<port>`) once `/-/ready` answers; stop it on exit.

    Raises `FileNotFoundError` when it is not installed and `RuntimeError` (with the end of its log) when
    it exits or does not get ready in time.
    """
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (apt-get install prometheus)")
    directory = tmp_path / "prometheus"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(config_text(scrape_targets, rule_files, scrape, jobs))
    log_path = directory / "prometheus.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with running_server("prometheus", command, url, log_path):
        yield url


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """The result vector of an instant query (`/api/v1/query`): [{"metric": {...}, "value": [t, "v"]}]."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5.0)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def values(url: str, expr: str) -> list[float]:
    """The values of an instant query's result vector."""
    return [float(sample["value"][1]) for sample in query(url, expr)]


def wait_for(
    url: str, expr: str, condition: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    """Query `expr` every 0.5 s until `condition(result)` holds; return that result, or raise
    `TimeoutError` with the last result after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = query(url, expr)
        if condition(result):
            return result
        time.sleep(0.5)
    raise TimeoutError(f"{expr!r} not as expected after {timeout} s; last result: {result}")


def rules(url: str) -> list[dict[str, Any]]:
    """Every rule Prometheus loaded (`/api/v1/rules`), with its group's name under "group"."""
    response = httpx.get(f"{url}/api/v1/rules", timeout=5.0)
    response.raise_for_status()
    return [
        {**rule, "group": group["name"]}
        for group in response.json()["data"]["groups"]
        for rule in group["rules"]
    ]
