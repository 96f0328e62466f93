"""Fault: the database refuses writes for good: its SQLite file opened read-only, or the disk it lives on
full (a small tmpfs). The daemon must stop with a clear one-line error and a non-zero exit code (no
traceback), commit no offset ahead of what is stored, leave the file sound (`PRAGMA integrity_check`), and a
restart once the file is writable again must resume with nothing lost or counted twice.

    .venv/bin/pytest tests/faults/test_storage_refuses_writes.py --basetemp=/tmp/faults-tests \
        -p no:cacheprovider
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker
from detector.service import produce_file
from detector.simulate.sample import write_sample
from detector.storage import open_store
from tests.faults.harness import (
    Daemon,
    committed_offsets,
    daemon_env,
    integrity,
    reference,
    summary_figures,
    tally,
    tracebacks,
)
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ERROR_PREFIX = "mia-detector: error: "


def one_line_error(log: str) -> str:
    """The daemon's error line; fails unless there is exactly one and no traceback."""
    errors = [line for line in log.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1 and tracebacks(log) == [], log[-3000:]
    return errors[0]


def test_a_read_only_database_file_stops_the_daemon_in_one_line_and_a_restart_resumes(
    broker: EmbeddedBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Sent: 2,000 records (20 benign clients, 4 malformed), stored by a first run; then 2,000 more, which a
    run on the file opened read-only (`?mode=ro`, migrations off so that it starts) reads and cannot store:
    it must exit 1 with one line, with the broker's offsets and the database as the first run left them.
    A third run on the writable file stores the second 2,000. Processed: every event once, as a fault-free
    replay of both files counts them. De-duplicated: none expected. Alerts: none (benign), no sink."""
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    write_sample(first, clients=20, events=2_000, malformed_every=499, seed=1)
    write_sample(second, clients=20, events=2_000, malformed_every=499, seed=2)
    expected = reference([first, second], tmp_path)
    path = tmp_path / "mia.db"
    url = f"sqlite:///{path}"
    settings = make_settings(url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    args = ["--topic", topic, "--group-id", group, "--exit-when-idle", "4"]
    env = daemon_env(url, broker.bootstrap_servers)

    produce_file(settings, first, topic)
    assert Daemon(args, env, tmp_path / "first.log", request).wait(120) == 0
    before = tally(settings, group)
    committed_before = committed_offsets(broker.bootstrap_servers, group, topic)

    produce_file(settings, second, topic)
    read_only = env | {
        "MIA_DATABASE_URL": f"sqlite:///file:{path}?mode=ro&uri=true",
        "MIA_DATABASE_MIGRATE_ON_START": "false",
    }
    refused = Daemon([*args[:-2], "--exit-when-idle", "30"], read_only, tmp_path / "ro.log", request)
    code = refused.wait(120)
    error = one_line_error(refused.text())
    after_refusal = tally(settings, group)
    committed_after_refusal = committed_offsets(broker.bootstrap_servers, group, topic)
    sound = integrity(path)

    assert Daemon(args, env, tmp_path / "third.log", request).wait(120) == 0
    got = tally(settings, group)
    figures = (
        f"reference: {expected.events} events, {expected.queries} queries, {expected.dead_letters} dead "
        f"letters; first run stored {before.describe()}; read-only run: exit {code}, {error!r}, database "
        f"then {after_refusal.describe()}, broker offsets {sorted(committed_after_refusal.items())} (before: "
        f"{sorted(committed_before.items())}), integrity {sound!r}; in the end {got.describe()}"
    )
    print(figures)
    assert code == 1 and "readonly" in error.replace("read-only", "readonly"), figures
    assert after_refusal == before and committed_after_refusal == committed_before, figures
    assert sound == "ok", figures
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.dead_letters == expected.dead_letters, f"dead letters lost or stored twice: {figures}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted in the test's directory (root only), unmounted after the test."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount command here")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run([umount, "-l", str(mount_point)], capture_output=True, timeout=30, check=False)


def test_a_full_disk_stops_the_daemon_in_one_line_and_a_restart_resumes(
    broker: EmbeddedBroker, small_disk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Sent: 20,000 records (200 benign clients, 40 malformed) to a daemon whose SQLite file is on a 3 MiB
    tmpfs: it fills the disk before the end, and must exit 1 with one line, leaving a sound file and no
    offset committed ahead of the stored checkpoints. The tmpfs is then grown to 64 MiB and a restarted
    daemon stores the rest. Processed: every event once, as a fault-free replay counts them.
    De-duplicated: none expected. Alerts: none (benign), no sink."""
    events = tmp_path / "events.jsonl"
    sent = write_sample(events, clients=200, events=20_000, malformed_every=499, seed=4)
    expected = reference([events], tmp_path)
    path = small_disk / "mia.db"
    url = f"sqlite:///{path}"
    settings = make_settings(url, broker)
    topic, group = settings.kafka.topics[0], settings.kafka.group_id
    open_store(settings).close()  # migrated while there is room
    produce_file(settings, events, topic)
    args = ["--topic", topic, "--group-id", group, "--exit-when-idle", "4"]
    env = daemon_env(url, broker.bootstrap_servers, MIA_KAFKA_MAX_POLL_RECORDS="500")

    full = Daemon(args, env, tmp_path / "full.log", request)
    code = full.wait(180)
    error = one_line_error(full.text())
    at_failure = tally(settings, group)
    committed = committed_offsets(broker.bootstrap_servers, group, topic)
    sound = integrity(path)
    size = sum(file.stat().st_size for file in small_disk.iterdir())

    mount = shutil.which("mount") or "/bin/mount"
    subprocess.run(
        [mount, "-o", "remount,size=64m", str(small_disk)], check=True, capture_output=True, timeout=30
    )
    resumed = Daemon(args, env, tmp_path / "resumed.log", request)
    assert resumed.wait(180) == 0, resumed.tail()
    got = tally(settings, group)
    figures = (
        f"sent {sent} records; reference: {expected.events} events, {expected.queries} queries, "
        f"{expected.dead_letters} dead letters; full disk: exit {code}, {error!r}, {size} bytes on it, "
        f"stored then {at_failure.describe()}, checkpoints {sorted(at_failure.checkpoints.items())}, broker "
        f"offsets {sorted(committed.items())}, integrity {sound!r}; after the restart: {got.describe()}; "
        f"restarted run: {summary_figures(resumed.text())}"
    )
    print(figures)
    assert code == 1 and "full" in error, figures
    assert at_failure.seen_events < expected.events, f"the disk did not fill; nothing was tested: {figures}"
    assert all(offset <= at_failure.checkpoints.get(key, 0) for key, offset in committed.items()), figures
    assert sound == "ok", figures
    assert got.seen_events == expected.events, f"events lost or counted twice: {figures}"
    assert got.queries == expected.queries, f"queries lost or counted twice: {figures}"
    assert got.dead_letters == expected.dead_letters, f"dead letters lost or stored twice: {figures}"
    assert tracebacks(resumed.text()) == [], resumed.tail()
