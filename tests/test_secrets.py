"""Secrets: read from files as containers mount them, never shown (`config show`, errors, DEBUG logs), and a
URL with credentials is either used or refused in one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from detector.broker import EmbeddedBroker, free_port
from detector.settings import ConfigError, load_settings, mask_url, secret_variables
from detector.simulate.sample import write_sample
from tests.grafana_server import FakeGrafana
from tests.receivers import RecordingReceiver
from tests.secured_broker import HOST, start_tansu, stop
from tests.support import fresh_postgres_database, unique
from tests.test_cli import cli_env

COMMAND_SECONDS = 120


def mia(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_SECONDS,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mia-detector: error: "), result.stderr
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("MIA_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- URLs in `config show` -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://admin:pw@grafana:3000/d/x", "https://admin:***@grafana:3000/d/x"),
        ("postgresql://detector@db/mia", "postgresql://detector@db/mia"),
        ("postgresql+psycopg://u:p@ss:w@db:5432/mia", "postgresql+psycopg://u:***@db:5432/mia"),
        (
            "https://pd.example/v2/enqueue?token=abc&api_key=def",
            "https://pd.example/v2/enqueue?token=***&api_key=***",
        ),
        ("https://h/cb#access_token=xyz&state=1", "https://h/cb#access_token=***&state=***"),
        ("https://h/p?bare-token", "https://h/p?***"),
        ("https://[::1]:8443/x?k=v", "https://[::1]:8443/x?k=***"),
        ("sqlite:///var/lib/mia/mia.db", "sqlite:///var/lib/mia/mia.db"),
        ("http://[::1/broken", "**********"),
    ],
)
def test_a_url_keeps_what_people_read_and_loses_what_authenticates(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_config_show_masks_credentials_in_every_url_setting() -> None:
    env = cli_env(
        MIA_DATABASE_URL="postgresql://detector:db-pw-1@db.internal/mia?sslmode=require&password=db-pw-2",
        MIA_DASHBOARD_URL="https://viewer:dash-pw@grafana.example/d/mia-client?auth_token=dash-token",
        MIA_PAGERDUTY_URL="https://relay:pd-pw@pd.internal/v2/enqueue?api_key=pd-key",
        MIA_PAGERDUTY_ROUTING_KEY="R0UT1NG-KEY",
    )
    result = mia("config", "show", env=env)

    assert result.returncode == 0, result.stderr
    for secret in ("db-pw-1", "db-pw-2", "dash-pw", "dash-token", "pd-pw", "pd-key", "R0UT1NG-KEY"):
        assert secret not in result.stdout
    shown = orjson.loads(result.stdout)
    assert shown["database"]["url"] == "postgresql://detector:***@db.internal/mia?sslmode=***&password=***"
    assert shown["dashboard"]["url"] == "https://viewer:***@grafana.example/d/mia-client?auth_token=***"
    assert shown["pagerduty"]["url"] == "https://relay:***@pd.internal/v2/enqueue?api_key=***"


def test_every_secret_setting_is_masked(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Every secret at once, the Kafka ones with the security protocol that uses them.
    clean_env.setenv("MIA_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("MIA_KAFKA_SASL_USERNAME", "detector")
    clean_env.setenv("MIA_KAFKA_SSL_CERTFILE", str(tmp_path / "client.pem"))
    clean_env.setenv("MIA_METRICS_USERNAME", "prometheus")
    passwords = {variable: f"pw-{variable.lower()}-v4lue" for variable in secret_variables()}
    for variable, password in passwords.items():
        clean_env.setenv(variable, f"https://user:{password}@host/path?key={password}")
    # A key has a form of its own: hexadecimal.
    passwords["MIA_TRAINING_INDEX_KEY"] = "5ec2e7" * 8
    clean_env.setenv("MIA_TRAINING_INDEX_KEY", passwords["MIA_TRAINING_INDEX_KEY"])

    shown = orjson.dumps(load_settings().masked()).decode()

    for password in passwords.values():
        assert password not in shown


# -- secrets from files --------------------------------------------------------------------------------------


def test_the_secret_settings_are_every_secret_field() -> None:
    assert {
        "MIA_DATABASE_URL",
        "MIA_KAFKA_SASL_PASSWORD",
        "MIA_KAFKA_SSL_PASSWORD",
        "MIA_WEBHOOK_SECRET",
        "MIA_WEBHOOK_URL",
        "MIA_PAGERDUTY_ROUTING_KEY",
        "MIA_SLACK_WEBHOOK_URL",
        "MIA_ALERTMANAGER_URL",
        "MIA_GRAFANA_TOKEN",
        "MIA_GRAFANA_POSTGRES_PASSWORD",
        "MIA_METRICS_PASSWORD",
        "MIA_TRAINING_INDEX_KEY",
        "MIA_RISK_TOKEN",
        "MIA_CANARY_KEY",
    } == set(secret_variables())


@pytest.mark.parametrize("variable", sorted(secret_variables()))
def test_every_secret_can_be_read_from_a_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    if variable.startswith("MIA_KAFKA_"):
        clean_env.setenv("MIA_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
        clean_env.setenv("MIA_KAFKA_SASL_USERNAME", "detector")
        clean_env.setenv("MIA_KAFKA_SASL_PASSWORD", "set-directly")
        clean_env.delenv(variable, raising=False)
        clean_env.setenv("MIA_KAFKA_SSL_CERTFILE", str(tmp_path / "client.pem"))
    if variable == "MIA_METRICS_PASSWORD":
        clean_env.setenv("MIA_METRICS_USERNAME", "prometheus")
    value = "5ec2e7" * 8 if variable == "MIA_TRAINING_INDEX_KEY" else "s3cret value from a file"
    secret = tmp_path / "secret"
    secret.write_text(f"{value}\n")  # as `echo ... > file` writes it
    clean_env.setenv(f"{variable}_FILE", str(secret))

    settings = load_settings()

    target: object = settings
    for part in secret_variables()[variable]:
        target = getattr(target, part)
    assert isinstance(target, SecretStr)
    assert target.get_secret_value() == value


def test_a_secret_file_beats_an_empty_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("R0UT1NG\r\n")
    clean_env.setenv("MIA_PAGERDUTY_ROUTING_KEY", "")
    clean_env.setenv("MIA_PAGERDUTY_ROUTING_KEY_FILE", str(tmp_path / "key"))

    routing_key = load_settings().pagerduty.routing_key

    assert routing_key is not None and routing_key.get_secret_value() == "R0UT1NG"


def test_a_secret_set_both_ways_is_an_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-the-file")
    clean_env.setenv("MIA_WEBHOOK_SECRET", "from-the-variable")
    clean_env.setenv("MIA_WEBHOOK_SECRET_FILE", str(tmp_path / "secret"))

    with pytest.raises(ConfigError) as error:
        load_settings()

    assert str(error.value) == "both MIA_WEBHOOK_SECRET and MIA_WEBHOOK_SECRET_FILE are set: keep one"


@pytest.mark.parametrize("problem", ["missing", "directory", "binary"])
def test_an_unreadable_secret_file_is_one_line_naming_the_variable(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "db-url"
    if problem == "directory":
        path.mkdir()
    elif problem == "binary":
        path.write_bytes(b"postgresql://u:\xff\xfe-s3cret@db/mia")
    result = mia("config", "show", env=cli_env(MIA_DATABASE_URL_FILE=path))

    line = one_error_line(result)
    assert line.startswith(f"mia-detector: error: cannot read MIA_DATABASE_URL_FILE ({path}): ")
    assert "s3cret" not in result.stderr


# -- a Grafana URL with credentials --------------------------------------------------------------------------


GRAFANA_WITH_PASSWORD = "https://admin:gr4fana-pw@grafana.example:3000"


@pytest.mark.parametrize(
    "args",
    [
        ["config", "show"],
        ["alerts", "test"],
        ["dashboards", "push"],
        ["run", "--exit-when-idle", "1"],
        ["replay", "-"],
        ["alerts", "list"],
    ],
)
def test_a_grafana_url_with_credentials_is_refused_in_one_line_by_every_command(
    args: list[str], tmp_path: Path
) -> None:
    env = cli_env(
        MIA_GRAFANA_URL=GRAFANA_WITH_PASSWORD,
        MIA_GRAFANA_TOKEN="glsa_t0ken",
        MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'mia.db'}",
        MIA_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
        MIA_METRICS_ADDR="",
    )
    line = one_error_line(mia(*args, env=env))

    assert "MIA_GRAFANA_URL" in line and "must not hold credentials" in line
    assert "gr4fana-pw" not in line and "glsa_t0ken" not in line


def test_dashboards_push_refuses_a_url_option_with_credentials_in_one_line() -> None:
    env = cli_env(MIA_GRAFANA_TOKEN="glsa_t0ken")
    line = one_error_line(mia("dashboards", "push", "--url", GRAFANA_WITH_PASSWORD, env=env))

    assert "--url" in line and "must not hold credentials" in line and "gr4fana-pw" not in line


# -- nothing secret in DEBUG logs ----------------------------------------------------------------------------


@pytest.fixture
def sasl_broker(tmp_path: Path) -> Iterator[str]:
    port = free_port(HOST)
    process = start_tansu(port, port, tmp_path / "sasl-broker.log", "--authentication")
    try:
        yield f"{HOST}:{port}"
    finally:
        stop(process)


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_no_secret_reaches_the_output_even_at_debug_level(
    broker: EmbeddedBroker, sasl_broker: str, tmp_path: Path
) -> None:
    secrets = {
        "database": "db-S3CRET-pw",
        "kafka": "kafka-S3CRET-pw",
        "webhook": "webhook-S3CRET-hmac",
        "webhook-url": "webhook-S3CRET-token",
        "pagerduty": "pagerduty-S3CRET-routing-key",
        "slack": "slack-S3CRET-path",
        "grafana": "grafana-S3CRET-token",
        "grafana-postgres": "grafana-S3CRET-reader-pw",
        "alertmanager": "alertmanager-S3CRET-pw",
        "pagerduty-url": "pagerduty-S3CRET-relay-pw",
        "dashboard": "dashboard-S3CRET-token",
    }
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=4, events=200, malformed_every=40)
    (tmp_path / "webhook-secret").write_text(secrets["webhook"] + "\n")
    with (
        fresh_postgres_database() as database,
        RecordingReceiver() as receiver,
        FakeGrafana(tokens={secrets["grafana"]: "Admin"}) as grafana,
    ):
        # The password means nothing to the test server (trust authentication), but goes everywhere the URL
        # goes.
        user, _, rest = database.partition("://")[2].partition("@")
        database_url = f"postgresql://{user.split(':')[0]}:{secrets['database']}@{rest}"
        common: dict[str, str | Path] = {
            "MIA_LOG_LEVEL": "DEBUG",
            "MIA_DATABASE_URL": database_url,
            "MIA_METRICS_ADDR": "",
            "MIA_ALERTMANAGER_URL": receiver.url.replace("://", f"://mia:{secrets['alertmanager']}@"),
            "MIA_WEBHOOK_URL": f"{receiver.url}/hook?token={secrets['webhook-url']}",
            "MIA_WEBHOOK_SECRET_FILE": tmp_path / "webhook-secret",
            "MIA_PAGERDUTY_ROUTING_KEY": secrets["pagerduty"],
            "MIA_PAGERDUTY_URL": receiver.url.replace("://", f"://relay:{secrets['pagerduty-url']}@")
            + "/v2/enqueue",
            "MIA_DASHBOARD_URL": f"https://grafana.example/d/mia?auth_token={secrets['dashboard']}",
            "MIA_SLACK_WEBHOOK_URL": f"{receiver.url}/services/T0/B0/{secrets['slack']}",
            "MIA_GRAFANA_URL": grafana.url,
            "MIA_GRAFANA_TOKEN": secrets["grafana"],
            "MIA_GRAFANA_POSTGRES_PASSWORD": secrets["grafana-postgres"],
            "MIA_KAFKA_SESSION_TIMEOUT_MS": "6000",
        }
        plain = cli_env(**common, MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers)
        sasl = cli_env(
            **common,
            MIA_KAFKA_BOOTSTRAP_SERVERS=sasl_broker,
            MIA_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
            MIA_KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
            MIA_KAFKA_SASL_USERNAME="detector",
            MIA_KAFKA_SASL_PASSWORD=secrets["kafka"],
            MIA_KAFKA_CONNECT_TIMEOUT_SECONDS="3",
        )
        topic = unique("secrets")
        runs = [
            (["config", "show"], plain, 0),
            (["--log-level", "DEBUG", "db", "upgrade"], plain, 0),
            (["--log-level", "DEBUG", "replay", str(events)], plain, 0),
            (["--log-level", "DEBUG", "alerts", "test"], plain, 0),
            (["--log-level", "DEBUG", "dashboards", "push"], plain, 0),
            (["--log-level", "DEBUG", "produce", str(events), "--topic", topic], plain, 0),
            (["--log-level", "DEBUG", "run", "--topic", topic, "--exit-when-idle", "3"], plain, 0),
            (["--log-level", "DEBUG", "produce", str(events), "--topic", topic], sasl, 1),
            (["--log-level", "DEBUG", "run", "--topic", topic], sasl, 1),
        ]
        debug_lines = 0
        for args, env, code in runs:
            result = mia(*args, env=env)
            output = result.stdout + result.stderr
            assert result.returncode == code, f"{args}: {result.stderr[-3000:]}"
            for name, secret in secrets.items():
                assert secret not in output, f"{name} secret in the output of {args}"
            debug_lines += output.count(" DEBUG ")
        assert debug_lines > 100  # the libraries did talk

        # The secrets did reach where they belong.
        assert any(secrets["pagerduty"].encode() in request.body for request in receiver.requests)
        assert any(request.path.endswith(secrets["slack"]) for request in receiver.requests)
        assert grafana.secrets
