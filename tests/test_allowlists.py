"""Allow-list files: what `train` suggests reads back as written (whatever the client ids hold), loads with
MIA_DETECTION_ALLOWLIST_FILE once reviewed, and a broken file is one line naming it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import orjson
import pytest

from detector.allowlists import allowlist_document, read_allowlist_file, toml_string
from detector.domain import AlertKind, AllowEntry
from detector.settings import ConfigError, load_settings
from detector.simulate.sample import START, oip_record, sample_records
from tests.test_cli import cli_env, mia

HOSTILE_IDS = [
    "plain-key",
    'quote"and\\backslash',
    "new\nline # not a comment",
    "esc\x1b[31mred\x7f\x00",
    "rtl\u202eexe.txt",
    "emoji 😀 and é",
    "]] [[allowlist]] client_id = 'forged'",
]


@pytest.mark.parametrize("text", HOSTILE_IDS)
def test_a_toml_string_reads_back_as_the_same_text_on_one_line(text: str) -> None:
    written = toml_string(text)
    assert "\n" not in written and written.isprintable()
    assert tomllib.loads(f"value = {written}")["value"] == text


def test_a_document_reads_back_as_its_entries_and_nothing_else(tmp_path: Path) -> None:
    entries = [
        AllowEntry(client_id, f"reviewed: {client_id}", AlertKind.CONFIDENCE_HARVESTING)
        for client_id in HOSTILE_IDS
    ]
    entries.append(AllowEntry("any-kind", "a job allowed everything"))
    path = tmp_path / "allow.toml"
    path.write_text(
        allowlist_document(
            entries, header=["header\nwith a forged line"], notes=[f"note {i}\n" for i in HOSTILE_IDS]
        )
    )
    read = read_allowlist_file(path)
    assert [
        AllowEntry(e["client_id"], e["reason"], e.get("kind") and AlertKind(e["kind"])) for e in read
    ] == entries


def test_the_file_adds_to_the_configured_allow_list(tmp_path: Path) -> None:
    path = tmp_path / "allow.toml"
    path.write_text(
        allowlist_document([AllowEntry("batch", "nightly batch scorer", AlertKind.CONFIDENCE_HARVESTING)])
    )
    settings = load_settings(
        detection={
            "allowlist": [{"client_id": "job", "reason": "owner's re-scoring job"}],
            "allowlist_file": path,
        }
    )
    allow = settings.detection.allow_list()
    assert allow.covers("batch", AlertKind.CONFIDENCE_HARVESTING)
    assert not allow.covers("batch", AlertKind.TRAINING_SET_TARGETING)
    assert allow.covers("job", AlertKind.TRAINING_SET_TARGETING)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read allow-list file"),
        ("client_id = ", "is not TOML"),
        ("[[rules]]\nid = 'x'\n", "expected only [[detection.allowlist]] tables"),
        ("[detection]\nmax_clients = 5\n", "expected only [[detection.allowlist]] tables"),
        ("detection = 1\n", "expected only [[detection.allowlist]] tables"),
        (
            "[[detection.allowlist]]\nclient_id = 'x'\nreason = 'ok, reviewed'\nkind = 'nope'\n",
            "entry 1: kind",
        ),
        ("[[detection.allowlist]]\nclient_id = 'x'\n", "entry 1: reason"),
    ],
)
def test_a_broken_file_is_one_line_naming_it(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "allow.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_settings(detection={"allowlist_file": path})
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    result = mia("config", "show", env=cli_env(MIA_DETECTION_ALLOWLIST_FILE=str(path)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def baseline_with_a_batch_scorer(path: Path) -> None:
    """Benign sample traffic, and a client asking the probabilities of 400 distinct records."""
    rng = np.random.default_rng(9)
    lines = list(sample_records(clients=20, events=600, seed=3))
    for index in range(400):
        row = rng.normal(size=(1, 30))
        probabilities = np.array([[0.7, 0.3]], dtype=np.float32)
        lines.append(
            orjson.dumps(oip_record(f"scorer-{index}", START + index, "batch\x1b[2J", row, probabilities))
        )
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.slow
def test_train_suggests_the_clients_that_reach_a_floor_and_takes_them_back_once_allowed(
    tmp_path: Path,
) -> None:
    baseline = tmp_path / "baseline.jsonl"
    baseline_with_a_batch_scorer(baseline)
    result = mia("train", "--events", str(baseline), "--out", str(tmp_path / "model"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"warning: \d+ baseline clients cannot measure a false-alert rate of 0.001", result.stderr
    )
    assert "MIA-004 200 (floor)" in result.stderr
    assert "\x1b" not in result.stderr and "batch\\x1b[2J" in result.stderr  # shown inert
    suggested = tmp_path / "model" / "suggested-allowlist.toml"
    [entry] = read_allowlist_file(suggested)
    assert (entry["client_id"], entry["kind"]) == ("batch\x1b[2J", "confidence_harvesting")
    assert "MIA-004 reached" in entry["reason"] and "scorer-" in entry["reason"]

    again = mia(
        "train",
        "--events",
        str(baseline),
        "--out",
        str(tmp_path / "model-2"),
        env=cli_env(MIA_DETECTION_ALLOWLIST_FILE=str(suggested)),
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "no baseline client left out of calibration" in again.stderr
    assert read_allowlist_file(tmp_path / "model-2" / "suggested-allowlist.toml") == []
