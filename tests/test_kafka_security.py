"""Kafka over TLS and SASL, for real: the embedded broker behind a TLS proxy, or requiring SASL; every failure
fast, in one line, and a daemon that stops at once when told to while it is still connecting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer
from kafka import KafkaConsumer, KafkaProducer

from detector.broker import EmbeddedBroker, free_port
from detector.kafka import BOOTSTRAP_TIMEOUT_OPTION, client_options
from detector.kafka.confluent import consumer_config
from detector.settings import ConfigError, KafkaSettings, load_settings
from detector.simulate.sample import write_sample
from tests.secured_broker import HOST, BrokerBehindTls, Certificates, make_certificates, start_tansu, stop
from tests.support import unique

# Every command below must end well within this, or the test fails instead of hanging.
COMMAND_SECONDS = 120


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_broker(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerBehindTls]:
    """The broker reachable only through TLS, and only with a client certificate signed by the test CA."""
    log_file = tmp_path_factory.mktemp("tls-broker") / "tansu.log"
    with BrokerBehindTls(certificates, log_file, require_client_certificate=True) as running:
        yield running


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap address of a broker that requires SASL (SCRAM) authentication."""
    port = free_port(HOST)
    log_file = tmp_path_factory.mktemp("sasl-broker") / "tansu.log"
    process = start_tansu(port, port, log_file, "--authentication")
    try:
        yield f"{HOST}:{port}"
    finally:
        stop(process)


def env_for(bootstrap_servers: str, tmp_path: Path, **variables: str | Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MIA_")}
    env.update(
        MIA_KAFKA_BOOTSTRAP_SERVERS=bootstrap_servers,
        MIA_KAFKA_SESSION_TIMEOUT_MS="6000",
        MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'mia.db'}",
        MIA_METRICS_ADDR="",
    )
    env.update({name: str(value) for name, value in variables.items()})
    return env


def tls_variables(certificates: Certificates, **overrides: str | Path) -> dict[str, str | Path]:
    return {
        "MIA_KAFKA_SECURITY_PROTOCOL": "SSL",
        "MIA_KAFKA_SSL_CAFILE": certificates.ca,
        "MIA_KAFKA_SSL_CERTFILE": certificates.client_cert,
        "MIA_KAFKA_SSL_KEYFILE": certificates.client_key,
        "MIA_KAFKA_SSL_PASSWORD": certificates.client_key_password,
        **overrides,
    }


def mia(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_SECONDS,
        check=False,
    )


def failure_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a command that failed at run time (exit code 1), without a traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mia-detector: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def events_file(tmp_path: Path) -> Path:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=6, events=300, malformed_every=50)
    return events


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_records_are_produced_and_consumed_over_tls_with_a_client_certificate(
    tls_broker: BrokerBehindTls, certificates: Certificates, tmp_path: Path, client: str
) -> None:
    env = env_for(
        tls_broker.bootstrap_servers,
        tmp_path,
        **tls_variables(certificates),
        MIA_KAFKA_DEAD_LETTER_TOPIC=unique("dlq"),  # a producer inside the daemon, too
        MIA_KAFKA_CLIENT=client,
    )
    topic = unique("tls")
    before = tls_broker.proxy.handshakes

    produced = mia("produce", str(events_file(tmp_path)), "--topic", topic, env=env)
    assert produced.returncode == 0, produced.stderr
    ran = mia("run", "--topic", topic, "--group-id", unique("g"), "--exit-when-idle", "4", env=env)

    assert ran.returncode == 0, ran.stderr
    assert "300 records: 294 events" in ran.stderr and "6 dead letters" in ran.stderr
    # The broker advertises only the proxy: every connection of every client went through TLS.
    assert tls_broker.proxy.handshakes - before >= 3


@pytest.mark.kafka
def test_a_ca_that_did_not_sign_the_broker_certificate_fails_fast(
    tls_broker: BrokerBehindTls, certificates: Certificates, tmp_path: Path
) -> None:
    env = env_for(
        tls_broker.bootstrap_servers,
        tmp_path,
        **tls_variables(certificates, MIA_KAFKA_SSL_CAFILE=certificates.other_ca),
    )
    started = time.monotonic()
    result = mia("produce", str(events_file(tmp_path)), "--topic", unique("t"), env=env)

    line = failure_line(result)
    assert time.monotonic() - started < 20
    assert f"cannot connect to Kafka at {tls_broker.bootstrap_servers} over SSL" in line
    assert "certificate is not trusted" in line and "MIA_KAFKA_SSL_CAFILE" in line


@pytest.mark.kafka
def test_a_broker_requiring_a_client_certificate_refuses_a_client_without_one_fast(
    tls_broker: BrokerBehindTls, certificates: Certificates, tmp_path: Path
) -> None:
    variables: dict[str, str | Path] = {
        "MIA_KAFKA_SECURITY_PROTOCOL": "SSL",
        "MIA_KAFKA_SSL_CAFILE": certificates.ca,
    }
    started = time.monotonic()
    result = mia("run", env=env_for(tls_broker.bootstrap_servers, tmp_path, **variables))

    line = failure_line(result)
    assert time.monotonic() - started < 20
    assert "client certificate" in line and "MIA_KAFKA_SSL_CERTFILE" in line


@pytest.mark.kafka
def test_a_wrong_key_password_is_named_without_being_shown(
    tls_broker: BrokerBehindTls, certificates: Certificates, tmp_path: Path
) -> None:
    variables = tls_variables(certificates, MIA_KAFKA_SSL_PASSWORD="not-the-key-password")
    result = mia("run", env=env_for(tls_broker.bootstrap_servers, tmp_path, **variables))

    line = failure_line(result)
    assert "MIA_KAFKA_SSL_CERTFILE" in line and "MIA_KAFKA_SSL_PASSWORD" in line
    assert "not-the-key-password" not in result.stderr


@pytest.mark.kafka
def test_plaintext_against_the_tls_listener_fails_fast(tls_broker: BrokerBehindTls, tmp_path: Path) -> None:
    started = time.monotonic()
    result = mia("run", env=env_for(tls_broker.bootstrap_servers, tmp_path))

    line = failure_line(result)
    assert time.monotonic() - started < 20
    assert "over PLAINTEXT" in line and "MIA_KAFKA_SECURITY_PROTOCOL is SSL" in line


@pytest.mark.kafka
def test_ssl_against_a_plain_listener_fails_within_the_connect_timeout(
    broker: EmbeddedBroker, certificates: Certificates, tmp_path: Path
) -> None:
    variables: dict[str, str | Path] = {
        "MIA_KAFKA_SECURITY_PROTOCOL": "SSL",
        "MIA_KAFKA_SSL_CAFILE": certificates.ca,
        "MIA_KAFKA_CONNECT_TIMEOUT_SECONDS": "2",
    }
    started = time.monotonic()
    result = mia("run", env=env_for(broker.bootstrap_servers, tmp_path, **variables))

    line = failure_line(result)
    assert time.monotonic() - started < 20
    assert line == (
        f"mia-detector: error: cannot connect to Kafka at {broker.bootstrap_servers} over SSL: TLS handshake "
        "timed out after 2 s (is the listener plain TCP? then MIA_KAFKA_SECURITY_PROTOCOL is PLAINTEXT or "
        "SASL_PLAINTEXT)"
    )


def run_until_signalled(env: dict[str, str], log: Path, ready: str, sig: signal.Signals) -> tuple[int, float]:
    """Start `mia-detector run`, wait until `ready` is in its log, send `sig`; return the exit code and the
    seconds from the signal to the exit."""
    with log.open("ab") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "detector", "run"], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
    try:
        deadline = time.monotonic() + 60
        while ready not in log.read_text():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"never logged {ready!r}: {log.read_text()}"
            time.sleep(0.1)
        time.sleep(1.0)  # well into the wait
        assert daemon.poll() is None, log.read_text()
        signalled = time.monotonic()
        daemon.send_signal(sig)
        code = daemon.wait(timeout=30)
        return code, time.monotonic() - signalled
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_daemon_waiting_for_a_tls_handshake_stops_at_once_when_signalled(
    broker: EmbeddedBroker, certificates: Certificates, tmp_path: Path, sig: signal.Signals
) -> None:
    variables: dict[str, str | Path] = {
        "MIA_KAFKA_SECURITY_PROTOCOL": "SSL",
        "MIA_KAFKA_SSL_CAFILE": certificates.ca,
        "MIA_KAFKA_CONNECT_TIMEOUT_SECONDS": "300",
    }
    log = tmp_path / "daemon.log"
    code, seconds = run_until_signalled(
        env_for(broker.bootstrap_servers, tmp_path, **variables), log, "connecting to Kafka", sig
    )

    assert code == 0, log.read_text()
    assert seconds < 5, log.read_text()
    assert "stopped before consuming anything" in log.read_text()


@pytest.mark.kafka
@pytest.mark.slow
def test_a_daemon_inside_the_kafka_client_bootstrap_stops_at_once_when_signalled(
    sasl_broker: str, tmp_path: Path
) -> None:
    # The check passes (the broker offers SCRAM-SHA-512), then kafka-python retries an authentication that
    # cannot succeed for as long as it is allowed to.
    variables = {
        "MIA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "MIA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "MIA_KAFKA_SASL_USERNAME": "nobody",
        "MIA_KAFKA_SASL_PASSWORD": "wrong-password",
        "MIA_KAFKA_CONNECT_TIMEOUT_SECONDS": "300",
    }
    log = tmp_path / "daemon.log"
    # kafka-python logs each failed attempt at ERROR, the only level it is shown at without DEBUG.
    code, seconds = run_until_signalled(
        env_for(sasl_broker, tmp_path, **variables), log, "kafka.", signal.SIGTERM
    )

    assert code == 0, log.read_text()
    assert seconds < 5, log.read_text()
    assert "wrong-password" not in log.read_text()


@pytest.mark.kafka
def test_a_sasl_mechanism_the_broker_does_not_enable_fails_fast(sasl_broker: str, tmp_path: Path) -> None:
    variables = {
        "MIA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "MIA_KAFKA_SASL_USERNAME": "detector",
        "MIA_KAFKA_SASL_PASSWORD": "pw-4-kafka",
    }  # the mechanism defaults to PLAIN, which tansu does not offer
    started = time.monotonic()
    result = mia("run", env=env_for(sasl_broker, tmp_path, **variables))

    line = failure_line(result)
    assert time.monotonic() - started < 20
    assert "SASL handshake for PLAIN" in line and "MIA_KAFKA_SASL_MECHANISM" in line
    assert "pw-4-kafka" not in result.stderr


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("command", "client"),
    [(["produce", "EVENTS", "--topic", "t"], "kafka-python"), (["run"], "confluent")],
    ids=["produce", "run-on-confluent"],
)
def test_sasl_credentials_the_broker_rejects_fail_within_the_connect_timeout(
    sasl_broker: str, tmp_path: Path, command: list[str], client: str
) -> None:
    variables = {
        "MIA_KAFKA_CLIENT": client,
        "MIA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "MIA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "MIA_KAFKA_SASL_USERNAME": "nobody",
        "MIA_KAFKA_SASL_PASSWORD": "pw-4-kafka",
        "MIA_KAFKA_CONNECT_TIMEOUT_SECONDS": "3",
    }
    args = [str(events_file(tmp_path)) if arg == "EVENTS" else arg for arg in command]
    started = time.monotonic()
    result = mia(*args, env=env_for(sasl_broker, tmp_path, **variables))

    line = failure_line(result)
    assert time.monotonic() - started < 25
    assert f"cannot connect to Kafka at {sasl_broker} over SASL_PLAINTEXT" in line
    assert "MIA_KAFKA_SASL_PASSWORD" in line and "pw-4-kafka" not in result.stderr


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_the_security_settings_reach_the_kafka_clients(
    certificates: Certificates, protocol: str, mechanism: str
) -> None:
    tls = {"ssl_cafile": certificates.ca} if protocol == "SASL_SSL" else {}
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:1",
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username="detector",
        sasl_password="pw-4-kafka",
        connect_timeout_seconds=7,
        **tls,
    )
    options = client_options(settings)
    # A given api_version spares the clients their bootstrap: nothing listens on port 1.
    consumer = KafkaConsumer(**options, api_version=(2, 5, 0))
    producer = KafkaProducer(**options, api_version=(2, 5, 0))
    try:
        for config in (consumer.config, producer.config):
            assert config["security_protocol"] == protocol
            assert config["sasl_mechanism"] == mechanism
            assert config["sasl_plain_username"] == "detector"
            assert config["sasl_plain_password"] == "pw-4-kafka"
            assert config[BOOTSTRAP_TIMEOUT_OPTION] == 7000
            assert (config["ssl_context"] is not None) == (protocol == "SASL_SSL")
    finally:
        consumer.close()
        producer.close(timeout=1)


def test_every_client_option_is_one_the_installed_kafka_python_knows(certificates: Certificates) -> None:
    settings = KafkaSettings(
        security_protocol="SASL_SSL",
        ssl_cafile=certificates.ca,
        ssl_certfile=certificates.client_cert,
        ssl_keyfile=certificates.client_key,
        ssl_password=certificates.client_key_password,
        sasl_username="u",
        sasl_password="p",
    )
    options = set(client_options(settings))
    assert options <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert options <= set(KafkaProducer.DEFAULT_CONFIG)


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL", "SASL_PLAINTEXT"])
def test_the_security_settings_reach_librdkafka_under_its_names(
    certificates: Certificates, protocol: str
) -> None:
    tls = protocol in ("SSL", "SASL_SSL")
    sasl = protocol.startswith("SASL")
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:1",
        security_protocol=protocol,
        ssl_check_hostname=False,
        **(
            {
                "ssl_cafile": certificates.ca,
                "ssl_certfile": certificates.client_cert,
                "ssl_keyfile": certificates.client_key,
                "ssl_password": certificates.client_key_password,
            }
            if tls
            else {}
        ),
        **({"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": "p-7"} if sasl else {}),
    )
    config = consumer_config(settings, "g")

    assert config["security.protocol"] == protocol.lower()
    assert config.get("ssl.ca.location") == (str(certificates.ca) if tls else None)
    assert config.get("ssl.key.location") == (str(certificates.client_key) if tls else None)
    assert config.get("ssl.key.password") == (certificates.client_key_password if tls else None)
    assert config.get("ssl.endpoint.identification.algorithm") == ("none" if tls else None)
    assert config.get("sasl.mechanism") == ("SCRAM-SHA-512" if sasl else None)
    assert config.get("sasl.password") == ("p-7" if sasl else None)
    # librdkafka refuses an unknown or inconsistent option when the client is built (it connects later),
    # and loads the certificate and key (with its password) there.
    Consumer(config).close()


# -- the settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {"MIA_KAFKA_SASL_USERNAME": "detector"},
            "kafka.sasl_username (MIA_KAFKA_SASL_USERNAME): Value error, SASL is not used with security "
            "protocol PLAINTEXT",
        ),
        (
            {"MIA_KAFKA_SECURITY_PROTOCOL": "SSL", "MIA_KAFKA_SASL_PASSWORD": "pw-9"},
            "kafka.sasl_password (MIA_KAFKA_SASL_PASSWORD): Value error, SASL is not used with security "
            "protocol SSL",
        ),
        (
            {"MIA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MIA_KAFKA_SASL_PASSWORD": "pw-9"},
            "kafka.sasl_username (MIA_KAFKA_SASL_USERNAME): Value error, required with security protocol "
            "SASL_SSL",
        ),
        (
            {"MIA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "MIA_KAFKA_SASL_USERNAME": "detector"},
            "kafka.sasl_password (MIA_KAFKA_SASL_PASSWORD): Value error, required with security protocol "
            "SASL_PLAINTEXT",
        ),
        (
            {"MIA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MIA_KAFKA_SASL_MECHANISM": "GSSAPI"},
            "kafka.sasl_mechanism (MIA_KAFKA_SASL_MECHANISM)",
        ),
        ({"MIA_KAFKA_SSL_CAFILE": "/etc/ssl/ca.pem"}, "kafka.ssl_cafile (MIA_KAFKA_SSL_CAFILE)"),
        (
            {"MIA_KAFKA_SECURITY_PROTOCOL": "SSL", "MIA_KAFKA_SSL_KEYFILE": "/etc/ssl/key.pem"},
            "kafka.ssl_keyfile (MIA_KAFKA_SSL_KEYFILE): Value error, belongs to a client certificate",
        ),
        ({"MIA_KAFKA_CONNECT_TIMEOUT_SECONDS": "0"}, "kafka.connect_timeout_seconds"),
    ],
)
def test_inconsistent_kafka_security_settings_are_one_line_naming_the_variable(
    variables: dict[str, str], expected: str, tmp_path: Path
) -> None:
    result = mia("config", "show", env=env_for("127.0.0.1:9092", tmp_path, **variables))

    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()

    assert expected in line
    assert "pw-9" not in line


def test_kafka_security_settings_are_accepted_and_shown(tmp_path: Path) -> None:
    env = env_for(
        "127.0.0.1:9092",
        tmp_path,
        MIA_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        MIA_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        MIA_KAFKA_SASL_USERNAME="detector",
        MIA_KAFKA_SASL_PASSWORD="pw-9",
        MIA_KAFKA_SSL_CAFILE=tmp_path / "ca.pem",
        MIA_KAFKA_SSL_CERTFILE=tmp_path / "client.pem",
        MIA_KAFKA_SSL_KEYFILE=tmp_path / "client.key",
        MIA_KAFKA_SSL_PASSWORD="key-pw-9",
        MIA_KAFKA_SSL_CHECK_HOSTNAME="false",
    )
    result = mia("config", "show", env=env)

    assert result.returncode == 0, result.stderr
    kafka = orjson.loads(result.stdout)["kafka"]
    assert kafka["sasl_mechanism"] == "SCRAM-SHA-512" and kafka["ssl_check_hostname"] is False
    assert kafka["ssl_cafile"] == str(tmp_path / "ca.pem") and kafka["connect_timeout_seconds"] == 10
    assert kafka["sasl_password"] == kafka["ssl_password"] == "**********"
    assert "pw-9" not in result.stdout


def test_the_confluent_client_without_confluent_kafka_installed_is_one_line_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # what an import finds when it is absent

    with pytest.raises(ConfigError) as refused:
        load_settings(None, kafka={"client": "confluent"})

    assert "kafka.client (MIA_KAFKA_CLIENT)" in str(refused.value)
    assert "pip install 'mia-detector[confluent]'" in str(refused.value)
    assert load_settings(None, kafka={"client": "kafka-python"}).kafka.client == "kafka-python"
