"""The alert commands as operators run them: silences, acknowledge/resolve, the outbox, `alerts test`."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from detector.alerts.lifecycle import NotificationPolicy
from detector.storage import Store, create_engine_for, upgrade
from tests.receivers import RecordingReceiver
from tests.storage.conftest import Alerts
from tests.storage.test_alerts import detection
from tests.test_cli import cli_env, mia


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    upgrade(create_engine_for(url))
    return url


def jsonl(text: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def open_alert(url: str, client: str = "client-a") -> int:
    """Open an alert that notified the webhook; return its id."""
    with Store(create_engine_for(url)) as store:
        outcome = Alerts(store, NotificationPolicy(sinks=("webhook",))).record([detection(client)])
    [(_, change)] = outcome.changes
    assert [notification.event.value for notification in outcome.notifications] == ["opened"]
    return change.alert.id


def test_silence_list_and_unsilence(database: str) -> None:
    env = cli_env(MIA_DATABASE_URL=database, USER="alice")

    made = mia("alerts", "silence", "--client", "client-a", "--rule", "MIA-004", "--for", "1h30m", env=env)
    assert made.returncode == 0, made.stderr
    assert "silence 1 (client=client-a rule=MIA-004) until " in made.stderr

    [row] = jsonl(mia("alerts", "silences", "--format", "jsonl", env=env).stdout)
    assert (row["id"], row["matches"], row["created_by"]) == (1, "client=client-a rule=MIA-004", "alice")

    assert mia("alerts", "unsilence", "1", env=env).returncode == 0
    assert jsonl(mia("alerts", "silences", "--format", "jsonl", env=env).stdout) == []
    again = mia("alerts", "unsilence", "1", env=env)
    assert again.returncode == 2 and "no active silence 1" in again.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--for", "2h"], "say what to silence"),
        (["--client", "a", "--for", "2 hours"], "is not a duration"),
        (["--client", "a"], "Missing option '--for'"),
    ],
)
def test_bad_silences_get_one_line(database: str, args: list[str], expected: str) -> None:
    result = mia("alerts", "silence", *args, env=cli_env(MIA_DATABASE_URL=database))

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


def test_acknowledge_and_resolve_queue_notifications_shown_by_outbox(database: str) -> None:
    alert_id = open_alert(database)
    env = cli_env(MIA_DATABASE_URL=database, MIA_WEBHOOK_URL="http://127.0.0.1:9/hook")

    acknowledged = mia("alerts", "acknowledge", str(alert_id), env=env)
    assert acknowledged.returncode == 0 and "notification queued" in acknowledged.stderr
    assert mia("alerts", "resolve", str(alert_id), env=env).returncode == 0
    missing = mia("alerts", "resolve", str(alert_id), env=env)
    assert missing.returncode == 2 and f"no open alert with id {alert_id}" in missing.stderr

    rows = jsonl(mia("alerts", "outbox", "--format", "jsonl", env=env).stdout)
    assert [(r["sink"], r["event"], r["status"]) for r in reversed(rows)] == [
        ("webhook", "opened", "pending"),
        ("webhook", "acknowledged", "pending"),
        ("webhook", "resolved", "pending"),
    ]
    [alert] = jsonl(mia("alerts", "list", "--format", "jsonl", env=env).stdout)
    assert alert["status"] == "resolved"


def test_alerts_test_reports_each_sink(database: str, tmp_path: Path) -> None:
    with RecordingReceiver() as webhook, RecordingReceiver(status=500, body="slack is down") as slack:
        env = cli_env(
            MIA_DATABASE_URL=database,
            MIA_WEBHOOK_URL=f"{webhook.url}/hook",
            MIA_SLACK_WEBHOOK_URL=f"{slack.url}/services/T0/B0/secret",
            MIA_OCSF_FILE=str(tmp_path / "findings.jsonl"),
        )
        result = mia("alerts", "test", env=env)

        assert result.returncode == 1
        lines = result.stdout.strip().splitlines()
        assert lines[0] == "slack: FAILED: slack: HTTP 500 slack is down"
        assert lines[1:] == ["webhook: delivered", "ocsf-file: delivered"]
        assert "1 of 3 sinks did not take the test notification" in result.stderr
        assert "secret" not in result.stdout + result.stderr  # the Slack URL is a credential
        [request] = webhook.accepted
        assert orjson.loads(request.body)["event"] == "test"
        [finding] = (tmp_path / "findings.jsonl").read_text().splitlines()
        assert orjson.loads(finding)["class_uid"] == 2004


def test_alerts_test_without_sinks_says_how_to_configure_one(database: str) -> None:
    result = mia("alerts", "test", env=cli_env(MIA_DATABASE_URL=database))

    assert result.returncode == 2 and "no sink configured: set MIA_ALERTMANAGER_URL" in result.stderr
