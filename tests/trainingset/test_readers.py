"""Reading training files: `.npy`, CSV and JSON Lines; anything else is a one-line error naming the place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.trainingset import load_training_rows


def test_reads_npy_csv_and_json_lines(tmp_path: Path) -> None:
    expected = np.array([[1.0, 2.5, -3.0], [4.0, 5.0, 6e-3]])
    np.save(tmp_path / "rows.npy", expected.astype(np.float32))
    (tmp_path / "rows.csv").write_text("a,b,c\n1,2.5,-3\n\n4, 5.0 ,6e-3\n")
    (tmp_path / "rows.jsonl").write_text("[1, 2.5, -3]\n\n[4, 5.0, 0.006]\n")
    # Objects: columns in sorted key order, whatever the order on each line.
    (tmp_path / "objects.jsonl").write_text('{"c": -3, "a": 1, "b": 2.5}\n{"b": 5, "c": 0.006, "a": 4}\n')
    for name in ("rows.npy", "rows.csv", "rows.jsonl", "objects.jsonl"):
        rows = load_training_rows(tmp_path / name)
        assert rows.dtype == np.float64 and rows.shape == (2, 3)
        np.testing.assert_allclose(rows, expected, rtol=1e-6, err_msg=name)
    integers = tmp_path / "integers.npy"
    np.save(integers, np.arange(6, dtype=np.int16).reshape(2, 3))
    assert load_training_rows(integers).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", "", "empty file"),
        ("header-only.csv", "a,b\n", "no training rows"),
        ("ragged.csv", "a,b\n1,2\n3\n", "line 3 has 1 fields, the header 2"),
        ("text.csv", "a,b\n1,2\n3,x\n", "column 'b' is not numeric (line 3: 'x')"),
        ("nan.csv", "a,b\n1,2\n3,nan\n", "non-finite value in row 2, column b"),
        ("empty.jsonl", "\n\n", "no training rows"),
        ("ragged.jsonl", "[1, 2]\n[3]\n", "line 2 has 1 values, the first row 2"),
        (
            "keys.jsonl",
            '{"a": 1, "b": 2}\n{"a": 1, "c": 2}\n',
            "line 2 has keys ['a', 'c'], the first row ['a', 'b']",
        ),
        ("mixed.jsonl", '[1, 2]\n{"a": 1, "b": 2}\n', "line 2 is not a row like the first"),
        ("string.jsonl", '[1, "2"]\n', 'line 1 holds "2", not a number'),
        ("bool.jsonl", "[1, true]\n", "line 1 holds true, not a number"),
        ("nan.jsonl", "[1, 2]\n[NaN, 2]\n", "non-finite value in row 2, column 0"),
        ("huge.jsonl", "[1, 1" + "0" * 400 + "]\n", "integer beyond float range"),
        ("broken.jsonl", "[1, 2\n", "line 1 is not valid JSON"),
        ("scalar.jsonl", "3\n", "line 1 is not a row like the first"),
        ("rows.txt", "1,2\n", "unsupported file type '.txt'"),
    ],
)
def test_bad_text_files_give_one_line_errors(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        load_training_rows(path)
    message = str(error.value)
    assert expected in message and message.startswith(str(path)) and "\n" not in message


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((0, 3)), "no training rows"),
        (np.ones(3), "expected a 2-D array of rows, got shape (3,)"),
        (np.array([["a", "b"]]), "expected a numeric array, got dtype <U1"),
        (np.array([[1.0, np.inf]]), "non-finite value in row 1, column 1"),
        (np.array([[1, 2]], dtype=object), "not a numeric .npy array"),
    ],
)
def test_bad_npy_files_give_one_line_errors(tmp_path: Path, array: np.ndarray, expected: str) -> None:
    path = tmp_path / "rows.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(ValueError) as error:
        load_training_rows(path)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_binary_and_npz_files_give_one_line_errors(tmp_path: Path) -> None:
    binary = tmp_path / "rows.csv"
    binary.write_bytes(b"a,b\n\xff\xfe,1\n")
    npz = tmp_path / "rows.npy"
    with npz.open("wb") as handle:  # an npz archive under a .npy name
        np.savez(handle, rows=np.ones((2, 2)))
    for path, expected in ((binary, "not UTF-8 text"), (npz, "not a .npy array")):
        with pytest.raises(ValueError) as error:
            load_training_rows(path)
        assert expected in str(error.value) and "\n" not in str(error.value)
