"""The strict reading (msgspec) against the published contract (pydantic): whatever the strict reading takes,
the contract takes and reads as the same envelope; what it declines is left to the contract."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from detector.ingest.wire import read_envelope
from detector.schemas import EXAMPLE_RECORDS
from tests.hostile import JSON_SEEDS, by_contract, check_strict_reading, strategies

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def envelope(**changes: Any) -> bytes:
    record = json.loads(json.dumps(EXAMPLE_RECORDS[0]))
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        parent = record
        for step in path:
            parent = parent[int(step)] if isinstance(parent, list) else parent[step]
        if value is ...:
            del parent[last]
        else:
            parent[last] = value
    return json.dumps(record).encode()


def plain_json(value: bytes) -> bool:
    """True for standard JSON (no NaN or Infinity literals)."""
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


def test_every_valid_seed_record_in_plain_json_is_read_strictly_as_the_contract_reads_it() -> None:
    for seed in JSON_SEEDS:
        if by_contract(seed) is not None and plain_json(seed):
            assert check_strict_reading(seed) is not None, seed[:200]


@pytest.mark.parametrize(
    "value",
    [
        envelope(timestamp="2026-11-29T08:00:00.123"),  # no offset: UTC by the contract
        envelope(timestamp="2026-11-29 08:00:00Z"),
        envelope(timestamp="2026-11-29T08:00:00.1234567Z"),
        envelope(timestamp="1764403200"),
        envelope(request__inputs__0__shape=["1", "4"]),
        envelope(request__inputs__0__shape=[1.0, 4]),
        envelope(latency_ms="12.5"),
        envelope(model__version=7.5),
        envelope(request__parameters={"deep": json.loads("[" * 170 + "]" * 170)}),
        envelope(request__inputs__0__data=[0.5, 1.25, -3.0, float("nan")]),
        envelope(response=..., request={"inputs": [[1, 2], [3, 4]]}),  # KServe rows under `inputs`
        envelope(response__model_name=5, response__predictions=[1]),  # the OIP member fails: KServe
    ],
    ids=[
        "naive-time",
        "space",
        "nanoseconds",
        "numeric-string-time",
        "string-shape",
        "float-shape",
        "string-latency",
        "fraction-version",
        "deep",
        "nan",
        "kserve-inputs",
        "union-fallthrough",
    ],
)
def test_lax_and_unusual_forms_are_left_to_the_contract(value: bytes) -> None:
    assert read_envelope(value) is None
    assert by_contract(value) is not None or b"deep" in value or b"NaN" in value


def test_a_number_version_and_an_epoch_time_are_read_as_the_contract_reads_them() -> None:
    value = envelope(model__version=7, timestamp=1764403200.123)
    read = check_strict_reading(value)
    assert read is not None and read.model_version == "7" and read.timestamp == 1764403200.123
    read = check_strict_reading(envelope(model__version=10**30))
    assert read is not None and read.model_version == str(10**30)


@settings(max_examples=400)
@given(strategies().records)
@example(envelope(timestamp="2026-11-29T24:00:00Z"))
@example(envelope(timestamp="2026-11-29T08:00:00+24:00"))
@example(envelope(client__id="a\x00b"))
@example(envelope(model__version=True))
@example(envelope(request__inputs__0__name="x" * 257))
# Invalid UTF-8 in a key the structs do not name: msgspec skips it unchecked, the contract rejects the record.
@example(envelope().replace(b'"user_agent"', b'"\x80user_agent"'))
def test_what_the_strict_reading_takes_the_contract_takes_alike(value: bytes) -> None:
    check_strict_reading(value)


@given(strategies().valid_records())
def test_valid_records_are_read_strictly(generated: tuple[dict[str, Any], dict[str, Any]]) -> None:
    value = json.dumps(generated[0]).encode()
    assert check_strict_reading(value) is not None, value[:300]


@given(st.one_of(st.floats(-1e12, 1e12), st.integers(-(10**12), 10**12), st.datetimes()))
def test_timestamps_are_read_as_the_contract_reads_them(moment: Any) -> None:
    check_strict_reading(
        envelope(timestamp=moment if not hasattr(moment, "isoformat") else moment.isoformat())
    )
    if hasattr(moment, "isoformat"):
        check_strict_reading(envelope(timestamp=moment.isoformat() + "Z"))
        check_strict_reading(envelope(timestamp=moment.isoformat() + "+05:30"))
