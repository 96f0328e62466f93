"""`check_sinks`: one test notification to every configured sink, against real receivers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from detector.alerts.connectivity import SinkCheck, check_sinks
from detector.alerts.sinks import configured_sink_names
from tests.receivers import RecordingReceiver
from tests.support import make_settings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_each_configured_sink_gets_one_test_notification_and_reports_its_outcome(
    sqlite_url: str, tmp_path: Path
) -> None:
    findings = tmp_path / "findings.jsonl"
    with RecordingReceiver() as webhook, RecordingReceiver(status=500, body="slack is down") as slack:
        settings = make_settings(
            sqlite_url,
            webhook={"url": f"{webhook.url}/hook"},
            slack={"webhook_url": f"{slack.url}/services/T0/B0/s3cr3t"},
            ocsf={"file": str(findings)},
            dashboard={"url": "https://grafana.example/d/mia-client"},
        )

        checks = list(check_sinks(settings, NOW))

        assert [check.sink for check in checks] == configured_sink_names(settings)
        assert checks == [
            SinkCheck("slack", "slack: HTTP 500 slack is down"),
            SinkCheck("webhook"),
            SinkCheck("ocsf-file"),
        ]
        assert [check.delivered for check in checks] == [False, True, True]
        assert "s3cr3t" not in repr(checks)  # the Slack URL is a credential
        [request] = webhook.accepted
        [failed] = slack.requests
    sent = orjson.loads(request.body)
    assert sent["event"] == "test" and sent["created_at"].startswith("2026-03-01T12:00:00")
    assert sent["dashboard_url"] == "https://grafana.example/d/mia-client"
    assert orjson.loads(failed.body)  # Slack was sent the same check, in its own format
    # The file sink was closed: its one finding is on disk, whole.
    [finding] = findings.read_text().splitlines()
    assert orjson.loads(finding)["class_uid"] == 2004


def test_without_sinks_nothing_is_checked(sqlite_url: str) -> None:
    assert list(check_sinks(make_settings(sqlite_url), NOW)) == []
