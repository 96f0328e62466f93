"""End to end: `mia-detector run` on the embedded broker, scraped by a real Prometheus that also loads the
self-monitoring rules; the series are read back through Prometheus' HTTP API."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker, free_port
from detector.domain import DeadLetterReason
from detector.metrics import PREFIX, package_version
from detector.scoring.model import ScoringModel
from detector.service import produce_file
from detector.settings import Settings
from detector.simulate.sample import MALFORMED
from tests.prometheus import JOB, prometheus_binary, query, running_prometheus, values, wait_for
from tests.scoring.test_scoring import RULES, baseline_trajectories
from tests.support import make_settings, missing_tool
from tests.test_cli import cli_env, start
from tests.test_metrics import write_stream

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

RULE_FILE = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules" / "mia-detector.rules.yml"
# Group join (~3 s with a 6 s session timeout), consumption, and the first scrapes (~6 s after start).
CONSUME_SECONDS = 120.0
STOP_SECONDS = 30.0


@contextmanager
def running_daemon(settings: Settings, model: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`mia-detector run` configured through the environment, as an operator runs it; SIGTERM on exit
    (SIGKILL if it has not stopped within `STOP_SECONDS`)."""
    env = cli_env(
        MIA_KAFKA_BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        MIA_KAFKA_TOPICS=json.dumps(settings.kafka.topics),
        MIA_KAFKA_GROUP_ID=settings.kafka.group_id,
        MIA_KAFKA_SESSION_TIMEOUT_MS=str(settings.kafka.session_timeout_ms),
        MIA_KAFKA_MAX_POLL_RECORDS="100",
        MIA_DATABASE_URL=settings.database.url.get_secret_value(),
        MIA_COMMIT_MIN_INTERVAL_SECONDS="0.5",
        MIA_METRICS_ADDR=settings.metrics.addr,
        MIA_MODEL_PATH=str(model),
    )
    process = start("run", env=env, log=log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_running_daemon_is_scraped_with_sensible_values(
    broker: EmbeddedBroker, sqlite_url: str, tmp_path: Path
) -> None:
    if prometheus_binary() is None:
        missing_tool("prometheus")
    events, records = write_stream(tmp_path)
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    model.save(tmp_path / "model")
    port = free_port()
    settings = make_settings(sqlite_url, broker, metrics={"addr": f"127.0.0.1:{port}"})
    topic = settings.kafka.topics[0]
    assert produce_file(settings, events, topic) == records
    log = tmp_path / "daemon.log"

    with (
        running_daemon(settings, tmp_path / "model", log) as daemon,
        running_prometheus(tmp_path, [f"127.0.0.1:{port}"], rule_files=[RULE_FILE]) as prometheus,
    ):
        consumed = f'{PREFIX}_events_consumed_total{{job="{JOB}", source="kafka"}}'
        try:
            wait_for(
                prometheus,
                consumed,
                lambda r: [float(s["value"][1]) for s in r] == [records],
                CONSUME_SECONDS,
            )
        except TimeoutError:
            raise AssertionError(
                f"daemon exit code {daemon.poll()}; log:\n{log.read_text()[-3000:]}"
            ) from None

        assert values(prometheus, f'up{{job="{JOB}"}}') == [1.0]
        # The rest was scraped no earlier than the event count: read it from the same (latest) scrape.
        assert values(prometheus, f"{PREFIX}_queries_total") == [pytest.approx(records - len(MALFORMED))]
        for latency in ("from_event", "from_receipt"):
            assert values(prometheus, f"{PREFIX}_processing_latency_{latency}_seconds_count")[0] > 0
        assert values(prometheus, f"{PREFIX}_commits_total")[0] >= 1
        newest = values(prometheus, f"{PREFIX}_last_event_timestamp_seconds")
        assert len(newest) == 1 and newest[0] > 1_700_000_000

        dead_letters = {
            sample["metric"]["reason"]: float(sample["value"][1])
            for sample in query(prometheus, f"{PREFIX}_dead_letters_total")
        }
        assert set(dead_letters) == {reason.value for reason in DeadLetterReason}
        assert sum(dead_letters.values()) == len(MALFORMED)

        lag = wait_for(prometheus, f'{PREFIX}_consumer_lag_records{{topic="{topic}"}}', bool, 30.0)
        # tansu reports a wrong high watermark: that lag is exported per partition, not what it is.
        assert all(int(sample["metric"]["partition"]) in range(4) for sample in lag)

        build = query(prometheus, f"{PREFIX}_build_info")
        assert [sample["metric"]["version"] for sample in build] == [package_version()]
        assert values(prometheus, f'{PREFIX}_model_info{{version="{model.version}"}}') == [1.0]
        age = values(prometheus, f"{PREFIX}_model_age_seconds")
        assert len(age) == 1 and 0 <= age[0] < 3600
        assert sum(values(prometheus, f"{PREFIX}_score_ratio_count")) > 0
        assert values(prometheus, f"{PREFIX}_outbox_backpressure") == [0.0]

        # The self-monitoring rules are evaluated on these very series, and a healthy daemon trips none (once
        # the target has been scraped: an evaluation before the first scrape finds it absent, pending).
        wait_for(prometheus, "ALERTS", lambda result: result == [], 10.0)

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=STOP_SECONDS) == 0, log.read_text()[-3000:]
