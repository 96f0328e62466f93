"""The wire-format contract: exported JSON Schemas match the models, which read what they promise."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from detector.schemas import EXAMPLE_RECORDS, KServeV1Request, OipRequest, QueryLogRecord, json_schemas

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
REGENERATE = (
    'regenerate with `mia-detector schemas export`, or `python -c "from pathlib import Path; '
    "from detector.schemas import export_json_schemas; export_json_schemas(Path('schemas'))\"`"
)


EXPORTED = json_schemas()


@pytest.mark.parametrize("file_name", sorted(EXPORTED))
def test_exported_schema_matches_the_model(file_name: str) -> None:
    path = SCHEMAS / file_name
    assert path.is_file(), f"{path} is missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == EXPORTED[file_name], (
        f"{path} differs from its model: {REGENERATE}"
    )


def test_no_schema_file_without_a_model() -> None:
    stale = sorted(path.name for path in SCHEMAS.glob("*.schema.json") if path.name not in EXPORTED)
    assert not stale, (
        f"schemas/ holds files no model produces ({', '.join(stale)}): delete them, then {REGENERATE}"
    )


def test_schema_examples_are_valid_records_of_both_formats() -> None:
    examples = json.loads(json_schemas()["query-log-record.schema.json"])["examples"]
    assert examples == json.loads(json.dumps(EXAMPLE_RECORDS))
    parsed = [QueryLogRecord.model_validate_json(json.dumps(example)) for example in examples]
    assert [type(record.request) for record in parsed] == [OipRequest, KServeV1Request]
    assert all(record.response is not None for record in parsed)


def envelope(**fields: Any) -> str:
    record = dict(EXAMPLE_RECORDS[0])
    record.update(fields)
    return json.dumps(record)


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (1764403200, datetime(2025, 11, 29, 8, 0, tzinfo=UTC)),
        (1764403200.5, datetime(2025, 11, 29, 8, 0, 0, 500000, tzinfo=UTC)),
        # pydantic on its own reads numbers this large as milliseconds (1973-03-03).
        (100_000_000_000, datetime(5138, 11, 16, 9, 46, 40, tzinfo=UTC)),
    ],
)
def test_epoch_timestamps_are_seconds(timestamp: float, expected: datetime) -> None:
    assert QueryLogRecord.model_validate_json(envelope(timestamp=timestamp)).timestamp == expected


@pytest.mark.parametrize("timestamp", [1e20, -1e20, float("nan"), float("inf")])
def test_impossible_epoch_timestamps_are_validation_errors(timestamp: float) -> None:
    with pytest.raises(ValidationError, match="epoch seconds out of range"):
        QueryLogRecord.model_validate_json(envelope(timestamp=timestamp))


def test_kserve_v1_inputs_are_read_as_instances() -> None:
    assert KServeV1Request.model_validate({"inputs": [[1, 2], [3, 4]]}).instances == [[1, 2], [3, 4]]


def test_tensor_like_inputs_are_not_read_as_kserve_v1_instances() -> None:
    with pytest.raises(ValidationError, match="instances"):
        KServeV1Request.model_validate({"inputs": [{"name": "x", "shape": [1], "data": [1]}]})
