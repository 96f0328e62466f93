"""`run` and `replay` refuse a tampered scoring model or training-set index in one line with exit code 2,
before processing anything (`run` before it joins its consumer group), and never unpickle what such a file
holds."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from detector.broker import EmbeddedBroker
from detector.scoring.model import FOREST_FILE, ScoringModel
from detector.simulate.sample import write_sample
from detector.trainingset import TrainingSetIndex
from tests.scoring.test_scoring import RULES, baseline_trajectories
from tests.test_cli import cli_env, mia
from tests.trainingset.test_index import KEY, craft_pickle_index

Command = Callable[[dict[str, str]], tuple[int, str]]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good model directory (`model/`) and index (`index.npz`, key kept out of the file)."""
    directory = tmp_path_factory.mktemp("originals")
    ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={}).save(directory / "model")
    rows = np.random.default_rng(1).normal(size=(200, 30))
    TrainingSetIndex.build(rows, key=KEY).save(directory / "index.npz", include_key=False)
    return directory


@pytest.fixture
def files(originals: Path, tmp_path: Path) -> Path:
    """A copy of the originals, to tamper with."""
    shutil.copytree(originals / "model", tmp_path / "model")
    shutil.copy(originals / "index.npz", tmp_path / "index.npz")
    return tmp_path


def flip(path: Path, position: int) -> None:
    content = bytearray(path.read_bytes())
    content[position] ^= 0x01
    path.write_bytes(bytes(content))


def middle_of_member(path: Path, member: str) -> int:
    """A position inside the stored bytes of `member` of the zip file at `path`."""
    import struct
    import zipfile

    content = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    name_length, extra_length = struct.unpack_from("<HH", content, info.header_offset + 26)
    return int(info.header_offset + 30 + name_length + extra_length + info.compress_size // 2)


def refit(path: Path, change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
    """Rewrite the index at `path` as a well-formed archive (the zip's own checksums right) with
    `change` applied to its arrays."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    np.savez(path, allow_pickle=False, **change(arrays))


@pytest.fixture
def replay(tmp_path: Path) -> Command:
    events = tmp_path / "events.jsonl"
    write_sample(events, clients=2, events=10)

    def command(variables: dict[str, str]) -> tuple[int, str]:
        env = cli_env(MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'mia.db'}", **variables)
        result = mia("replay", str(events), env=env)
        return result.returncode, result.stderr

    return command


def assert_refused(outcome: tuple[int, str], expected: str) -> None:
    code, stderr = outcome
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mia-detector: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in stderr


def test_the_untouched_files_load(files: Path, replay: Command) -> None:
    code, stderr = replay(
        {
            "MIA_MODEL_PATH": str(files / "model"),
            "MIA_TRAINING_INDEX": str(files / "index.npz"),
            "MIA_TRAINING_INDEX_KEY": KEY.hex(),
        }
    )
    assert code == 0, stderr


def test_one_byte_of_the_forest_changed(files: Path, replay: Command) -> None:
    forest = files / "model" / FOREST_FILE
    flip(forest, forest.stat().st_size // 2)
    assert_refused(
        replay({"MIA_MODEL_PATH": str(files / "model")}), f"{FOREST_FILE} does not match its manifest hash"
    )


def test_one_byte_of_the_index_changed(files: Path, replay: Command) -> None:
    index = files / "index.npz"
    flip(index, middle_of_member(index, "exact.npy"))
    variables = {"MIA_TRAINING_INDEX": str(index), "MIA_TRAINING_INDEX_KEY": KEY.hex()}
    assert_refused(replay(variables), "not a training-set index")


def test_an_index_edited_into_a_well_formed_archive(files: Path, replay: Command) -> None:
    index = files / "index.npz"
    refit(index, lambda arrays: arrays | {"exact": arrays["exact"][:1].copy()})
    variables = {"MIA_TRAINING_INDEX": str(index), "MIA_TRAINING_INDEX_KEY": KEY.hex()}
    assert_refused(replay(variables), "damaged or altered (its SHA-256 does not match)")


def test_a_truncated_index(files: Path, replay: Command) -> None:
    index = files / "index.npz"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    variables = {"MIA_TRAINING_INDEX": str(index), "MIA_TRAINING_INDEX_KEY": KEY.hex()}
    assert_refused(replay(variables), "not a training-set index")


def test_an_index_with_another_key(files: Path, replay: Command) -> None:
    variables = {"MIA_TRAINING_INDEX": str(files / "index.npz"), "MIA_TRAINING_INDEX_KEY": bytes(32).hex()}
    assert_refused(replay(variables), "does not match its key")


def test_an_index_key_that_is_not_hex(files: Path, replay: Command) -> None:
    variables = {"MIA_TRAINING_INDEX": str(files / "index.npz"), "MIA_TRAINING_INDEX_KEY": "not-hex"}
    code, stderr = replay(variables)
    assert_refused((code, stderr), "MIA_TRAINING_INDEX_KEY")
    assert "not-hex" not in stderr, "a secret is never quoted"


def test_an_index_holding_a_pickle_is_refused_without_unpickling(tmp_path: Path, replay: Command) -> None:
    marker = tmp_path / "unpickled"
    crafted = tmp_path / "crafted.npz"
    craft_pickle_index(crafted, marker)
    assert_refused(replay({"MIA_TRAINING_INDEX": str(crafted)}), "not a training-set index")
    assert not marker.exists()


@pytest.mark.kafka
@pytest.mark.parametrize("tampered", ["model", "index"])
def test_run_refuses_a_tampered_file(
    tampered: str, files: Path, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    if tampered == "model":
        forest = files / "model" / FOREST_FILE
        flip(forest, forest.stat().st_size // 2)
        expected = "does not match its manifest hash"
    else:
        refit(files / "index.npz", lambda arrays: arrays | {"bands": arrays["bands"][:-1].copy()})
        expected = "damaged or altered"
    env = cli_env(
        MIA_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'mia.db'}",
        MIA_METRICS_ADDR="",
        MIA_MODEL_PATH=str(files / "model"),
        MIA_TRAINING_INDEX=str(files / "index.npz"),
        MIA_TRAINING_INDEX_KEY=KEY.hex(),
        MIA_LOG_LEVEL="WARNING",
    )
    result = mia("run", "--topic", f"tampered-{tampered}", "--exit-when-idle", "5", env=env)
    assert_refused((result.returncode, result.stderr), expected)
