"""The training-set index: exact and near membership, what its file holds, the CLI."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from detector.trainingset import IndexFileError, TrainingSetIndex
from detector.trainingset.cells import scaled, tokens
from detector.trainingset.files import FORMAT_VERSION, content_digest, integrity_code
from detector.trainingset.hashing import siphash24_words

KEY = bytes(range(32))


def split(data: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 50/50 split into training and held-out rows."""
    order = np.random.default_rng(seed).permutation(len(data))
    half = len(data) // 2
    return data[order[:half]], data[order[half:]]


DATASETS = {"breast_cancer": load_breast_cancer().data, "digits": load_digits().data}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def dataset(request: pytest.FixtureRequest) -> tuple[str, np.ndarray, np.ndarray, TrainingSetIndex]:
    training, held_out = split(DATASETS[request.param])
    return request.param, training, held_out, TrainingSetIndex.build(training, key=KEY)


def json_round_trip(rows: np.ndarray, number_format: str) -> np.ndarray:
    """`rows` as a client would send them: JSON numbers written with `number_format`, read back as float32."""
    text = "[" + ",".join("[" + ",".join(number_format % float(v) for v in row) + "]" for row in rows) + "]"
    return np.array(json.loads(text), dtype=np.float32)


# -- exact membership ----------------------------------------------------------------------------------------


def test_every_training_row_is_an_exact_hit(
    dataset: tuple[str, np.ndarray, np.ndarray, TrainingSetIndex],
) -> None:
    _, training, _, index = dataset
    assert (index.lookup(training) == 2).all()
    assert (index.lookup(training.astype(np.float32)) == 2).all()
    assert index.size == len(training) and index.width == training.shape[1]


def test_training_rows_survive_a_json_round_trip_with_6_significant_digits(
    dataset: tuple[str, np.ndarray, np.ndarray, TrainingSetIndex],
) -> None:
    _, training, _, index = dataset
    for number_format in ("%.6g", "%.7g", "%r"):
        assert (index.lookup(json_round_trip(training, number_format)) == 2).all(), number_format


@pytest.mark.parametrize("number_format", ["%.6g", "%.7g", "%.9g"])
def test_full_precision_rows_survive_a_json_round_trip(number_format: str) -> None:
    rng = np.random.default_rng(7)
    # Features spanning several orders of magnitude, at full float precision.
    rows = rng.normal(size=(2000, 30)) * 10.0 ** rng.integers(-3, 4, size=30)
    index = TrainingSetIndex.build(rows, key=KEY)
    sent = json_round_trip(rows, number_format)
    assert (index.lookup(sent) == 2).all()
    assert (index.lookup(json_round_trip(rows.astype(np.float32), number_format)) == 2).all()
    if number_format == "%.6g":  # the test data defeats the naive quantisation: this test can fail
        naive = (np.round(rows.astype(np.float32), 5) == np.round(sent, 5)).all(axis=1)
        assert naive.mean() < 0.1


def test_values_next_to_a_cell_boundary_still_hit_after_a_round_trip() -> None:
    rng = np.random.default_rng(3)
    # Values a hair either side of a cell boundary (4-digit cells end at ...45), e.g. 1.23445 +- 0.000006.
    cells = rng.integers(1000, 9999, size=(500, 3))
    rows = (cells + 0.45 + rng.uniform(-0.006, 0.006, cells.shape)) * 10.0 ** rng.integers(-4, 4, cells.shape)
    sent = json_round_trip(rows, "%.6g")
    moved = tokens(*scaled(rows.astype(np.float32))) != tokens(*scaled(sent))
    assert moved.any(axis=1).mean() > 0.2  # the round trip does push values across boundaries
    index = TrainingSetIndex.build(rows, key=KEY)
    assert (index.lookup(sent) == 2).all()
    assert (index.lookup(json_round_trip(rows, "%.8g")) == 2).all()


def test_held_out_rows_and_noisy_copies_are_never_exact(
    dataset: tuple[str, np.ndarray, np.ndarray, TrainingSetIndex],
) -> None:
    _, training, held_out, index = dataset
    noisy = training + np.random.default_rng(1).normal(0.0, 0.05, training.shape) * training.std(axis=0)
    assert not (index.lookup(held_out) == 2).any()
    assert (index.lookup(noisy) == 2).mean() < 0.01


# -- near membership -----------------------------------------------------------------------------------------


def test_noisy_copies_are_near_hits(dataset: tuple[str, np.ndarray, np.ndarray, TrainingSetIndex]) -> None:
    name, training, _, index = dataset
    rng = np.random.default_rng(11)
    noisy = training + rng.normal(0.0, 0.05, training.shape) * training.std(axis=0)
    assert (index.lookup(noisy) >= 1).mean() >= 0.95, name


def test_held_out_rows_rarely_hit(dataset: tuple[str, np.ndarray, np.ndarray, TrainingSetIndex]) -> None:
    name, _, held_out, index = dataset
    assert (index.lookup(held_out) >= 1).mean() < 0.01, name


def test_far_copies_do_not_hit(dataset: tuple[str, np.ndarray, np.ndarray, TrainingSetIndex]) -> None:
    _, training, _, index = dataset
    far = training + np.random.default_rng(5).normal(0.0, 1.0, training.shape) * training.std(axis=0)
    assert (index.lookup(far) >= 1).mean() < 0.05


# -- lookup contract -----------------------------------------------------------------------------------------


def test_lookup_returns_int8_per_row_and_zero_for_non_finite_rows() -> None:
    training, _ = split(DATASETS["breast_cancer"])
    index = TrainingSetIndex.build(training, key=KEY)
    batch = training[:4].astype(np.float32)
    batch[1, 3] = np.nan
    batch[2, 0] = np.inf
    hits = index.lookup(batch)
    assert hits.dtype == np.int8 and hits.tolist() == [2, 0, 0, 2]
    assert index.lookup(np.zeros((0, 30), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="31 features, the index 30"):
        index.lookup(np.zeros((2, 31)))


def test_the_same_key_and_seed_give_the_same_index() -> None:
    training, held_out = split(DATASETS["digits"])
    probe = np.concatenate([training[:50] + 0.3, held_out[:50]])
    first = TrainingSetIndex.build(training, key=KEY, seed=5)
    second = TrainingSetIndex.build(training, key=KEY, seed=5)
    assert (first.lookup(probe) == second.lookup(probe)).all()


@pytest.mark.parametrize(
    ("rows", "key", "expected"),
    [
        (np.zeros((0, 3)), KEY, "empty"),
        (np.zeros(3), KEY, "2-D"),
        (np.array([[1.0, np.nan]]), KEY, "non-finite"),
        (np.array([[1.0, 1e300]]), KEY, "float32 range"),
        (np.ones((2, 2)), b"short", "16 to 64 bytes"),
    ],
)
def test_build_rejects_bad_input(rows: np.ndarray, key: bytes, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        TrainingSetIndex.build(rows, key=key)


def test_siphash_matches_the_reference_test_vector() -> None:
    # Reference vector: key 00..0f, message 00..07 (SipHash-2-4, 64-bit output).
    message = np.frombuffer(bytes(range(8)), dtype="<u8")
    assert int(siphash24_words(bytes(range(16)), message)[0]) == 0x93F5F5799A932462


# -- the saved file ------------------------------------------------------------------------------------------


def test_the_file_holds_no_training_row(tmp_path: Path) -> None:
    training, _ = split(DATASETS["breast_cancer"])
    path = tmp_path / "index.npz"
    TrainingSetIndex.build(training, key=KEY).save(path)
    assert not holds_rows(path, training)


def test_the_no_rows_check_can_fail(tmp_path: Path) -> None:
    training, _ = split(DATASETS["breast_cancer"])
    leaky = tmp_path / "leaky.npz"
    np.savez(leaky, data=training.astype(np.float32))
    assert holds_rows(leaky, training)


def holds_rows(path: Path, rows: np.ndarray) -> bool:
    """Whether the npz at `path` holds `rows`: a row's bytes (float32 or float64) or an [n, d] float array."""
    content = path.read_bytes()
    if any(row.astype(dtype).tobytes() in content for row in rows for dtype in (np.float32, np.float64)):
        return True
    with np.load(path, allow_pickle=False) as archive:
        arrays = [archive[name] for name in archive.files]
    return any(a.dtype.kind == "f" and a.shape in (rows.shape, rows.shape[::-1]) for a in arrays)


def test_save_and_load_give_the_same_answers(tmp_path: Path) -> None:
    training, held_out = split(DATASETS["digits"])
    index = TrainingSetIndex.build(training)
    probe = np.concatenate([training, training + 0.2, held_out])
    index.save(tmp_path / "index.npz")
    loaded = TrainingSetIndex.load(tmp_path / "index.npz")
    assert (loaded.lookup(probe) == index.lookup(probe)).all()
    assert (loaded.size, loaded.width) == (index.size, index.width)
    assert not (tmp_path / "index.npz.partial").exists()


def test_an_index_saved_without_its_key_needs_it(tmp_path: Path) -> None:
    training, _ = split(DATASETS["breast_cancer"])
    path = tmp_path / "sub" / "index.npz"
    TrainingSetIndex.build(training, key=KEY).save(path, include_key=False)
    with np.load(path, allow_pickle=False) as archive:
        assert "key" not in archive.files
    assert KEY not in path.read_bytes()
    with pytest.raises(ValueError, match="saved without its key; set MIA_TRAINING_INDEX_KEY"):
        TrainingSetIndex.load(path)
    assert (TrainingSetIndex.load(path, key=KEY).lookup(training) == 2).all()


def test_loading_with_the_wrong_key_is_refused(tmp_path: Path) -> None:
    training, _ = split(DATASETS["breast_cancer"])
    path = tmp_path / "index.npz"
    TrainingSetIndex.build(training, key=KEY).save(path, include_key=False)
    with pytest.raises(IndexFileError, match="does not match its key") as error:
        TrainingSetIndex.load(path, key=bytes(32))
    assert "\n" not in str(error.value)
    assert (TrainingSetIndex.load(path, key=KEY).lookup(training) == 2).all()


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def sealed(arrays: dict[str, np.ndarray], key: bytes) -> dict[str, np.ndarray]:
    """`arrays` with integrity fields made for them under `key`, as `save` makes them."""
    digest = content_digest(arrays)
    return arrays | {
        "sha256": np.frombuffer(digest, dtype=np.uint8),
        "mac": np.frombuffer(integrity_code(digest, key), dtype=np.uint8),
    }


def test_every_byte_of_the_file_is_covered(tmp_path: Path) -> None:
    """One byte changed anywhere in what the index is read from (every member's npy header and data, the
    integrity fields included) is refused with one line; a change elsewhere (zip fields nobody reads) loads
    the very same index. The file cut anywhere is refused."""
    # A small index (three features, four tables of 8 bits) keeps the file at a few kilobytes.
    training, _ = split(DATASETS["breast_cancer"][:40, :3])
    good = tmp_path / "index.npz"
    index = TrainingSetIndex.build(training, key=KEY, tables=4, bits=8, min_tables=1)
    index.save(good)
    original = good.read_bytes()
    tampered = tmp_path / "tampered.npz"
    unnoticed = []
    for position in range(len(original)):
        content = bytearray(original)
        content[position] ^= 0x01
        tampered.write_bytes(bytes(content))
        try:
            loaded = TrainingSetIndex.load(tampered)
        except IndexFileError as error:
            assert "\n" not in str(error), error
        else:
            unnoticed.append(position)
            # What nobody reads may change (zip timestamps, versions, attributes): the index is the same.
            assert (loaded.lookup(training) == index.lookup(training)).all()
            assert arrays_of(tampered).keys() == arrays_of(good).keys()
    read = member_contents(good)
    assert unnoticed and not [position for position in unnoticed if any(position in r for r in read)]
    for length in range(0, len(original), max(1, len(original) // 200)):
        tampered.write_bytes(original[:length])
        with pytest.raises(IndexFileError):
            TrainingSetIndex.load(tampered)


def member_contents(path: Path) -> list[range]:
    """Where in the zip file at `path` each member's stored bytes (npy header and array data) lie."""
    content = path.read_bytes()
    ranges = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_length, extra_length = struct.unpack_from("<HH", content, info.header_offset + 26)
            start = info.header_offset + 30 + name_length + extra_length
            ranges.append(range(start, start + info.compress_size))
    return ranges


def test_an_edited_index_is_refused_by_its_sha256_and_without_the_key_by_its_code(tmp_path: Path) -> None:
    training, _ = split(DATASETS["breast_cancer"])
    path = tmp_path / "index.npz"
    TrainingSetIndex.build(training, key=KEY).save(path, include_key=False)
    arrays = arrays_of(path)
    # Someone drops every exact digest (to blind the detector) and writes a well-formed archive (the zip's
    # checksums right): the SHA-256 finds it.
    edited = arrays | {"exact": arrays["exact"][:1].copy()}
    np.savez(path, allow_pickle=False, **edited)
    with pytest.raises(IndexFileError, match="damaged or altered \\(its SHA-256 does not match\\)"):
        TrainingSetIndex.load(path, key=KEY)
    # Without the key, recomputing the SHA-256 is not enough.
    edited["sha256"] = np.frombuffer(content_digest(edited), dtype=np.uint8)
    np.savez(path, allow_pickle=False, **edited)
    with pytest.raises(IndexFileError, match="does not match its key"):
        TrainingSetIndex.load(path, key=KEY)
    # With the key, the same edit is accepted: the integrity code is what tells the two apart.
    np.savez(path, allow_pickle=False, **sealed(edited, KEY))
    assert TrainingSetIndex.load(path, key=KEY).size == len(training)


def test_a_pickle_bearing_file_fails_cleanly_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "crafted.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Touch(marker)
    craft_pickle_index(path, marker)
    assert b"unpickled" in path.read_bytes()  # the payload is really in the file
    with pytest.raises(IndexFileError, match="not a training-set index") as error:
        TrainingSetIndex.load(path)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def craft_pickle_index(path: Path, marker: Path) -> None:
    """An index file like a real one but for its `exact` field: an object array holding a pickle that
    creates `marker` when unpickled."""
    training, _ = split(DATASETS["breast_cancer"])
    real = tmp = path.with_name("real.npz")
    TrainingSetIndex.build(training, key=KEY).save(real)
    arrays = arrays_of(real)
    tmp.unlink()
    payload = np.empty(1, dtype=object)
    payload[0] = Touch(marker)
    np.savez(path, allow_pickle=True, **(arrays | {"exact": payload}))


class Touch:
    """Unpickling this creates a file: proof that a loader unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_the_touch_payload_works_when_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(Touch(marker)))
    assert marker.exists()


def test_files_that_are_not_indexes_are_refused(tmp_path: Path) -> None:
    training, _ = split(DATASETS["breast_cancer"])
    good = tmp_path / "index.npz"
    TrainingSetIndex.build(training, key=KEY).save(good)
    arrays = arrays_of(good)

    for version in (1, 99):  # 1: without the integrity fields
        other_version = tmp_path / f"v{version}.npz"
        np.savez(
            other_version,
            allow_pickle=False,
            **sealed(arrays | {"version": np.array(version, dtype=np.int64)}, KEY),
        )
        with pytest.raises(IndexFileError, match=f"format version {version}, expected {FORMAT_VERSION}"):
            TrainingSetIndex.load(other_version)

    unsorted = tmp_path / "unsorted.npz"
    np.savez(unsorted, allow_pickle=False, **sealed(arrays | {"exact": arrays["exact"][::-1].copy()}, KEY))
    with pytest.raises(IndexFileError, match="malformed"):
        TrainingSetIndex.load(unsorted)

    for missing in ("sha256", "mac"):
        without = tmp_path / f"without-{missing}.npz"
        np.savez(
            without, allow_pickle=False, **{name: array for name, array in arrays.items() if name != missing}
        )
        with pytest.raises(IndexFileError, match=f"malformed training-set index \\(field '{missing}'\\)"):
            TrainingSetIndex.load(without)

    other = tmp_path / "other.npz"
    np.savez(other, weights=np.ones(3))
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    for path in (other, single, garbage, text):
        with pytest.raises(IndexFileError, match="not a training-set index"):
            TrainingSetIndex.load(path)
    with pytest.raises(IndexFileError, match=r"cannot read training-set index .*missing\.npz"):
        TrainingSetIndex.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="16 to 64 bytes"):
        TrainingSetIndex.load(good, key=b"short")


# -- the command line ----------------------------------------------------------------------------------------


def index_training(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MIA_")}
    if key is not None:
        env["MIA_TRAINING_INDEX_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "detector", "index-training", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_indexes_a_training_file(tmp_path: Path) -> None:
    training, held_out = split(DATASETS["breast_cancer"])
    source = tmp_path / "training.csv"
    source.write_text(
        ",".join(f"f{i}" for i in range(30))
        + "\n"
        + "\n".join(",".join(repr(float(v)) for v in row) for row in training)
    )
    out = tmp_path / "index.npz"
    result = index_training(str(source), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (
        result.stderr.strip()
        == f"indexed {len(training)} rows of width 30 into {out}; key stored in the file"
    )
    index = TrainingSetIndex.load(out)
    assert (index.lookup(training) == 2).all() and not index.lookup(held_out).any()
    assert not holds_rows(out, training)


def test_cli_keeps_a_key_from_the_environment_out_of_the_file(tmp_path: Path) -> None:
    training, _ = split(DATASETS["digits"])
    source = tmp_path / "training.npy"
    np.save(source, training)
    out = tmp_path / "index.npz"
    result = index_training(str(source), "--out", str(out), key=KEY.hex())
    assert result.returncode == 0, result.stderr
    assert "key not stored (taken from MIA_TRAINING_INDEX_KEY)" in result.stderr
    with pytest.raises(ValueError, match="without its key"):
        TrainingSetIndex.load(out)
    assert (TrainingSetIndex.load(out, key=KEY).lookup(training) == 2).all()


@pytest.mark.parametrize(
    ("content", "key", "expected"),
    [
        ("a,b\n1,2\n3,x\n", None, "column 'b' is not numeric"),
        ("a,b\n1,2\n3\n", None, "line 3 has 1 fields"),
        ("a,b\n1,2\n", "not-hex", "(MIA_TRAINING_INDEX_KEY): Value error, not a hexadecimal key"),
        ("a,b\n1,2\n", "abcd", "the index key must be 16 to 64 bytes, not 2"),
    ],
)
def test_cli_bad_input_gives_one_line_and_exit_code_2(
    tmp_path: Path, content: str, key: str | None, expected: str
) -> None:
    source = tmp_path / "training.csv"
    source.write_text(content)
    out = tmp_path / "index.npz"
    result = index_training(str(source), "--out", str(out), key=key)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mia-detector: error:") and expected in lines[0], lines
    assert "Traceback" not in result.stderr and not out.exists()


def test_cli_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = index_training(str(tmp_path / "missing.npy"), "--out", str(tmp_path / "index.npz"))
    assert result.returncode == 2 and "missing.npy" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_zip_members_are_plain_npy(tmp_path: Path) -> None:
    training, _ = split(DATASETS["breast_cancer"])
    path = tmp_path / "index.npz"
    TrainingSetIndex.build(training, key=KEY).save(path)
    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
    fields = [
        "format",
        "version",
        "width",
        "size",
        "tables",
        "min_tables",
        "mean",
        "std",
        "planes",
        "offsets",
        "exact",
        "bands",
        "key",
        "sha256",
        "mac",
    ]
    assert names == sorted(f"{field}.npy" for field in fields)
