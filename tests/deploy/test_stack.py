"""The production deployment stack (Dockerfile, deploy/docker-compose.yml, deploy/kubernetes,
deploy/systemd), validated with the real tools where this machine has them and cross-checked against the
code: every environment variable set anywhere is loaded through `load_settings`, every port, name, path and
uid that two files share is compared.

What no tool here can do — build the image, start the containers, apply the manifests to a cluster, boot
the unit under systemd — is left to a machine with a Docker engine, a cluster or systemd as PID 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from detector.alerts.sinks.alertmanager import alert_name
from detector.broker import free_port
from detector.domain import AlertKind
from detector.kafka import message_limit
from detector.metrics import Metrics
from detector.settings import Settings, load_settings
from tests.deploy import stack
from tests.deploy.stack import (
    ALERTMANAGER,
    COMPOSE,
    DASHBOARDS,
    DEPLOY,
    DOCKERFILE,
    ENV_EXAMPLE,
    GRAFANA_DASHBOARDS,
    GRAFANA_DATASOURCES,
    INIT_ENV,
    KUBERNETES,
    POSTGRES_INIT,
    PROMETHEUS_COMPOSE,
    ROOT,
    RULES,
    SYSUSERS,
    UNIT,
    UNIT_ENV,
    load_yaml,
    mia_variables,
    parse_env_file,
    require_module,
    tool,
)

DAEMON = "mia-detector"  # the compose service, the Kubernetes Deployment and Service, the Prometheus job
PLACEHOLDER = "example-value"  # for the optional settings an example leaves empty
# ... but for those whose value has a form of its own.
PLACEHOLDERS = {"MIA_TRAINING_INDEX_KEY": "00" * 32}


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, **kwargs)


@pytest.fixture
def settings_from(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`settings_from(env)`: the settings the daemon would run with in exactly the environment `env`
    (no other MIA_* variable). Fails on a name no setting has, on an empty value (an empty receiver address
    configures a receiver that cannot deliver), and on any value `load_settings` rejects."""

    def load(env: Mapping[str, str]) -> Settings:
        names = stack.setting_names()
        variables = mia_variables(env)
        assert set(variables) - names == set(), "names that are no setting"
        assert [name for name, value in variables.items() if value == ""] == [], "empty values"
        for name in list(os.environ):
            if name.startswith("MIA_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return load_settings()

    return load


def with_placeholders(env: Mapping[str, str]) -> dict[str, str]:
    return {name: value or PLACEHOLDERS.get(name, PLACEHOLDER) for name, value in env.items()}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- the image -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[Any]:
    """The Dockerfile's instructions, as BuildKit's own parser reads them."""
    parser = require_module("dockerfile")
    return list(parser.parse_file(str(DOCKERFILE)))


def stages(instructions: list[Any]) -> list[list[Any]]:
    result: list[list[Any]] = []
    for instruction in instructions:
        if instruction.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def image_arguments(instructions: list[Any]) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults."""
    arguments: dict[str, str] = {}
    for instruction in instructions:
        if instruction.cmd == "FROM":
            break
        if instruction.cmd == "ARG":
            name, _, default = instruction.value[0].partition("=")
            arguments[name] = default
    return arguments


def final_stage(instructions: list[Any]) -> dict[str, list[Any]]:
    by_command: dict[str, list[Any]] = {}
    for instruction in stages(instructions)[-1]:
        by_command.setdefault(instruction.cmd, []).append(instruction)
    return by_command


def image_environment(instructions: list[Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage(instructions).get("ENV", []):
        values = instruction.value
        env.update(zip(values[::2], values[1::2], strict=True))
    return env


def test_dockerfile_passes_hadolint() -> None:
    result = run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_built_in_two_stages_on_python_slim_and_runs_the_daemon_unprivileged(
    dockerfile: list[Any],
) -> None:
    arguments = image_arguments(dockerfile)
    bases = [
        stack.interpolate(instruction.value[0], arguments)
        for instruction in dockerfile
        if instruction.cmd == "FROM"
    ]
    assert len(bases) >= 2, "a build stage and a runtime stage"
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", base) for base in bases), bases
    final = final_stage(dockerfile)
    copies = final.get("COPY", [])
    assert copies and all(any(flag.startswith("--from=") for flag in copy.flags) for copy in copies), (
        "the runtime stage takes only the built environment, no sources"
    )
    user = final["USER"][-1].value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER must be a numeric non-root uid, not {user!r}"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    entrypoint, command = final["ENTRYPOINT"][-1], final["CMD"][-1]
    assert entrypoint.json and list(entrypoint.value) == ["mia-detector"]
    assert command.json and list(command.value) == ["run"]
    assert final["STOPSIGNAL"][-1].value[0] == "SIGTERM"


def test_the_image_environment_is_a_valid_configuration_listening_beyond_localhost(
    dockerfile: list[Any], settings_from: Any
) -> None:
    env = image_environment(dockerfile)
    settings = settings_from(mia_variables(env))
    assert settings.log.format == "json"
    assert settings.metrics.host_port is not None
    host, port = settings.metrics.host_port
    assert host == "0.0.0.0"
    exposed = [
        int(port.split("/")[0])
        for instruction in final_stage(dockerfile)["EXPOSE"]
        for port in instruction.value
    ]
    assert exposed == [port]


def healthcheck_command(dockerfile: list[Any]) -> list[str]:
    healthcheck = final_stage(dockerfile)["HEALTHCHECK"][-1]
    assert healthcheck.json and healthcheck.value[0] == "CMD", "exec form: the slim image has no curl"
    command = list(healthcheck.value[1:])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_the_healthcheck_passes_while_metrics_are_served_and_fails_when_they_are_not(
    dockerfile: list[Any],
) -> None:
    command = healthcheck_command(dockerfile)
    port = free_port()
    stop = Metrics().serve("127.0.0.1", port)
    env = {**os.environ, **image_environment(dockerfile), "MIA_METRICS_ADDR": f"0.0.0.0:{port}"}
    try:
        healthy = run(command, env=env)
    finally:
        stop()
    unhealthy = run(command, env=env)
    assert healthy.returncode == 0, healthy.stderr
    assert unhealthy.returncode != 0
    assert "Connection refused" in unhealthy.stderr


def test_the_healthcheck_needs_no_credentials_and_speaks_tls_when_metrics_do(
    dockerfile: list[Any], tmp_path: Path
) -> None:
    from detector.metrics import BasicAuth
    from detector.service.wiring import server_tls_context
    from tests.secured_broker import make_certificates

    certificates = make_certificates(tmp_path / "certificates")
    command = healthcheck_command(dockerfile)
    port = free_port()
    env = {
        **os.environ,
        **image_environment(dockerfile),
        "MIA_METRICS_ADDR": f"0.0.0.0:{port}",
        "MIA_METRICS_TLS_CERTFILE": str(certificates.server_cert),
    }
    tls = server_tls_context(certificates.server_cert, certificates.server_key)
    stop = Metrics().serve("127.0.0.1", port, auth=BasicAuth("prometheus", "pw"), tls=tls)
    try:
        healthy = run(command, env=env)
        plain = run(command, env={**env, "MIA_METRICS_TLS_CERTFILE": ""})  # plain HTTP to the TLS port
    finally:
        stop()
    assert healthy.returncode == 0, healthy.stderr
    assert plain.returncode != 0


def test_the_build_context_holds_what_the_build_copies_and_nothing_secret(dockerfile: list[Any]) -> None:
    context = stack.build_context()
    for instruction in dockerfile:
        if instruction.cmd in ("COPY", "ADD") and not any(f.startswith("--from=") for f in instruction.flags):
            for source in instruction.value[:-1]:
                prefix = source.rstrip("/")
                assert any(path == prefix or path.startswith(prefix + "/") for path in context), source
    assert "detector/storage/migrations/env.py" in context
    leaked = [
        path
        for path in context
        if path.startswith((".git/", ".venv/", "var/", "deploy/", "tests/"))
        or path.endswith((".env", ".db", ".pyc"))
    ]
    assert leaked == []


@pytest.mark.slow
def test_the_wheel_built_from_the_build_context_carries_migrations_rules_and_the_command(
    tmp_path: Path,
) -> None:
    """What the build stage does, on exactly the files Docker would send (needs PyPI for the build
    backend, as `docker build` does)."""
    source = tmp_path / "context"
    for relative in stack.build_context():
        target = source / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    result = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(tmp_path / "dist"),
            ".",
        ],
        cwd=source,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("mia_detector-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("detector/storage/migrations/versions/") for name in names)
    assert "detector/scoring/rules.toml" in names
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "mia-detector = detector.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- Docker Compose --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The `.env` an operator gets from `deploy/init-env.sh`."""
    target = tmp_path_factory.mktemp("compose") / ".env"
    result = run(["sh", str(INIT_ENV), str(target)])
    assert result.returncode == 0, result.stderr
    return parse_env_file(target.read_text())


@pytest.fixture(scope="module")
def compose(compose_env: dict[str, str]) -> dict[str, Any]:
    return stack.compose_with(compose_env)


def daemon_environment(compose: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    return stack.service_environment(compose["services"][DAEMON], env)


def test_init_env_writes_a_private_env_file_with_fresh_random_secrets(tmp_path: Path) -> None:
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    for target in (first, second):
        result = run(["sh", str(INIT_ENV), str(target)])
        assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    a, b = parse_env_file(first.read_text()), parse_env_file(second.read_text())
    example = parse_env_file(ENV_EXAMPLE.read_text())
    secrets = [name for name, value in example.items() if value == "CHANGE_ME"]
    assert {"POSTGRES_PASSWORD", "GRAFANA_DB_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= set(secrets)
    for name in secrets:
        assert re.fullmatch(r"[0-9a-f]{32}", a[name]), name
        assert a[name] != b[name]
    assert len({a[name] for name in secrets}) == len(secrets), "one secret for each"
    assert {name: value for name, value in a.items() if name not in secrets} == {
        name: value for name, value in example.items() if name not in secrets
    }
    before = first.read_text()
    assert run(["sh", str(INIT_ENV), str(first)]).returncode == 0
    assert first.read_text() == before, "an existing .env is never overwritten"


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    require_module("check_jsonschema")
    jsonschema = require_module("jsonschema")
    from importlib.resources import files

    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda error: list(error.path)
    )
    assert [f"{list(error.path)}: {error.message}" for error in errors] == []


def test_the_stack_does_not_start_without_its_secrets(compose_env: dict[str, str]) -> None:
    for secret in ("POSTGRES_PASSWORD", "GRAFANA_DB_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        env = {name: value for name, value in compose_env.items() if name != secret}
        with pytest.raises(stack.InterpolationError, match=secret):
            stack.compose_with(env)
    assert "CHANGE_ME" not in COMPOSE.read_text()
    hard_coded = [
        (service, name)
        for service, definition in load_yaml(COMPOSE)["services"].items()
        for name, value in (definition.get("environment") or {}).items()
        if re.search("PASSWORD|SECRET|TOKEN|ROUTING_KEY|WEBHOOK_URL", name)
        and value is not None
        and not re.fullmatch(r"\$\{\w+(:?[?-][^}]*)?\}", str(value))
    ]
    assert hard_coded == [], "secrets must come from deploy/.env"


def docker_compose_v2_available() -> bool:
    docker = shutil.which("docker")
    return docker is not None and run([docker, "compose", "version"]).returncode == 0


def test_docker_compose_config_accepts_the_stack(tmp_path: Path, compose_env: dict[str, str]) -> None:
    """The real Compose (v2 plugin) resolves and validates the file without an engine."""
    if not docker_compose_v2_available():
        pytest.skip("the Docker Compose v2 plugin is not installed (no package registry here ships it)")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in compose_env.items()))
    result = run(["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


def test_docker_compose_v1_resolves_the_stack_as_these_tests_do(
    tmp_path: Path, compose: dict[str, Any], compose_env: dict[str, str]
) -> None:
    """docker-compose 1.29 (Debian) parses, validates and interpolates the file: its result for the
    daemon's environment must be what these tests load into the settings. It predates the top-level
    `name`, which is removed for it (the project name then comes from the directory)."""
    binary = tool("docker-compose")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in compose_env.items()))
    copy = DEPLOY / f".compose-v1-{uuid.uuid4().hex[:8]}.yml"  # beside the original: relative paths hold
    copy.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text()))
    try:
        result = run([binary, "--env-file", str(env_file), "-f", str(copy), "config"], cwd=tmp_path)
    finally:
        copy.unlink()
    assert result.returncode == 0, result.stderr
    resolved = load_yaml_text(result.stdout)
    theirs = {
        name: str(value)
        for name, value in resolved["services"][DAEMON]["environment"].items()
        if value is not None
    }
    assert theirs == daemon_environment(compose, compose_env)
    assert set(resolved["services"]) == set(compose["services"])


def load_yaml_text(text: str) -> Any:
    yaml = require_module("yaml")
    return yaml.safe_load(text)


def test_the_daemon_environment_is_a_valid_configuration(
    compose: dict[str, Any], compose_env: dict[str, str], settings_from: Any
) -> None:
    env = daemon_environment(compose, compose_env)
    settings = settings_from(env)
    assert settings.database.url.get_secret_value().startswith("postgresql://")
    assert settings.alertmanager.url is not None
    assert settings.log.format == "json"
    optional = [name for name, value in compose["services"][DAEMON]["environment"].items() if value is None]
    assert optional, "optional receivers are passed through without a value"
    assert not set(optional) & set(env), "an optional setting the .env leaves out stays unset"


def test_every_optional_setting_in_the_env_example_is_a_valid_configuration(
    compose: dict[str, Any], compose_env: dict[str, str], settings_from: Any
) -> None:
    """What an operator gets by uncommenting every optional line of .env.example."""
    documented = with_placeholders(parse_env_file(ENV_EXAMPLE.read_text(), commented=True))
    env = {**compose_env, **documented}
    daemon = daemon_environment(stack.compose_with(env), env)
    assert set(mia_variables(documented)) <= set(daemon), "documented settings the daemon is not given"
    settings = settings_from(daemon)
    assert settings.slack.webhook_url is not None and settings.grafana.token is not None


def test_the_daemon_is_wired_to_the_services_of_the_stack(
    compose: dict[str, Any], compose_env: dict[str, str], settings_from: Any
) -> None:
    services = compose["services"]
    daemon = services[DAEMON]
    settings = settings_from(daemon_environment(compose, compose_env))
    metrics_port = port_of(settings.metrics.addr)
    # Metrics: the port the daemon binds, the one its health check fetches, the published one.
    assert settings.metrics.host_port == ("0.0.0.0", metrics_port)
    assert f"127.0.0.1:{metrics_port}/metrics" in " ".join(daemon["healthcheck"]["test"])
    assert [port.rpartition(":")[2] for port in daemon["ports"]] == [str(metrics_port)]
    # Kafka: the service and its listener for containers; the topic kafka-init creates.
    (bootstrap,) = settings.kafka.bootstrap_servers.split(",")
    host, _, port = bootstrap.partition(":")
    kafka = services["kafka"]["environment"]
    assert host in services and f"INTERNAL://{bootstrap}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert f"INTERNAL://:{port}" in kafka["KAFKA_LISTENERS"]
    topic = services["kafka-init"]["environment"]["TOPIC"]
    assert settings.kafka.topics == [topic]
    assert settings.kafka.dead_letter_topic == f"{topic}-dlq"
    assert '"$${TOPIC}-dlq"' in COMPOSE.read_text(), "kafka-init creates the dead-letter topic"
    # Its topics take the largest record the daemon reads, as `mia-detector produce` creates them.
    limit = message_limit(settings.ingest.max_record_bytes)
    assert f"--config max.message.bytes={limit}" in COMPOSE.read_text()
    # PostgreSQL: the service, its database and owner; the password through libpq.
    database = urlsplit(settings.database.url.get_secret_value())
    postgres = services["postgres"]["environment"]
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert database.username == postgres["POSTGRES_USER"]
    assert database.path == "/" + postgres["POSTGRES_DB"]
    assert daemon["environment"]["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
    # Alertmanager and Grafana.
    assert settings.alertmanager.url is not None
    alertmanager = urlsplit(settings.alertmanager.url.get_secret_value())
    assert alertmanager.hostname in services and alertmanager.port == 9093
    assert settings.grafana.url is not None and urlsplit(settings.grafana.url).hostname in services
    # Starts after what it needs.
    assert daemon["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert daemon["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    # Built from the repository's Dockerfile.
    build = daemon["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    assert int(daemon["stop_grace_period"].rstrip("s")) >= 30


def test_every_service_is_pinned_health_checked_and_published_on_localhost_only(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        if "image" in service and "build" not in service:
            assert re.search(r":[\w.-]+$", service["image"]) and not service["image"].endswith(":latest"), (
                name
            )
        oneshot = service.get("restart") == "no"
        assert oneshot or "healthcheck" in service, f"{name} has no health check"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def mounted(service: dict[str, Any], container_path: str) -> Path | None:
    """The host path (relative to the compose file) mounted at `container_path`, or None."""
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        target = rest.split(":")[0]
        if target == container_path and source.startswith("."):
            return COMPOSE.parent.joinpath(source).resolve()
    return None


def test_prometheus_of_the_stack_has_a_valid_configuration() -> None:
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_prometheus_of_the_stack_scrapes_the_daemon_loads_the_rules_and_alerts_to_alertmanager(
    compose: dict[str, Any], compose_env: dict[str, str], settings_from: Any
) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = config_flag.partition("=")[2]
    assert mounted(prometheus, config_path) == PROMETHEUS_COMPOSE
    config = load_yaml(PROMETHEUS_COMPOSE)
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        directory, name = in_container.rsplit("/", 1)
        host_directory = mounted(prometheus, directory)
        assert host_directory is not None and (host_directory / name).resolve() == RULES, rule_file
    settings = settings_from(daemon_environment(compose, compose_env))
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == DAEMON]
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == [f"{DAEMON}:{port_of(settings.metrics.addr)}"]
    alertmanagers = [
        target
        for manager in config["alerting"]["alertmanagers"]
        for group in manager["static_configs"]
        for target in group["targets"]
    ]
    assert settings.alertmanager.url is not None
    assert alertmanagers == [urlsplit(settings.alertmanager.url.get_secret_value()).netloc]


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return run([tool("amtool"), *args])


def test_alertmanager_of_the_stack_has_a_valid_configuration(compose: dict[str, Any]) -> None:
    result = amtool("check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr
    alertmanager = compose["services"]["alertmanager"]
    config_flag = next(arg for arg in alertmanager["command"] if arg.startswith("--config.file="))
    assert mounted(alertmanager, config_flag.partition("=")[2]) == ALERTMANAGER


def routed_to(labels: Mapping[str, str]) -> str:
    result = amtool(
        "config", "routes", "test", f"--config.file={ALERTMANAGER}", *(f"{k}={v}" for k, v in labels.items())
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_attacks_go_to_security_and_the_detectors_health_to_operations() -> None:
    for kind in AlertKind:
        labels = {
            "alertname": alert_name(kind.value),
            "severity": "high",
            "model": "credit-risk",
            "kind": kind.value,
            "client": "key_8f2c",
            "alert_id": "7",
            "service": "mia-detector",
        }
        assert routed_to(labels) == "security", kind
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            labels = {"alertname": rule["alert"], "job": DAEMON, "instance": "a:9108", **rule["labels"]}
            assert routed_to(labels) == "operations", rule["alert"]


@pytest.mark.postgres
def test_the_postgres_init_script_makes_a_role_that_can_read_the_detectors_tables_and_nothing_more(
    tmp_path: Path,
) -> None:
    """The init script run as the postgres image runs it, against the PostgreSQL of the tests; then the
    detector's migrations as the owner; then Grafana's role reads and cannot write."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from detector.storage import create_engine_for
    from detector.storage.database import upgrade
    from tests.support import POSTGRES_ADMIN_URL

    psql = tool("psql")
    admin_url = make_url(POSTGRES_ADMIN_URL)
    suffix = uuid.uuid4().hex[:10]
    owner, reader, database = f"mia_owner_{suffix}", f"mia_reader_{suffix}", f"mia_deploy_{suffix}"
    password = uuid.uuid4().hex
    admin = create_engine_for(POSTGRES_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            # The postgres image makes POSTGRES_USER a superuser.
            connection.exec_driver_sql(f"CREATE ROLE \"{owner}\" SUPERUSER LOGIN PASSWORD '{password}'")
            connection.exec_driver_sql(f'CREATE DATABASE "{database}" OWNER "{owner}"')
        env = {
            **os.environ,
            "PATH": f"{Path(psql).parent}:{os.environ.get('PATH', '')}",
            "PGHOST": admin_url.host or "127.0.0.1",
            "PGPORT": str(admin_url.port or 5432),
            "PGPASSWORD": password,
            "POSTGRES_USER": owner,
            "POSTGRES_DB": database,
            "GRAFANA_DB_USER": reader,
            "GRAFANA_DB_PASSWORD": password,
        }
        result = run(["sh", str(POSTGRES_INIT)], env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        host = f"{admin_url.host or '127.0.0.1'}:{admin_url.port or 5432}"
        owner_engine = create_engine_for(f"postgresql://{owner}:{password}@{host}/{database}")
        upgrade(owner_engine)  # the detector's tables, created after the script, as in the stack
        owner_engine.dispose()
        reader_engine = create_engine_for(f"postgresql://{reader}:{password}@{host}/{database}")
        try:
            with reader_engine.connect() as connection:
                assert connection.execute(text("SELECT count(*) FROM alerts")).scalar() == 0
                assert connection.execute(text("SELECT count(*) FROM sessions")).scalar() == 0
                assert connection.execute(text("SHOW default_transaction_read_only")).scalar() == "on"
            with reader_engine.connect() as connection, pytest.raises(DBAPIError):
                connection.execute(text("DELETE FROM alerts"))
            with reader_engine.connect() as connection, pytest.raises(DBAPIError):
                connection.execute(text("CREATE TABLE grafana_was_here (id int)"))
        finally:
            reader_engine.dispose()
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{reader}"')
            connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{owner}"')
        admin.dispose()


# -- Grafana ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasources() -> list[dict[str, Any]]:
    sources: list[dict[str, Any]] = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    return sources


def dashboards() -> dict[str, dict[str, Any]]:
    found = {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}
    if not found:
        pytest.skip("dashboards/ holds no dashboard yet")
    return found


def test_grafana_loads_the_repositorys_dashboards_and_its_provisioning(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert mounted(grafana, "/etc/grafana/provisioning") == GRAFANA_DATASOURCES.parents[1]
    (provider,) = load_yaml(GRAFANA_DASHBOARDS)["providers"]
    assert provider["type"] == "file"
    assert mounted(grafana, provider["options"]["path"]) == DASHBOARDS
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_grafanas_data_sources_point_at_the_stack_with_variables_grafana_is_given(
    compose: dict[str, Any], compose_env: dict[str, str], datasources: list[dict[str, Any]]
) -> None:
    services = compose["services"]
    grafana_env = stack.service_environment(services["grafana"], compose_env)
    referenced = set(re.findall(r"\$\{(\w+)\}", GRAFANA_DATASOURCES.read_text()))
    assert referenced and referenced <= set(grafana_env), "variables Grafana cannot expand"
    assert len({source["uid"] for source in datasources}) == len(datasources)
    assert len({source["name"] for source in datasources}) == len(datasources)
    by_type = {source["type"]: source for source in datasources}
    prometheus = urlsplit(by_type["prometheus"]["url"])
    assert prometheus.hostname == "prometheus" and prometheus.port == 9090
    postgres = by_type["grafana-postgresql-datasource"]
    assert postgres["url"] == "postgres:5432"
    assert postgres["user"] == "${GRAFANA_DB_USER}"
    assert grafana_env["GRAFANA_DB_USER"] == services["postgres"]["environment"]["GRAFANA_DB_USER"]
    assert grafana_env["GRAFANA_DB_PASSWORD"] == services["postgres"]["environment"]["GRAFANA_DB_PASSWORD"]
    assert grafana_env["POSTGRES_DB"] == services["postgres"]["environment"]["POSTGRES_DB"]


def datasource_references(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        if "datasource" in node:
            yield node["datasource"]
        for value in node.values():
            yield from datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_references(item)


def test_the_dashboards_find_the_provisioned_data_sources(datasources: list[dict[str, Any]]) -> None:
    """Each dashboard's data-source variables (`prometheus`, `postgres`) list the data sources of one type:
    a data source of that type must be provisioned; panels refer to them through those variables or by a
    provisioned uid."""
    types = {source["type"] for source in datasources}
    uids = {source["uid"] for source in datasources}
    for name, dashboard in dashboards().items():
        variables = {
            variable["name"]: variable
            for variable in dashboard.get("templating", {}).get("list", [])
            if variable.get("type") == "datasource"
        }
        assert set(variables) <= {"prometheus", "postgres"}, name
        for variable in variables.values():
            assert variable["query"] in types, (name, variable["name"], variable["query"])
            current = (variable.get("current") or {}).get("value")
            assert current in (None, "", *uids), (name, variable["name"], current)
        for reference in datasource_references(dashboard):
            uid = reference.get("uid") if isinstance(reference, dict) else reference
            if uid is None or str(uid).startswith("$") or uid in ("-- Grafana --", "grafana"):
                if isinstance(uid, str) and uid.startswith("$"):
                    assert uid.strip("${}") in variables, (name, uid)
                continue
            assert uid in uids, (name, uid)


def test_the_provisioned_data_sources_are_the_ones_dashboards_push_creates(
    datasources: list[dict[str, Any]],
) -> None:
    push = pytest.importorskip("detector.dashboards.push")
    by_uid = {source["uid"]: source for source in datasources}
    assert by_uid[push.PROMETHEUS_UID]["name"] == push.PROMETHEUS_NAME
    assert by_uid[push.POSTGRES_UID]["name"] == push.POSTGRES_NAME
    assert load_yaml(GRAFANA_DASHBOARDS)["providers"][0]["folderUid"] == push.DEFAULT_FOLDER_UID


def dashboard_urls(compose: dict[str, Any], compose_env: dict[str, str]) -> dict[str, str]:
    configmap = next(doc for doc in kubernetes_sources() if doc["kind"] == "ConfigMap")
    return {
        "compose": daemon_environment(compose, compose_env)["MIA_DASHBOARD_URL"],
        "kubernetes": configmap["data"]["MIA_DASHBOARD_URL"],
        "systemd": parse_env_file(UNIT_ENV.read_text())["MIA_DASHBOARD_URL"],
    }


def test_alert_links_open_the_client_dashboard_with_its_model_and_client_variables(
    compose: dict[str, Any], compose_env: dict[str, str]
) -> None:
    by_uid = {dashboard.get("uid"): dashboard for dashboard in dashboards().values()}
    for where, url in dashboard_urls(compose, compose_env).items():
        match = re.search(r"/d/([^/?]+)", urlsplit(url).path)
        assert match is not None, where
        dashboard = by_uid.get(match[1])
        assert dashboard is not None, f"{where}: no dashboard with uid {match[1]}"
        variables = {variable["name"] for variable in dashboard["templating"]["list"]}
        assert {"model", "client"} <= variables, where


# -- Kubernetes ------------------------------------------------------------------------------------------


def kubernetes_sources() -> list[dict[str, Any]]:
    """The resources the kustomization lists, as written (without kustomize's namespace and labels)."""
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    documents: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        documents.extend(stack.load_yaml_documents((KUBERNETES / resource).read_text()))
    return documents


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/kubernetes` when kubectl is here; the listed files otherwise."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return kubernetes_sources()
    result = run([kubectl, "kustomize", str(KUBERNETES)])
    assert result.returncode == 0, result.stderr
    return stack.load_yaml_documents(result.stdout)


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in manifests if doc["kind"] == kind]
    return found


def test_kustomize_renders_every_listed_resource_into_the_namespace() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it comes from Kubernetes' own apt repository, not Debian's)")
    result = run([kubectl, "kustomize", str(KUBERNETES)])
    assert result.returncode == 0, result.stderr
    rendered = stack.load_yaml_documents(result.stdout)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in kubernetes_sources()
    )
    namespace = load_yaml(KUBERNETES / "kustomization.yaml")["namespace"]
    for document in rendered:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace, document["kind"]
    image = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    (override,) = load_yaml(KUBERNETES / "kustomization.yaml")["images"]
    assert image == f"{override['newName']}:{override['newTag']}"


def test_the_manifests_match_the_kubernetes_schemas(manifests: list[dict[str, Any]]) -> None:
    """Strict validation (unknown fields are errors) against the OpenAPI schemas of the oldest and the
    newest Kubernetes release kubernetes-validate ships."""
    require_module("kubernetes_validate")
    from kubernetes_validate import utils

    versions = sorted(set(utils.all_versions()), key=lambda v: tuple(int(p) for p in v.split(".")))
    secret = stack.load_yaml_documents((KUBERNETES / "secret.example.yaml").read_text())
    builtin = [doc for doc in [*manifests, *secret] if "monitoring.coreos.com" not in doc["apiVersion"]]
    assert {doc["kind"] for doc in builtin} >= {
        "Deployment",
        "ConfigMap",
        "Secret",
        "Service",
        "PodDisruptionBudget",
        "ServiceAccount",
    }
    for version in (versions[0], versions[-1]):
        for document in builtin:
            try:
                utils.validate(document, version, strict=True)
            except utils.ValidationError as error:
                pytest.fail(
                    f"{document['kind']} against Kubernetes {version}: {error.message} at {list(error.path)}"
                )


# Fields of the Prometheus Operator's CRDs (monitoring.coreos.com/v1) these manifests may use. No schema of
# the CRDs installs offline without side effects (cloudcoil's models register a pytest plugin), so unknown
# fields (typos) and malformed durations are caught here; the rules themselves are checked by promtool.
SERVICE_MONITOR_SPEC = {
    "selector",
    "endpoints",
    "namespaceSelector",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
}
SERVICE_MONITOR_ENDPOINT = {
    "port",
    "targetPort",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "honorTimestamps",
    "relabelings",
    "metricRelabelings",
    "params",
    "tlsConfig",
    "bearerTokenSecret",
    "authorization",
    "basicAuth",
    "oauth2",
    "followRedirects",
    "enableHttp2",
    "filterRunning",
    "proxyUrl",
}
PROMETHEUS_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)


def test_the_prometheus_operator_resources_use_only_fields_of_their_crds(
    manifests: list[dict[str, Any]],
) -> None:
    for kind in ("ServiceMonitor", "PrometheusRule"):
        document = one(manifests, kind)
        assert document["apiVersion"] == "monitoring.coreos.com/v1", kind
        assert set(document) == {"apiVersion", "kind", "metadata", "spec"}, kind
    monitor = one(manifests, "ServiceMonitor")["spec"]
    assert set(monitor) <= SERVICE_MONITOR_SPEC
    assert set(monitor["selector"]) <= {"matchLabels", "matchExpressions"}
    for endpoint in monitor["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT
        for duration in ("interval", "scrapeTimeout"):
            assert PROMETHEUS_DURATION.match(endpoint.get(duration, "0")), duration
    rule = one(manifests, "PrometheusRule")["spec"]
    assert set(rule) == {"groups"}


def normalised(node: Any) -> Any:
    if isinstance(node, str):
        return " ".join(node.split())
    if isinstance(node, list):
        return [normalised(item) for item in node]
    if isinstance(node, dict):
        return {key: normalised(value) for key, value in node.items()}
    return node


def test_the_prometheusrule_is_the_tested_rules_file(manifests: list[dict[str, Any]], tmp_path: Path) -> None:
    source = one(kubernetes_sources(), "PrometheusRule")["spec"]
    assert source == load_yaml(RULES), "run python3 deploy/kubernetes/generate-prometheusrule.py"
    # kustomize re-serialises folded (>-) scalars with more-indented lines adding a blank line: the same
    # PromQL, other whitespace. What is applied is compared up to whitespace and checked by promtool.
    spec = one(manifests, "PrometheusRule")["spec"]
    assert normalised(spec) == normalised(source)
    rules = tmp_path / "rules.yml"
    rules.write_text(json.dumps(spec))
    result = run([tool("promtool"), "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configmap_and_the_secret_template_are_a_valid_configuration(
    manifests: list[dict[str, Any]], settings_from: Any
) -> None:
    configmap = one(manifests, "ConfigMap")
    (secret,) = stack.load_yaml_documents((KUBERNETES / "secret.example.yaml").read_text())
    assert not set(configmap["data"]) & set(secret["stringData"]), "a setting in both"
    assert [
        name
        for name in configmap["data"]
        if re.search("PASSWORD|SECRET|TOKEN|ROUTING_KEY|DATABASE_URL", name)
    ] == []
    settings = settings_from({**configmap["data"], **secret["stringData"]})
    assert settings.database.url.get_secret_value().startswith("postgresql://")
    assert settings.metrics.host_port is not None and settings.metrics.host_port[0] == "0.0.0.0"
    container = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    sources = {source.get("configMapRef", source.get("secretRef"))["name"] for source in container["envFrom"]}
    assert sources == {configmap["metadata"]["name"], secret["metadata"]["name"]}
    assert "mia-detector-secrets" not in {
        d["metadata"]["name"] for d in manifests if d["kind"] == "Secret"
    }, "the real Secret never comes from the repository"


def test_probes_service_and_monitor_all_use_the_metrics_port(manifests: list[dict[str, Any]]) -> None:
    deployment, service, monitor = (
        one(manifests, kind) for kind in ("Deployment", "Service", "ServiceMonitor")
    )
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    configured = port_of(one(manifests, "ConfigMap")["data"]["MIA_METRICS_ADDR"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe  # /metrics may need credentials a probe does not have
        assert ports.get(get["port"], get["port"]) == configured, probe
    (service_port,) = service["spec"]["ports"]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == configured
    assert service["metadata"]["name"] == DAEMON, "the ServiceMonitor's job label, which the rules select"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_the_monitor_scrapes_with_the_credentials_the_daemon_checks(
    manifests: list[dict[str, Any]], settings_from: Any
) -> None:
    (endpoint,) = one(manifests, "ServiceMonitor")["spec"]["endpoints"]
    (secret,) = stack.load_yaml_documents((KUBERNETES / "secret.example.yaml").read_text())
    references = endpoint["basicAuth"]
    assert {ref["name"] for ref in references.values()} == {secret["metadata"]["name"]}
    keys = {part: ref["key"] for part, ref in references.items()}
    assert keys == {"username": "MIA_METRICS_USERNAME", "password": "MIA_METRICS_PASSWORD"}
    settings = settings_from({**one(manifests, "ConfigMap")["data"], **secret["stringData"]})
    assert settings.metrics.username == secret["stringData"]["MIA_METRICS_USERNAME"]
    assert settings.metrics.password.get_secret_value() == secret["stringData"]["MIA_METRICS_PASSWORD"]


def test_the_pod_runs_as_the_images_user_without_privileges_on_a_read_only_root(
    manifests: list[dict[str, Any]], dockerfile: list[Any]
) -> None:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    uid, _, gid = final_stage(dockerfile)["USER"][-1].value[0].partition(":")
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid or uid))
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    own = container["securityContext"]
    assert own["readOnlyRootFilesystem"] is True and own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    for mount in container["volumeMounts"]:
        if not mount.get("readOnly"):
            assert "emptyDir" in volumes[mount["name"]], mount["mountPath"]
    workdir = final_stage(dockerfile)["WORKDIR"][-1].value[0]
    assert {"/tmp", workdir} <= writable


def test_resources_scaling_and_shutdown(manifests: list[dict[str, Any]], compose_env: dict[str, str]) -> None:
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]

    def cpu(value: str) -> float:
        return float(value[:-1]) / 1000 if value.endswith("m") else float(value)

    def memory(value: str) -> int:
        units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
        return int(value[:-2]) * units[value[-2:]] if value[-2:] in units else int(value)

    assert 0 < cpu(resources["requests"]["cpu"]) <= cpu(resources["limits"]["cpu"])
    assert 256 * 2**20 <= memory(resources["requests"]["memory"]) <= memory(resources["limits"]["memory"])
    # Replicas beyond the topic's partitions would idle: the documented topic has KAFKA_PARTITIONS.
    partitions = int(compose_env["KAFKA_PARTITIONS"])
    assert 1 <= deployment["spec"]["replicas"] <= partitions
    # Never two versions in one group: an older one may not read the client states a newer one stores.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# -- systemd ---------------------------------------------------------------------------------------------


def unit_options(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections: each option with all its values, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_options(UNIT.read_text())["Service"]


def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's mia-detector (the only line that differs
    between this machine and an installed VM)."""
    command = shutil.which("mia-detector", path=str(Path(sys.executable).parent))
    assert command is not None
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={command}", UNIT.read_text())
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def test_systemd_verifies_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` exits 0 on unknown options and bad values and only reports them: any
    diagnostic fails the test."""
    result = run([tool("systemd-analyze"), "verify", "--man=no", str(runnable_unit(tmp_path))], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_the_unit_is_hardened(tmp_path: Path, unit: dict[str, list[str]]) -> None:
    result = run(
        [
            tool("systemd-analyze"),
            "security",
            "--offline=yes",
            "--threshold=20",
            str(runnable_unit(tmp_path)),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, "exposure above 2.0:\n" + result.stdout[-3000:]
    for option, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit[option] == [value], option


def test_the_service_user_owns_the_one_writable_state_directory(
    tmp_path: Path, unit: dict[str, list[str]]
) -> None:
    (tmp_path / "etc").mkdir()
    result = run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert result.returncode == 0, result.stderr
    passwd = {
        line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    }
    (user,) = unit["User"]
    assert user in passwd and int(passwd[user][2]) > 0
    assert passwd[user][6] == "/usr/sbin/nologin"
    state = "/var/lib/" + unit["StateDirectory"][0]
    assert passwd[user][5] == state
    assert unit["ReadWritePaths"] == [state]
    assert unit["WorkingDirectory"] == [state]


def test_the_unit_environment_is_a_valid_configuration(
    unit: dict[str, list[str]], settings_from: Any
) -> None:
    defaults = dict(value.split("=", 1) for value in unit["Environment"])
    assert unit["EnvironmentFile"] == ["/etc/mia-detector/mia-detector.env"]
    example = parse_env_file(UNIT_ENV.read_text())
    settings = settings_from({**defaults, **example})  # the file overrides Environment=
    assert settings.metrics.host_port is not None
    optional = with_placeholders(parse_env_file(UNIT_ENV.read_text(), commented=True))
    settings_from({**defaults, **example, **optional})
    sqlite = settings_from(defaults).database.url.get_secret_value()
    state = "/var/lib/" + unit["StateDirectory"][0]
    assert sqlite == f"sqlite:///{state}/mia-detector.db", "the default database is in the state directory"


def test_the_unit_restarts_on_failure_but_not_on_a_configuration_error_and_waits_for_the_commit(
    unit: dict[str, list[str]], tmp_path: Path
) -> None:
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    timeout = unit["TimeoutStopSec"][0]
    assert int(timeout.rstrip("s")) >= 60
    (code,) = unit["RestartPreventExitStatus"]
    command = shutil.which("mia-detector", path=str(Path(sys.executable).parent))
    assert command is not None
    env = {key: value for key, value in os.environ.items() if not key.startswith("MIA_")}
    result = run([command, "config", "show"], env={**env, "MIA_SESSIONS_GAP_SECONDS": "-1"}, cwd=tmp_path)
    assert str(result.returncode) == code, result.stderr
    assert "invalid configuration" in result.stderr
