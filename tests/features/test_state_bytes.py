"""Stored client states as bytes: every array comes back with its dtype, shape and values wherever it sat in
the state, read-only (a caller keeping one copies it); bytes it did not write are refused, not misread."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from detector.features import state_bytes
from detector.features.embedding import pack


def a_state() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    return {
        "clusters": {
            "codes": rng.integers(-127, 128, (5, 32)).astype(np.int8),
            "fingerprints": {
                "values": np.array([2**64 - 1, 3], dtype=np.uint64),
                "clusters": np.array([-1, 7]),
            },
            "empty": np.zeros((0, 32), dtype=np.float32),
            "sequence": 12,
        },
        "rows": [np.array([0.5, np.inf, -0.0], dtype=np.float32), None],
        "big_endian": np.arange(4, dtype=">i4"),
        "counters": {"queries": 3, "share": 0.25, "histogram": [1, 2]},
        "client_ip": "198.51.100.7",
    }


def test_every_array_comes_back_with_its_dtype_shape_and_values_read_only() -> None:
    state = a_state()
    restored = state_bytes.loads(state_bytes.dumps(state))

    assert state_bytes.dumps(restored) == state_bytes.dumps(state)
    clusters = restored["clusters"]
    assert clusters["codes"].dtype == np.int8 and np.array_equal(
        clusters["codes"], state["clusters"]["codes"]
    )
    assert clusters["fingerprints"]["values"].tolist() == [2**64 - 1, 3]
    assert clusters["fingerprints"]["clusters"].tolist() == [-1, 7]
    assert clusters["empty"].shape == (0, 32) and clusters["sequence"] == 12
    assert restored["rows"][0].tobytes() == state["rows"][0].tobytes() and restored["rows"][1] is None
    assert restored["big_endian"].dtype.isnative and restored["big_endian"].tolist() == [0, 1, 2, 3]
    assert restored["counters"] == {"queries": 3, "share": 0.25, "histogram": [1, 2]}
    with pytest.raises(ValueError, match="read-only"):
        clusters["codes"][0, 0] = 1


def test_a_column_is_read_from_an_array_base64_text_or_a_list_as_a_new_writable_array() -> None:
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    read_only = state_bytes.loads(state_bytes.dumps({"values": values}))["values"]
    for stored in (read_only, pack(values), values.tolist()):
        column = state_bytes.stored_column(stored, "<f4")
        assert column.dtype == np.float32 and column.tolist() == values.tolist()
        column[0] = 0.0  # its own
    assert read_only[0] == 1.5


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda data: b"{" + data[1:], "not a stored client state"),
        (lambda data: data[:-1], "cut short"),
        (lambda data: data + b"\x00", "bytes past its arrays"),
        (lambda data: data[:7], "cut short"),
        (lambda data: data.replace(b'"<i8"', b'"|O8"', 1), "unreadable|holds an array"),
    ],
)
def test_bytes_it_did_not_write_are_refused(mangle: object, reason: str) -> None:
    data = state_bytes.dumps({"ids": np.array([1, 2], dtype=np.int64), "n": 1})
    with pytest.raises(ValueError, match=reason):
        state_bytes.loads(mangle(data))  # type: ignore[operator]


def framed(header: dict[str, object], arrays: bytes) -> bytes:
    """Bytes laid out as `dumps` lays them out, around any header."""
    text = orjson.dumps(header)
    return state_bytes.MAGIC + len(text).to_bytes(4, "little") + text + arrays


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ({"$array": 1, "dtype": "<i8", "shape": [1]}, "out of order"),
        ({"$array": 0, "dtype": "<i8", "shape": [-1]}, "impossible shape"),
        ({"$array": 0, "dtype": "<i8", "shape": [2**40, 0]}, "impossible shape"),
        ({"$array": 0, "dtype": "<i8", "shape": [2]}, "cut short"),
        ({"$array": 0, "dtype": "<i8"}, "unreadable"),
        ({"$array": 0, "dtype": "no such type", "shape": [1]}, "unreadable"),
        ({"$array": 0, "dtype": "04f4", "shape": [1]}, "unreadable"),  # what numpy would evaluate
        ({"$array": 0, "dtype": "|O8", "shape": [1]}, "unreadable"),
        ([[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]], "nested too deep"),
    ],
)
def test_array_references_that_do_not_fit_the_bytes_are_refused(reference: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        state_bytes.loads(framed({"a": reference}, bytes(8)))


def test_what_is_not_a_value_is_not_written() -> None:
    with pytest.raises(TypeError, match="set"):
        state_bytes.dumps({"a": {1, 2}})
