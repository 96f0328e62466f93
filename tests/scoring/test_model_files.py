"""The scoring model on disk: loaded only after both hashes match, never through pickle, and skops refuses
any type it was not told to trust, before constructing anything."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import skops.io

from detector.scoring.model import FOREST_FILE, MANIFEST_FILE, ModelError, ScoringModel
from tests.scoring.test_scoring import RULES, baseline_trajectories


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ScoringModel]:
    directory = tmp_path_factory.mktemp("model") / "model"
    model = ScoringModel.fit(baseline_trajectories(), RULES, 0.01, scales={})
    model.save(directory)
    return directory, model


def copy_of(saved: tuple[Path, ScoringModel], tmp_path: Path) -> Path:
    source, _ = saved
    target = tmp_path / "model"
    target.mkdir()
    for name in (MANIFEST_FILE, FOREST_FILE):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def rehash(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` with both hashes made right, as someone who knows the format would."""
    manifest = dict(manifest)
    manifest["forest_sha256"] = hashlib.sha256((directory / FOREST_FILE).read_bytes()).hexdigest()
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    manifest["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def test_one_byte_changed_in_the_forest_is_refused(saved: tuple[Path, ScoringModel], tmp_path: Path) -> None:
    directory = copy_of(saved, tmp_path)
    forest = bytearray((directory / FOREST_FILE).read_bytes())
    forest[len(forest) // 2] ^= 0x01
    (directory / FOREST_FILE).write_bytes(bytes(forest))
    with pytest.raises(ModelError, match=f"{FOREST_FILE} does not match its manifest hash") as error:
        ScoringModel.load(directory)
    assert "\n" not in str(error.value)


def test_a_threshold_raised_in_the_manifest_is_refused(
    saved: tuple[Path, ScoringModel], tmp_path: Path
) -> None:
    directory = copy_of(saved, tmp_path)
    text = (directory / MANIFEST_FILE).read_text()
    manifest = json.loads(text)
    threshold = repr(manifest["forest_threshold"])
    # One character: still valid JSON, a detector that no longer sees anomalies.
    edited = text.replace(f'"forest_threshold": {threshold}', f'"forest_threshold": 9{threshold[1:]}')
    assert edited != text and len(edited) == len(text)
    (directory / MANIFEST_FILE).write_text(edited)
    with pytest.raises(ModelError, match=f"{MANIFEST_FILE} does not match its own hash"):
        ScoringModel.load(directory)
    # Without the hash (a model of the previous format), it is refused too.
    manifest.pop("manifest_sha256")
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not match its own hash"):
        ScoringModel.load(directory)


def test_a_model_loads_without_pickle(
    saved: tuple[Path, ScoringModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    directory, model = saved
    loaded = ScoringModel.load(directory)
    assert loaded.version == model.version and loaded.forest is not None


class Trap:
    """Building this object from its state creates a file: proof that a loader constructed it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["path"]).touch()
        self.__dict__.update(state)


def test_the_trap_works_when_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "constructed"
    skops.io.loads(skops.io.dumps(Trap(marker)), trusted=[Trap])
    assert marker.exists()


def test_a_forest_of_an_untrusted_type_is_refused_before_it_is_built(
    saved: tuple[Path, ScoringModel], tmp_path: Path
) -> None:
    directory = copy_of(saved, tmp_path)
    marker = tmp_path / "constructed"
    (directory / FOREST_FILE).write_bytes(skops.io.dumps(Trap(marker)))
    rehash(directory, json.loads((directory / MANIFEST_FILE).read_text()))
    with pytest.raises(ModelError, match="unsafe or unreadable forest") as error:
        ScoringModel.load(directory)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_a_pickle_in_place_of_the_forest_is_refused_without_unpickling(
    saved: tuple[Path, ScoringModel], tmp_path: Path
) -> None:
    directory = copy_of(saved, tmp_path)
    marker = tmp_path / "unpickled"
    (directory / FOREST_FILE).write_bytes(pickle.dumps(Touch(marker)))
    rehash(directory, json.loads((directory / MANIFEST_FILE).read_text()))
    with pytest.raises(ModelError, match="unsafe or unreadable forest"):
        ScoringModel.load(directory)
    assert not marker.exists()
    pickle.loads((directory / FOREST_FILE).read_bytes())  # the payload works when unpickled
    assert marker.exists()


class Touch:
    """Unpickling this creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))
