"""The model inputs that pass through the detector are not kept: not in sessions, alerts or seen events,
and by default not in dead letters either (`MIA_INGEST_DEAD_LETTER_RAW_BYTES`, 0); an operator may opt in.
The one row kept is each client's latest, in its stored state: its next query's dense-change test compares
against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from detector.features.client import ClientFeatures
from detector.service import replay
from detector.simulate.sample import oip_record
from detector.storage import open_store
from tests.support import make_settings

# An input value no other part of a record holds, in every form a database might keep it.
MARKER = 731_905.25
MARKER_FORMS = (b"731905.25", np.float32(MARKER).tobytes(), np.float64(MARKER).tobytes())


def write_events(path: Path) -> None:
    """Valid records whose inputs hold `MARKER`, and a rejected one (a shape that does not match its data)
    holding it too."""
    lines = []
    for index in range(40):
        rows = np.array([[MARKER, 1.0, 2.0, float(index)]], dtype=np.float32)
        probabilities = np.array([[0.25, 0.75]], dtype=np.float32)
        lines.append(
            oip_record(f"e-{index}", 1_764_403_200.0 + index, f"client-{index % 2}", rows, probabilities)
        )
    rejected = oip_record(
        "bad", 1_764_403_300.0, "client-0", np.array([[MARKER, 1.0]]), np.array([[0.5, 0.5]])
    )
    rejected["request"]["inputs"][0]["shape"] = [3, 2]
    lines.append(rejected)
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))


def database_bytes(directory: Path) -> bytes:
    """Everything SQLite wrote: the database file, its write-ahead log and shared memory."""
    return b"".join(path.read_bytes() for path in sorted(directory.glob("mia.db*")))


@pytest.mark.parametrize("raw_bytes", [None, 4096])
def test_inputs_are_kept_only_when_dead_letters_are_told_to(tmp_path: Path, raw_bytes: int | None) -> None:
    events = tmp_path / "events.jsonl"
    write_events(events)
    ingest = {} if raw_bytes is None else {"dead_letter_raw_bytes": raw_bytes}
    settings = make_settings(f"sqlite:///{tmp_path / 'mia.db'}", ingest=ingest)
    stats = replay(settings, [str(events)])
    assert stats.events == 40 and sum(stats.dead_letters.values()) == 1

    with open_store(settings) as store:
        (letter,) = store.list_dead_letters()
        assert letter.reason == "shape_mismatch" and letter.source == f"file:{events}:41"
        assert letter.raw_size == len(events.read_bytes().splitlines()[-1])
        assert len(store.list_sessions()) == 2
        states = store.every_client_state()
    stored = database_bytes(tmp_path)
    assert sorted(client for _, client in states) == ["client-0", "client-1"]
    for state in states.values():
        # The client's latest row, and nothing else of its inputs.
        assert state.count(MARKER_FORMS[1]) == 1
        assert ClientFeatures.from_bytes(state).state()["clusters"]["last_row"][0] == MARKER
        stored = stored.replace(state, b"")
    if raw_bytes is None:
        assert settings.ingest.dead_letter_raw_bytes == 0
        assert letter.raw == b""
        assert not [form for form in MARKER_FORMS if form in stored]
    else:
        # Opted in: the rejected record's bytes are there (which also shows the search above can find them).
        assert letter.raw == events.read_bytes().splitlines()[-1]
        assert MARKER_FORMS[0] in stored
