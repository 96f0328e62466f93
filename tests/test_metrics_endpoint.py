"""The metrics endpoint as a security surface: real HTTP clients against the real server. Basic
authentication (401 without the right credentials, never a metric, a traceback or what was sent), TLS with
a throwaway CA made by `openssl` (plain HTTP gets no answer on the TLS port), bounded connections (garbage,
silent and held connections never stall a scrape), the settings, and a real Prometheus scraping the daemon
with basic_auth and tls_config while the daemon listens on 127.0.0.1 only."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from detector.broker import EmbeddedBroker, free_port
from detector.metrics import PREFIX, BasicAuth, Metrics, ServerLimits
from detector.service.wiring import serve_metrics, server_tls_context
from detector.settings import ConfigError, MetricsSettings, load_settings
from tests.prometheus import JOB, prometheus_binary, running_prometheus, values, wait_for
from tests.secured_broker import Certificates, make_certificates
from tests.support import make_settings, missing_tool
from tests.test_cli import cli_env, mia, start

HOST = "127.0.0.1"
USER, PASSWORD = "prometheus", "s3cret-scrape-pw"
UNAUTHORIZED = f"{PREFIX}_metrics_unauthorized_requests_total"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@contextmanager
def serving(
    metrics: Metrics,
    *,
    auth: BasicAuth | None = None,
    tls: ssl.SSLContext | None = None,
    limits: ServerLimits | None = None,
) -> Iterator[int]:
    port = free_port()
    stop = metrics.serve(HOST, port, auth=auth, tls=tls, limits=limits)
    try:
        yield port
    finally:
        stop()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- basic authentication ------------------------------------------------------------------------------------


def test_without_settings_metrics_and_health_answer_everyone() -> None:
    with serving(Metrics()) as port:
        scraped = httpx.get(f"http://{HOST}:{port}/metrics")
        assert scraped.status_code == 200 and f"{PREFIX}_build_info" in scraped.text
        assert scraped.headers["server"] == "mia-detector"
        assert httpx.get(f"http://{HOST}:{port}/healthz").text == "ok\n"
        assert httpx.get(f"http://{HOST}:{port}/").status_code == 404
        assert httpx.post(f"http://{HOST}:{port}/metrics").status_code == 405


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD[:-1]),  # a prefix of the password
        basic(USER, PASSWORD + "x"),
        basic(PASSWORD, USER),
        basic(USER, ""),
        "Basic " + base64.b64encode(f"{USER}{PASSWORD}".encode()).decode(),  # no colon
        "Basic not base64!",
        "Basic",
        "Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        basic(USER, PASSWORD).replace("Basic", "Digest"),
        (basic(USER, PASSWORD) + "\u00e9").encode("latin-1"),  # a byte beyond ASCII
    ],
    ids=lambda value: "none" if value is None else str(value)[:24],
)
def test_wrong_or_missing_credentials_get_401_and_nothing_else(
    authorization: str | bytes | None, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.DEBUG), serving(metrics, auth=BasicAuth(USER, PASSWORD)) as port:
        # Bytes, as httpx sends the header: a str value encoded as ASCII, bytes as they are.
        value = authorization.encode("ascii") if isinstance(authorization, str) else authorization
        headers = {} if value is None else {b"Authorization": value}
        refused = httpx.get(f"http://{HOST}:{port}/metrics", headers=headers)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Basic realm="mia-detector", charset="UTF-8"'
        assert refused.text == "unauthorized\n"
        assert PASSWORD not in refused.text and USER not in refused.text
        allowed = httpx.get(f"http://{HOST}:{port}/metrics", auth=(USER, PASSWORD))
        assert allowed.status_code == 200
        assert f"{UNAUTHORIZED} 1.0" in allowed.text
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err + caplog.text
    assert PASSWORD not in out + err + caplog.text


def test_the_health_check_needs_no_credentials_and_tells_nothing() -> None:
    with serving(Metrics(), auth=BasicAuth(USER, PASSWORD)) as port:
        health = httpx.get(f"http://{HOST}:{port}/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")


def test_credentials_are_compared_as_utf8() -> None:
    auth = BasicAuth("prométhée", "mot de passe:avec deux-points")
    with serving(Metrics(), auth=auth) as port:
        allowed = httpx.get(f"http://{HOST}:{port}/metrics", auth=(auth.username, auth.password))
        assert allowed.status_code == 200
    assert "mot de passe" not in repr(auth)


# -- TLS -----------------------------------------------------------------------------------------------------


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plain_http(certificates: Certificates) -> None:
    tls = server_tls_context(certificates.server_cert, certificates.server_key)
    trusted = ssl.create_default_context(cafile=str(certificates.ca))
    with serving(Metrics(), auth=BasicAuth(USER, PASSWORD), tls=tls) as port:
        url = f"https://{HOST}:{port}/metrics"
        assert httpx.get(url, auth=(USER, PASSWORD), verify=trusted).status_code == 200
        assert httpx.get(f"https://localhost:{port}/metrics", verify=trusted).status_code == 401
        other = ssl.create_default_context(cafile=str(certificates.other_ca))
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, verify=other)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            httpx.get(f"http://{HOST}:{port}/metrics", auth=(USER, PASSWORD), timeout=5)
        with socket.create_connection((HOST, port), timeout=5) as plain:
            request = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(USER, PASSWORD)}\r\n\r\n"
            plain.sendall(request.encode())
            try:
                answer = plain.recv(4096)
            except ConnectionResetError:
                answer = b""
            assert b"HTTP/" not in answer and PREFIX.encode() not in answer, "no HTTP answer on the TLS port"
        # The endpoint is none the worse for it.
        assert httpx.get(url, auth=(USER, PASSWORD), verify=trusted).status_code == 200


def test_a_certificate_that_cannot_be_loaded_is_one_line_naming_the_setting(
    certificates: Certificates, tmp_path: Path
) -> None:
    with pytest.raises(OSError, match=r"^cannot load MIA_METRICS_TLS_CERTFILE \(.*missing.pem\): "):
        server_tls_context(tmp_path / "missing.pem", None)
    with pytest.raises(OSError, match="with MIA_METRICS_TLS_KEYFILE") as error:
        server_tls_context(certificates.server_cert, certificates.client_key)  # another certificate's key
    assert "\n" not in str(error.value)


def test_an_address_in_use_is_one_line_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        settings = MetricsSettings(addr=f"{HOST}:{taken.getsockname()[1]}")
        with pytest.raises(
            OSError, match=r"^cannot serve metrics on 127\.0\.0\.1:\d+ \(MIA_METRICS_ADDR\): "
        ):
            serve_metrics(Metrics(), settings)


def test_credentials_without_tls_beyond_loopback_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    settings = MetricsSettings(addr=f"0.0.0.0:{port}", username=USER, password=PASSWORD)
    with caplog.at_level(logging.INFO):
        serve_metrics(Metrics(), settings)()
    assert "cross the network in the clear" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        serve_metrics(Metrics(), MetricsSettings(addr=f"{HOST}:{port}", username=USER, password=PASSWORD))()
    assert "in the clear" not in caplog.text and "(basic authentication)" in caplog.text


# -- bounded and robust --------------------------------------------------------------------------------------


def scrape_seconds(url: str, **options: object) -> float:
    started = time.monotonic()
    response = httpx.get(url, timeout=5, **options)  # type: ignore[arg-type]
    assert response.status_code == 200
    return time.monotonic() - started


@pytest.mark.parametrize("with_tls", [False, True], ids=["http", "https"])
def test_silent_garbage_and_held_connections_never_stall_a_scrape(
    with_tls: bool, certificates: Certificates, capfd: pytest.CaptureFixture[str]
) -> None:
    tls = server_tls_context(certificates.server_cert, certificates.server_key) if with_tls else None
    scheme = "https" if with_tls else "http"
    verify: object = ssl.create_default_context(cafile=str(certificates.ca)) if with_tls else True
    with serving(Metrics(), auth=BasicAuth(USER, PASSWORD), tls=tls) as port:
        url = f"{scheme}://{HOST}:{port}/metrics"
        held = []
        # Silent, half a request, half a TLS ClientHello.
        for opening in (b"", b"GET /metr", b"\x16\x03\x01\x02\x00\x01"):
            connection = socket.create_connection((HOST, port))
            connection.sendall(opening)
            held.append(connection)
        with socket.create_connection((HOST, port), timeout=5) as garbage:
            garbage.sendall(b"\x00\xff\xfe garbage \r\n\r\n" * 100)
            try:
                answer = garbage.recv(4096)
            except ConnectionResetError:
                answer = b""
            # Plain HTTP: a fixed "400 Bad Request"; TLS: the handshake fails and the connection closes.
            assert answer == b"" or answer.endswith(b"400 Bad Request\n")
            assert b"garbage" not in answer
        assert scrape_seconds(url, auth=(USER, PASSWORD), verify=verify) < 2.0
        for connection in held:
            connection.close()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_connections_are_bounded_in_number_and_time() -> None:
    limits = ServerLimits(max_connections=4, io_timeout_seconds=5.0, connection_seconds=1.0)
    with serving(Metrics(), limits=limits) as port:
        url = f"http://{HOST}:{port}/metrics"
        held = [socket.create_connection((HOST, port)) for _ in range(4)]
        time.sleep(0.2)  # accepted, each on its thread
        # Every slot is taken: the next client is closed at once, not queued behind the held ones.
        started = time.monotonic()
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            httpx.get(url, timeout=5)
        assert time.monotonic() - started < 1.0
        # Held past their deadline, they are shut down: the endpoint answers again.
        for connection in held:
            connection.settimeout(5)
            assert connection.recv(100) == b""
        assert scrape_seconds(url) < 2.0
        for connection in held:
            connection.close()


def test_a_failing_collector_fails_the_scrape_not_the_endpoint(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    metrics = Metrics()

    class Broken:
        def collect(self) -> Iterator[object]:
            raise RuntimeError("collector broke")

    metrics.registry.register(Broken())  # type: ignore[arg-type]
    with serving(metrics) as port:
        failed = httpx.get(f"http://{HOST}:{port}/metrics")
        assert (failed.status_code, failed.text) == (500, "metrics not collected\n")
        assert httpx.get(f"http://{HOST}:{port}/healthz").status_code == 200
    assert "collector broke" in caplog.text
    assert "Traceback" not in "".join(capfd.readouterr())


# -- settings ------------------------------------------------------------------------------------------------


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Callable[..., object]:
    for name in list(os.environ):
        if name.startswith("MIA_"):
            monkeypatch.delenv(name)

    def load(**variables: str) -> object:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return load_settings()

    return load


def test_the_default_listens_on_loopback_without_credentials(environment: Callable[..., object]) -> None:
    settings = load_settings()
    assert settings.metrics.host_port == ("127.0.0.1", 9108)
    assert settings.metrics.username is None and settings.metrics.tls_certfile is None


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"MIA_METRICS_USERNAME": USER}, "needs both MIA_METRICS_USERNAME and MIA_METRICS_PASSWORD"),
        ({"MIA_METRICS_PASSWORD": PASSWORD}, "needs both MIA_METRICS_USERNAME and MIA_METRICS_PASSWORD"),
        ({"MIA_METRICS_USERNAME": "a:b", "MIA_METRICS_PASSWORD": PASSWORD}, "cannot contain ':'"),
        ({"MIA_METRICS_TLS_KEYFILE": "/etc/key.pem"}, "set MIA_METRICS_TLS_CERTFILE too"),
    ],
)
def test_contradicting_settings_are_one_line(
    environment: Callable[..., object], variables: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        environment(**variables)
    assert PASSWORD not in str(error.value)


def test_the_password_is_a_secret_read_from_a_file(
    environment: Callable[..., object], tmp_path: Path
) -> None:
    secret = tmp_path / "metrics-password"
    secret.write_text(PASSWORD + "\n")
    settings = environment(
        MIA_METRICS_USERNAME=USER, MIA_METRICS_PASSWORD_FILE=str(secret), MIA_METRICS_TLS_CERTFILE=""
    )
    assert settings.metrics.password.get_secret_value() == PASSWORD  # type: ignore[attr-defined]
    assert settings.metrics.tls_certfile is None  # type: ignore[attr-defined]
    assert PASSWORD not in json.dumps(settings.masked())  # type: ignore[attr-defined]


# -- the daemon, scraped by a real Prometheus ----------------------------------------------------------------


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket process `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, words), int(port, 16)))
    return found


@pytest.mark.slow
@pytest.mark.kafka
def test_prometheus_scrapes_the_daemon_over_tls_with_basic_auth(
    broker: EmbeddedBroker, sqlite_url: str, certificates: Certificates, tmp_path: Path
) -> None:
    if prometheus_binary() is None:
        missing_tool("prometheus")
    port = free_port()
    settings = make_settings(sqlite_url, broker)
    password_file = tmp_path / "metrics-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    env = cli_env(
        MIA_KAFKA_BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        MIA_KAFKA_TOPICS=json.dumps(settings.kafka.topics),
        MIA_KAFKA_GROUP_ID=settings.kafka.group_id,
        MIA_KAFKA_SESSION_TIMEOUT_MS="6000",
        MIA_DATABASE_URL=sqlite_url,
        MIA_METRICS_ADDR=f"127.0.0.1:{port}",
        MIA_METRICS_USERNAME=USER,
        MIA_METRICS_PASSWORD_FILE=str(password_file),
        MIA_METRICS_TLS_CERTFILE=str(certificates.server_cert),
        MIA_METRICS_TLS_KEYFILE=str(certificates.server_key),
    )
    log = tmp_path / "daemon.log"
    tls_config = {"ca_file": str(certificates.ca)}
    scrape = {
        "scheme": "https",
        "tls_config": tls_config,
        "basic_auth": {"username": USER, "password_file": str(password_file)},
    }
    # The same target scraped with a wrong password, and over plain HTTP: both must fail.
    wrong = {
        "job_name": "wrong-password",
        "scheme": "https",
        "tls_config": tls_config,
        "basic_auth": {"username": USER, "password": "not-it"},
        "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
    }
    plain = {"job_name": "plain-http", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
    daemon = start("run", env=env, log=log)
    try:
        with running_prometheus(tmp_path, [f"127.0.0.1:{port}"], scrape=scrape, jobs=[wrong, plain]) as url:
            try:
                wait_for(url, f'up{{job="{JOB}"}}', lambda r: [s["value"][1] for s in r] == ["1"], 60.0)
            except TimeoutError:
                raise AssertionError(
                    f"daemon exit {daemon.poll()}; log:\n{log.read_text()[-3000:]}"
                ) from None
            assert values(url, f'{PREFIX}_storage_available{{job="{JOB}"}}') == [1.0]
            wait_for(url, 'up{job=~"wrong-password|plain-http"}', lambda r: len(r) == 2, 30.0)
            assert values(url, 'up{job=~"wrong-password|plain-http"}') == [0.0, 0.0]
            refused = wait_for(
                url, f'{UNAUTHORIZED}{{job="{JOB}"}}', lambda r: bool(r) and float(r[0]["value"][1]) > 0, 30.0
            )
            assert refused
            # The daemon listens on nothing but its metrics address.
            assert listening_addresses(daemon.pid) == {("127.0.0.1", port)}
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert PASSWORD not in text and "Traceback" not in text
    assert f"metrics at https://127.0.0.1:{port}/metrics (basic authentication)" in text


def test_the_listener_check_sees_a_listener(tmp_path: Path) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert ("127.0.0.1", listening.getsockname()[1]) in listening_addresses(os.getpid())
    with socket.socket(socket.AF_INET6) as listening6:
        listening6.bind(("::1", 0))
        listening6.listen()
        assert ("::1", listening6.getsockname()[1]) in listening_addresses(os.getpid())


def test_a_daemon_with_a_bad_certificate_stops_in_one_line(tmp_path: Path) -> None:
    env = cli_env(
        MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'mia.db'}",
        MIA_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
        MIA_METRICS_ADDR=f"127.0.0.1:{free_port()}",
        MIA_METRICS_TLS_CERTFILE=str(tmp_path / "missing.pem"),
        MIA_LOG_LEVEL="WARNING",
    )
    result = mia("run", env=env)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("mia-detector: error: cannot load MIA_METRICS_TLS_CERTFILE (")
