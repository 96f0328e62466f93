"""The command line as operators use it: real processes, real broker, real databases, real signals."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from detector.broker import EmbeddedBroker
from detector.kafka.clients import MESSAGE_OVERHEAD_BYTES, message_limit
from detector.protocols import index_training_sets
from detector.scoring.model import MANIFEST_FILE, ScoringModel
from detector.scoring.rules import load_rules
from detector.service import produce_file, replay
from detector.simulate.sample import START, oip_record, write_sample
from detector.simulate.simulator import simulate
from detector.storage import open_store
from tests.scoring.test_model_files import rehash
from tests.scoring.test_scoring import baseline_trajectories
from tests.support import KAFKA_CLIENT, make_settings, unique


def cli_env(**variables: str | Path) -> dict[str, str]:
    """This environment without MIA_ settings, but for the Kafka client under test; then `variables`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MIA_")}
    env["MIA_KAFKA_CLIENT"] = KAFKA_CLIENT
    # No metrics endpoint unless a test asks for one: the default port is one per machine, and tests run side
    # by side.
    env["MIA_METRICS_ADDR"] = ""
    env.update({name: str(value) for name, value in variables.items()})
    return env


def mia(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        check=False,
    )


def start(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stderr:  # a file, not a pipe: a chatty daemon must never block on its logs
        return subprocess.Popen(
            [sys.executable, "-m", "detector", *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )


def test_config_show_prints_the_effective_configuration_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "mia.toml"
    config.write_text('[sessions]\ngap_seconds = 600\n[kafka]\ntopics = ["from-file"]\n')
    env = cli_env(
        MIA_DATABASE_URL="postgresql://detector:s3cr3t-pw@db.internal/mia",
        MIA_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        MIA_KAFKA_SASL_USERNAME="detector",
        MIA_KAFKA_SASL_PASSWORD="kafka-s3cr3t",
        MIA_KAFKA_TOPICS='["from-env"]',
    )
    result = mia("--config", str(config), "config", "show", env=env)
    assert result.returncode == 0, result.stderr
    shown = orjson.loads(result.stdout)
    assert shown["sessions"]["gap_seconds"] == 600
    assert shown["kafka"]["topics"] == ["from-env"]  # the environment wins over the file
    assert "s3cr3t" not in result.stdout
    assert shown["database"]["url"] == "postgresql://detector:***@db.internal/mia"


@pytest.mark.parametrize(
    ("args", "variables", "expected"),
    [
        (["sessions", "list", "--format", "xml"], {}, "xml"),
        (["replay", "no-such-file.jsonl"], {}, "no-such-file.jsonl"),
        (["run", "--exit-when-idle", "-3"], {}, "exit-when-idle"),
        (["no-such-command"], {}, "no-such-command"),
        (["config", "show"], {"MIA_SESSIONS_GAP_SECONDS": "soon"}, "MIA_SESSIONS_GAP_SECONDS"),
        (["config", "show"], {"MIA_KAFKA_AUTO_OFFSET_RESET": "sometimes"}, "auto_offset_reset"),
        (["config", "show"], {"MIA_KAFKA_TOPICS": "[not json"}, "invalid configuration"),
        (["--config", "missing.toml", "config", "show"], {}, "missing.toml"),
        (["deadletters", "list", "--reason", "too_big"], {}, "'too_big' is not one of 'record_too_large'"),
        (["alerts", "silence", "--kind", "probing"], {}, "'probing' is not one of"),
    ],
)
def test_bad_arguments_and_configuration_give_one_line_and_exit_code_2(
    args: list[str], variables: dict[str, str], expected: str
) -> None:
    result = mia(*args, env=cli_env(**variables))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mia-detector: error:") and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_gives_one_line_and_exit_code_1() -> None:
    env = cli_env(MIA_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    result = mia("sessions", "list", env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "database" in result.stderr


def test_an_unreadable_scoring_model_gives_one_line_and_exit_code_2(sqlite_url: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=2, events=10)
    env = cli_env(MIA_DATABASE_URL=sqlite_url, MIA_MODEL_PATH=str(tmp_path / "no-model"))
    result = mia("replay", str(events), env=env)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("mia-detector: error: cannot read scoring model at "), line


def test_a_model_calibrated_on_what_a_rule_no_longer_measures_is_named_at_start(
    sqlite_url: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=2, events=10)
    directory = tmp_path / "model"
    ScoringModel.fit(baseline_trajectories(), load_rules(), 0.01, scales={}).save(directory)
    manifest = orjson.loads((directory / MANIFEST_FILE).read_bytes())
    env = cli_env(MIA_DATABASE_URL=sqlite_url, MIA_MODEL_PATH=str(directory))
    result = mia("replay", str(events), env=env)
    assert result.returncode == 0 and "calibrated" not in result.stderr, result.stderr
    # As an earlier version calibrated MIA-002: on its lifetime count of bursts.
    rehash(directory, manifest | {"rule_measures": manifest["rule_measures"] | {"MIA-002": "probing.bursts"}})
    result = mia("replay", str(events), env=env)
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "another measure" in line]
    assert "MIA-002's threshold" in warning and "judges at its floor" in warning
    del manifest["rule_measures"]
    rehash(directory, manifest)
    result = mia("replay", str(events), env=env)
    assert result.returncode == 0, result.stderr
    assert "does not record what its thresholds were calibrated on" in result.stderr


def test_replay_then_list_sessions_and_dead_letters_as_jsonl(sqlite_url: str, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=5, events=300, malformed_every=60)
    env = cli_env(MIA_DATABASE_URL=sqlite_url)
    result = mia("replay", str(events), env=env)
    assert result.returncode == 0, result.stderr
    assert "300 records: 295 events" in result.stderr
    # Without a model or an index, the operator is told at start what detection is missing.
    assert "WARNING detector.service.wiring: no scoring model (MIA_MODEL_PATH unset)" in result.stderr
    assert "no training-set index (MIA_TRAINING_INDEX unset)" in result.stderr
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING) ", result.stderr)

    listed = mia("sessions", "list", "--format", "jsonl", env=env)
    sessions = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert {s["client_id"] for s in sessions} == {f"key_{i:04d}" for i in range(5)}
    for session in sessions:
        assert {"model", "client_id", "queries", "requests", "first_seen", "last_seen"} <= set(session)
        assert session["first_seen"].endswith("Z") and session["queries"] >= session["requests"] >= 1
    only = mia("sessions", "list", "--client", "key_0001", "--format", "jsonl", env=env)
    assert {orjson.loads(line)["client_id"] for line in only.stdout.splitlines()} == {"key_0001"}

    letters = [
        orjson.loads(line)
        for line in mia("deadletters", "list", "--format", "jsonl", env=env).stdout.splitlines()
    ]
    assert len(letters) == 5
    for letter in letters:
        assert letter["reason"] and letter["source"].startswith(f"file:{events}:")
        assert letter["received_at"].endswith("Z")
    reason = letters[0]["reason"]
    only_reason = mia("deadletters", "list", "--reason", reason, "--format", "jsonl", env=env)
    assert {orjson.loads(line)["reason"] for line in only_reason.stdout.splitlines()} == {reason}

    table = mia("sessions", "list", env=env)
    assert table.returncode == 0 and "key_0001" in table.stdout


def test_replay_in_a_terminal_shows_records_their_rate_and_the_time_left(
    sqlite_url: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=5, events=3000)
    pid, terminal = pty.fork()
    if pid == 0:  # the child: replay with a terminal for stderr
        os.execvpe(  # noqa: S606 - the interpreter running the tests, with fixed arguments
            sys.executable,
            [sys.executable, "-m", "detector", "replay", str(events)],
            cli_env(MIA_DATABASE_URL=sqlite_url, COLUMNS="160"),
        )
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    assert re.search(r"replaying .*[0-9,]+ records, [0-9,]+/s \d+:\d\d:\d\d \d+:\d\d:\d\d", text), text[
        -2000:
    ]
    assert "3000 records: 3000 events" in text


@pytest.mark.kafka
def test_produce_and_run_from_the_command_line(
    broker: EmbeddedBroker, sqlite_url: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=8, events=500)
    env = cli_env(
        MIA_DATABASE_URL=sqlite_url,
        MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        MIA_KAFKA_SESSION_TIMEOUT_MS="6000",
        MIA_LOG_FORMAT="json",
    )
    topic = unique("cli")
    produced = mia("produce", str(events), "--topic", topic, env=env)
    assert produced.returncode == 0, produced.stderr
    ran = mia("run", "--topic", topic, "--group-id", unique("g"), "--exit-when-idle", "4", env=env)
    assert ran.returncode == 0, ran.stderr
    logged = [orjson.loads(line) for line in ran.stderr.splitlines()]
    assert any("500 records" in entry["message"] for entry in logged)
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in logged)


@pytest.mark.kafka
def test_produce_sends_every_line_a_message_can_carry_and_names_the_others_in_one_line(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    sample = tmp_path / "sample.jsonl"
    write_sample(sample, clients=2, events=2)
    first, last = sample.read_bytes().splitlines()

    def padded(pad_bytes: int) -> bytes:
        return first[:-1] + b', "pad": "' + b"x" * pad_bytes + b'"}'

    # Over the detector's limit, within a message (1 MiB at least): sent, for the daemon to dead-letter.
    over_the_limit = padded(100_000)
    unsendable = padded(2_000_000)
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join([first, unsendable, over_the_limit, b"", last, unsendable + b" "]) + b"\n")
    topic = unique("limited")
    env = cli_env(MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, MIA_INGEST_MAX_RECORD_BYTES="65536")
    produced = mia("produce", str(events), "--topic", topic, env=env)
    assert produced.returncode == 1 and "Traceback" not in produced.stderr, produced.stderr
    bound = message_limit(65536) - MESSAGE_OVERHEAD_BYTES // 2
    assert produced.stderr.splitlines()[-1] == (
        f"mia-detector: error: 2 line(s) of {events} longer than the {bound:,} bytes a message may carry "
        f"(MIA_INGEST_MAX_RECORD_BYTES and Kafka's framing) not sent: line 2 ({len(unsendable):,} bytes), "
        f"line 6 ({len(unsendable) + 1:,} bytes); the other 3 were"
    )
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest", fetch_max_bytes=2**24
    )
    received: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(received) <= 3:
            for records in consumer.poll(timeout_ms=1000).values():
                received += [message.value for message in records]
            if len(received) == 3:  # a little longer: nothing else may come
                deadline = min(deadline, time.monotonic() + 2)
    finally:
        consumer.close()
    assert sorted(received) == sorted([first, over_the_limit, last])


@pytest.mark.kafka
def test_produce_creates_an_absent_topic_with_the_partitions_asked_and_leaves_an_existing_one(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=12, events=300)
    env = cli_env(MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers)
    topic = unique("partitioned")
    produced = mia("produce", str(events), "--topic", topic, "--partitions", "4", env=env)
    assert produced.returncode == 0, produced.stderr
    assert f"created topic {topic} with 4 partitions" in produced.stderr
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest")
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1, 2, 3}
        # Keyed by client: the twelve clients' records spread over the partitions, each client on one.
        partitions = [TopicPartition(topic, partition) for partition in range(4)]
        consumer.assign(partitions)
        owners: dict[str, set[int]] = {}
        for records in consumer.poll(timeout_ms=5000, max_records=1000).values():
            for message in records:
                owners.setdefault(message.key.decode(), set()).add(message.partition)
        while sum(consumer.end_offsets(partitions).values()) > sum(consumer.position(p) for p in partitions):
            for records in consumer.poll(timeout_ms=1000).values():
                for message in records:
                    owners.setdefault(message.key.decode(), set()).add(message.partition)
    finally:
        consumer.close()
    assert len(owners) == 12 and all(len(held) == 1 for held in owners.values())
    assert len(set().union(*owners.values())) > 1

    again = mia("produce", str(events), "--topic", topic, "--partitions", "6", env=env)
    assert again.returncode == 0, again.stderr
    assert f"topic {topic} exists with 4 partitions, not 6: left as it is" in again.stderr
    refused = mia("produce", str(events), "--topic", topic, "--partitions", "0", env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr


@pytest.mark.kafka
def test_records_of_megabytes_go_through_kafka_and_are_analysed(
    broker: EmbeddedBroker, database_url: str, tmp_path: Path
) -> None:
    # Two batches of images as an attack tool sends them, 128 rows of 3,072 float32 values each (8 MB of
    # JSON), above the 1 MiB that Kafka clients and brokers allow by default.
    rng = np.random.default_rng(5)
    events = tmp_path / "images.jsonl"
    with events.open("wb") as out:
        for batch in range(2):
            rows = rng.random((128, 3072), dtype=np.float32)
            record = oip_record(
                f"img-{batch}", START + batch, "key_images", rows, rng.dirichlet(np.ones(10), 128)
            )
            out.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    assert events.stat().st_size > 2 * 7_000_000
    env = cli_env(
        MIA_DATABASE_URL=database_url,
        MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        MIA_KAFKA_SESSION_TIMEOUT_MS="6000",
    )
    topic = unique("images")
    produced = mia("produce", str(events), "--topic", topic, "--partitions", "1", env=env)
    assert produced.returncode == 0, produced.stderr
    ran = mia("run", "--topic", topic, "--group-id", unique("group"), "--exit-when-idle", "5", env=env)
    assert ran.returncode == 0, ran.stderr
    store = open_store(make_settings(database_url))
    try:
        assert store.dead_letter_counts() == {}
        assert [(s.client_id, s.queries) for s in store.list_sessions()] == [("key_images", 256)]
    finally:
        store.close()


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_daemon_stopped_mid_stream_and_started_again_counts_every_event_exactly_once(
    how: str, broker: EmbeddedBroker, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    events = tmp_path / "events.jsonl"
    total = 30_000
    write_sample(events, clients=60, events=total, malformed_every=997)
    settings = make_settings(database_url, broker, commit={"min_records": 1000, "min_interval_seconds": 0.2})
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    produce_file(settings, events, topic)
    store = open_store(settings)
    request.addfinalizer(store.close)
    env = cli_env(
        MIA_DATABASE_URL=database_url,
        MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        MIA_KAFKA_SESSION_TIMEOUT_MS="6000",
        MIA_KAFKA_MAX_POLL_RECORDS="500",
        MIA_COMMIT_MIN_RECORDS="1000",
    )
    args = ("run", "--topic", topic, "--group-id", group)

    log = tmp_path / "daemon.log"
    first = start(*args, env=env, log=log)
    wait_for(lambda: store.count_seen_events() >= 3000, 90, "the first commits")
    first.send_signal(getattr(signal, how))
    first.wait(60)
    interrupted_at = store.count_seen_events()
    if how == "SIGTERM":
        assert first.returncode == 0, log.read_text()
    assert interrupted_at < total, "the stream had ended before the signal; nothing was tested"

    # The restarted daemon runs until it has stored the whole stream rather than until it sees no records
    # for a while: under load, a member restarted while its killed predecessor still held the group once
    # went 5 s without records with a third of the stream still on the broker.
    second = start(*args, env=env, log=log)
    try:
        reference = replay(make_settings(f"sqlite:///{tmp_path / 'expected.db'}"), [str(events)])
        wait_for(lambda: store.count_seen_events() >= reference.events, 180, "the whole stream stored")
    except AssertionError as timeout:
        stored = store.count_seen_events()
        raise AssertionError(f"{timeout}: {stored} events stored\n{log.read_text()}") from None
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    assert second.returncode == 0, log.read_text()
    assert store.count_seen_events() == reference.events
    assert sum(s.queries for s in store.list_sessions(limit=100_000)) == reference.queries
    assert sum(store.dead_letter_counts().values()) == sum(reference.dead_letters.values())
    positions = store.checkpoints(group)
    assert positions and all(topic_name == topic for topic_name, _ in positions)


def test_the_command_line_offers_every_simulator_scenario() -> None:
    from detector.cli.models import SCENARIO_NAMES
    from detector.simulate import SCENARIOS

    assert sorted(SCENARIO_NAMES) == sorted(SCENARIOS)


# A client id as an attacker would choose it: rich markup that does not parse (`[/]`) and a rich link, a
# terminal escape sequence clearing the screen and an OSC 8 hyperlink, a newline followed by a line that is
# valid JSON, and a bidirectional override.
HOSTILE_CLIENT = (
    "evil[/]x [link=https://attacker.example]click[/link] \x1b[2J\x1b]8;;https://attacker.example\x07here"
    '\x1b]8;;\x07\n{"level":"error","logger":"forged","message":"FORGED"} \u202egnp.exe'
)
# How it is shown: every control character as its escape, the rest as it is.
HOSTILE_SHOWN = (
    r"evil[/]x [link=https://attacker.example]click[/link] \x1b[2J\x1b]8;;https://attacker.example\x07here"
    r'\x1b]8;;\x07\n{"level":"error","logger":"forged","message":"FORGED"} \u202egnp.exe'
)


def write_prober(path: Path, client: str) -> None:
    """An augmentation prober's traffic, which opens an alert even without a trained model: 12 records, each
    followed by 8 label-only variants of itself with a little noise."""
    rng = np.random.default_rng(5)
    scale = rng.uniform(0.5, 50.0, 30).astype(np.float32)
    probs = np.array([[0.8, 0.2]], dtype=np.float32)
    at = START
    with path.open("wb") as out:
        for record in range(12):
            base = rng.normal(size=30) * scale
            for variant in range(9):
                row = base if variant == 0 else base + rng.normal(size=30) * scale * 0.02
                event_id = f"probe-{record}-{variant}"
                event = oip_record(event_id, at, client, row[None, :], probs, want_probabilities=False)
                out.write(orjson.dumps(event) + b"\n")
                at += 0.2
            at += 5.0


def test_a_hostile_client_id_is_shown_escaped_in_the_terminal(sqlite_url: str, tmp_path: Path) -> None:
    events = tmp_path / "hostile.jsonl"
    write_prober(events, HOSTILE_CLIENT)
    env = cli_env(MIA_DATABASE_URL=sqlite_url)

    replayed = mia("replay", str(events), env=env)
    assert replayed.returncode == 0, replayed.stderr
    [alert_line] = [line for line in replayed.stderr.splitlines() if "ALERT" in line]
    assert f"client={HOSTILE_SHOWN} model=credit-risk" in alert_line
    assert "1 alerts opened" in replayed.stderr

    listings = [mia(*command, env=env) for command in (["alerts", "list"], ["sessions", "list"])]
    for shown in [replayed, *listings]:
        assert shown.returncode == 0, shown.stderr
        output = shown.stdout + shown.stderr
        # No escape sequence reaches the terminal (and so no hyperlink), and the markup is shown as text.
        assert "\x1b" not in output and "\u202e" not in output
        assert "[link=https://attacker.example]click[/link]" in output
        assert not any(line.lstrip().startswith('{"level"') for line in output.splitlines())
    for listing in listings:  # tables may wrap a long cell, but at its spaces
        assert all(part in listing.stdout for part in (r"evil[/]x", r"\x1b[2J\x1b]8;;", r"\u202egnp.exe"))

    exported = mia("alerts", "list", "--format", "jsonl", env=env)
    assert all(line.isprintable() for line in exported.stdout.split("\n"))
    [row] = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert row["client_id"] == HOSTILE_CLIENT  # escaped on the way out, exactly itself once parsed


def test_with_json_logs_every_stderr_line_is_one_json_object_even_for_a_hostile_client_id(
    sqlite_url: str, tmp_path: Path
) -> None:
    events = tmp_path / "hostile.jsonl"
    write_prober(events, HOSTILE_CLIENT)

    replayed = mia("--log-format", "json", "replay", str(events), env=cli_env(MIA_DATABASE_URL=sqlite_url))
    assert replayed.returncode == 0, replayed.stderr
    lines = replayed.stderr.split("\n")
    assert lines[-1] == ""
    logged = [orjson.loads(line) for line in lines[:-1]]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in logged)
    # The newline in the client id did not start a record of its own.
    assert [entry for entry in logged if entry["logger"] == "forged"] == []
    [alert] = [entry for entry in logged if entry["logger"] == "detector.alerts"]
    assert alert["level"] == "warning" and alert["client_ids"] == [HOSTILE_CLIENT]
    assert (alert["kind"], alert["severity"], alert["model"]) == (
        "augmentation_probing",
        "high",
        "credit-risk",
    )
    assert isinstance(alert["alert_id"], int) and alert["top_reason"].startswith("probing.")
    assert alert["first_seen"].endswith("Z") and alert["detected_at"] >= alert["first_seen"]
    assert HOSTILE_SHOWN in alert["message"]
    assert any("108 records" in entry["message"] for entry in logged)


# -- start-up cost -------------------------------------------------------------------------------------------

# Modules that take about a second to import between them: only training, simulating, evaluating and the
# pipeline itself need them.
HEAVY_PACKAGES = {"sklearn", "scipy", "matplotlib"}


def imported_packages(*args: str, env: dict[str, str]) -> set[str]:
    """The top-level packages a Python process run with `args` imports, as `-X importtime` reports them;
    fails unless the process succeeds."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Lines such as `import time:       360 |     272903 |   detector.storage`.
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rpartition("|")[2].strip().partition(".")[0] for line in lines}


def test_the_import_check_sees_a_heavy_package() -> None:
    assert "sklearn" in imported_packages("-c", "import sklearn.ensemble", env=cli_env())


@pytest.mark.parametrize(
    "command",
    [
        ["alerts", "list"],
        ["alerts", "export"],
        ["alerts", "silences"],
        ["alerts", "outbox"],
        ["sessions", "list"],
        ["deadletters", "list"],
        ["config", "show"],
        ["--help"],
    ],
    ids=" ".join,
)
def test_read_only_commands_start_without_scikit_learn_scipy_or_matplotlib(
    command: list[str], sqlite_url: str
) -> None:
    packages = imported_packages("-m", "detector", *command, env=cli_env(MIA_DATABASE_URL=sqlite_url))
    assert "detector" in packages and "click" in packages
    assert not packages & HEAVY_PACKAGES, f"{' '.join(command)} imports {sorted(packages & HEAVY_PACKAGES)}"


@pytest.mark.slow
def test_clients_show_tells_what_an_attacker_was_given_beside_its_alerts(tmp_path: Path) -> None:
    simulate("smoke", 3, tmp_path / "scenario")
    truth = [orjson.loads(line) for line in (tmp_path / "scenario" / "truth.jsonl").read_bytes().splitlines()]
    url = f"sqlite:///{tmp_path / 'mia.db'}"
    settings = make_settings(url, alerts={"resolve_after_seconds": 86_400}).model_copy(
        update={"training_index": index_training_sets(tmp_path / "scenario", tmp_path / "indexes")}
    )
    replay(settings, [str(tmp_path / "scenario" / "events.jsonl")])
    env = cli_env(MIA_DATABASE_URL=url)

    alerts = [
        orjson.loads(line) for line in mia("alerts", "list", "--format", "jsonl", env=env).stdout.splitlines()
    ]
    attackers = {entry["client_id"] for entry in truth if entry["role"] == "attacker"}
    exposed = [alert for alert in alerts if alert["exposure"] and alert["client_id"] in attackers]
    assert exposed, alerts
    alert = max(exposed, key=lambda alert: alert["exposure"]["training_records"])
    shown = mia("clients", "show", alert["client_id"], "--format", "jsonl", env=env)
    assert shown.returncode == 0, shown.stderr
    [row] = [orjson.loads(line) for line in shown.stdout.splitlines()]
    assert row["model"] == alert["model"] and alert["id"] in row["open_alerts"]
    # The client's exposure by the end of the stream, as much as by the alert's latest detection at least.
    for count in ("probability_records", "training_records", "label_only_answers", "probes"):
        assert row[count] >= alert["exposure"][count], count
    assert row["first_seen"] <= alert["first_seen"] <= alert["last_seen"] <= row["last_seen"]
    assert row["training_records"] > 0
    assert row["risk_action"] in ("coarsen", "throttle", "block")  # the packaged policy's, on an open alert

    benign = next(entry["client_id"] for entry in truth if entry["role"] == "benign")
    table = mia("clients", "show", benign, env=env)
    assert table.returncode == 0 and "label_only_answers" in table.stdout
    unknown = mia("clients", "show", "nobody", env=env)
    assert (
        unknown.returncode == 1
        and unknown.stderr.strip() == "mia-detector: error: no stored state for client 'nobody'"
    )
