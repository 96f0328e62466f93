"""The decoder against hostile input: every limit is a dead letter with its reason, never an allocation
sized by what a record declares, a crash or unbounded work; and, for generated records (valid, mutated,
arbitrary JSON, arbitrary bytes), the decoder either returns queries whose invariants hold or rejects the
record cleanly, within bounded time and memory."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from detector.domain import DeadLetterReason, InvalidRecord
from detector.ingest import RecordDecoder
from detector.ingest.decode import MAX_LABEL_CHARS
from detector.ingest.wire import JSON_MAX_DEPTH
from detector.schemas import EXAMPLE_RECORDS, MAX_NAME_CHARS, MAX_TENSOR_DIMS, MAX_TENSORS, json_schemas
from detector.settings import IngestSettings
from tests.hostile import (
    LIMITS,
    SEEDS,
    check_outcome,
    decode_measured,
    raw,
    strategies,
)

# A failing example of hostile input is often large: let hypothesis print it rather than warn about it.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
R = DeadLetterReason
DECODER = RecordDecoder(LIMITS)
OIP = EXAMPLE_RECORDS[0]
KSERVE = EXAMPLE_RECORDS[1]


def tensor(shape: list[Any], data: list[Any], datatype: str = "FP32", name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def oip(
    request: dict[str, Any] | None = None, response: dict[str, Any] | None = None, **fields: Any
) -> bytes:
    """The published OIP example with its request, response or envelope fields replaced."""
    record = json.loads(json.dumps(OIP))
    if request is not None:
        record["request"] = request
    if response is not None:
        record["response"] = response
    record.update(fields)
    return json.dumps(record).encode()


def kserve(request: dict[str, Any], response: dict[str, Any] | None = None) -> bytes:
    record = json.loads(json.dumps(KSERVE))
    record["request"] = request
    if response is None:
        del record["response"]
    else:
        record["response"] = response
    return json.dumps(record).encode()


def spliced(value: bytes, marker: str, replacement: str) -> bytes:
    """`value` with the JSON string `"marker"` replaced by raw JSON text (numbers json.dumps cannot write)."""
    quoted = f'"{marker}"'.encode()
    assert quoted in value
    return value.replace(quoted, replacement.encode())


def items(unit: str, size: int) -> str:
    """A JSON array of `unit` repeated to about `size` bytes."""
    return "[" + ",".join([unit] * (size // (len(unit) + 1))) + "]"


ONE_ROW = {"inputs": [tensor([1, 2], [1.0, 2.0])]}
BIG = "9" * 4000  # within the 4,300 digits Python (and jiter) read as an integer
NEAR_LIMIT = LIMITS.max_record_bytes - 4096


# The costliest record found near the size limit: every `{}` is a Python dict once parsed.
OBJECTS_TO_THE_LIMIT = spliced(oip({"inputs": [tensor([1, 1], ["L"])]}), "L", items("{}", NEAR_LIMIT)[1:-1])


def case(name: str, value: bytes, reason: DeadLetterReason, fragment: str) -> Any:
    return pytest.param(value, reason, fragment, id=name)


LIMIT_CASES = [
    # Declared shapes against data: nothing is sized by the shape; products stop at the limit.
    case(
        "shape-1e9-by-1e9", oip({"inputs": [tensor([10**9, 10**9], [1.0])]}), R.BATCH_TOO_LARGE, "1000000000"
    ),
    case(
        "shape-2^31-squared",
        oip({"inputs": [tensor([2**31, 2**31], [1.0])]}),
        R.BATCH_TOO_LARGE,
        "max_batch_rows",
    ),
    case(
        "row-of-2^62-values",
        oip({"inputs": [tensor([1, 2**31, 2**31], [1.0])]}),
        R.SHAPE_MISMATCH,
        "declares more values per row than ingest.max_features (65536)",
    ),
    case(
        "row-product-of-8000-digits",  # used to raise ValueError: Python refuses to print it
        spliced(oip({"inputs": [tensor([1, "N", "N"], [1.0])]}), "N", BIG),
        R.SHAPE_MISMATCH,
        "declares more values per row",
    ),
    case(
        "output-product-of-8000-digits",
        spliced(oip(response={"outputs": [tensor([1, "N", "N"], [0.5], name="predict_proba")]}), "N", BIG),
        R.SHAPE_MISMATCH,
        "response.outputs[0] ('predict_proba'): shape [1, 9999",
    ),
    case(
        "batch-of-4000-digits",
        spliced(oip({"inputs": [tensor(["N", 1], [1.0])]}), "N", BIG),
        R.BATCH_TOO_LARGE,
        "99999... rows, more than ingest.max_batch_rows",
    ),
    case(
        "negative-dimension",
        oip({"inputs": [tensor([1, -2, -3], [1.0] * 6)]}),
        R.SCHEMA_VIOLATION,
        "negative",
    ),
    case("negative-batch", oip({"inputs": [tensor([-1, 2], [1.0, 2.0])]}), R.SCHEMA_VIOLATION, "negative"),
    case(
        "rows-of-nothing",  # used to be 4,096 queries of empty text from 70 bytes of shape
        oip({"inputs": [tensor([4096, 0], [], "BYTES")] * 100}),
        R.SCHEMA_VIOLATION,
        "the rows hold no values (shape [4096, 0])",
    ),
    case(
        "confidences-of-nothing",  # used to be accepted with empty probability vectors
        oip(response={"outputs": [tensor([1, 0], [], name="predict_proba")]}),
        R.SCHEMA_VIOLATION,
        "the rows hold no values",
    ),
    case(
        "too-many-dimensions",
        oip({"inputs": [tensor([1] * (MAX_TENSOR_DIMS + 1), [1.0])]}),
        R.SCHEMA_VIOLATION,
        f"request.inputs[0].shape: List should have at most {MAX_TENSOR_DIMS} items",
    ),
    case(
        "too-many-inputs",
        oip({"inputs": [tensor([1, 1], [1.0])] * (MAX_TENSORS + 1)}),
        R.SCHEMA_VIOLATION,
        f"request.inputs: List should have at most {MAX_TENSORS} items",
    ),
    case(
        "too-many-outputs",
        oip(response={"outputs": [tensor([1, 2], [0.5, 0.5], name="o")] * (MAX_TENSORS + 1)}),
        R.SCHEMA_VIOLATION,
        "response.outputs: List should have at most",
    ),
    case(
        "too-many-requested-outputs",
        oip({**ONE_ROW, "outputs": [{"name": "predict"}] * (MAX_TENSORS + 1)}),
        R.SCHEMA_VIOLATION,
        "request.outputs: List should have at most",
    ),
    case(
        "too-many-instances",
        kserve({"instances": [[1.0]] * (LIMITS.max_batch_rows + 1)}),
        R.BATCH_TOO_LARGE,
        "batch of 4097 rows",
    ),
    # Strings.
    case(
        "long-event-id",
        oip(event_id="e" * 257),
        R.SCHEMA_VIOLATION,
        "event_id: String should have at most 256",
    ),
    case(
        "long-user-agent",
        oip(client={"id": "c", "user_agent": "u" * 1025}),
        R.SCHEMA_VIOLATION,
        "client.user_agent: String should have at most 1024",
    ),
    case(
        "long-tensor-name",
        oip({"inputs": [tensor([1, 1], [1.0], name="n" * (MAX_NAME_CHARS + 1))]}),
        R.SCHEMA_VIOLATION,
        "request.inputs[0].name: String should have at most 256",
    ),
    case(
        "long-output-name",
        oip({**ONE_ROW, "outputs": [{"name": "n" * (MAX_NAME_CHARS + 1)}]}),
        R.SCHEMA_VIOLATION,
        "request.outputs[0].name: String should have at most 256",
    ),
    case(
        "long-label",  # clusters keep a label per record they remember
        kserve({"instances": [[1.0]]}, {"predictions": ["l" * (MAX_LABEL_CHARS + 1)]}),
        R.SCHEMA_VIOLATION,
        "response.predictions[0]: a label of 257 characters, more than 256",
    ),
    case(
        "label-of-4000-digits",
        spliced(kserve({"instances": [[1.0]]}, {"predictions": ["N"]}), "N", BIG),
        R.SCHEMA_VIOLATION,
        "a label of 4000 characters",
    ),
    case(
        "long-class-name",
        kserve(
            {"instances": [[1.0]]}, {"predictions": [{"scores": [0.1, 0.9], "classes": ["a", "b" * 300]}]}
        ),
        R.SCHEMA_VIOLATION,
        "response.predictions[0].classes[1]: a label of 300 characters",
    ),
    case(
        "long-label-tensor",
        oip(response={"outputs": [tensor([1], ["l" * 300], "BYTES", name="label")]}),
        R.SCHEMA_VIOLATION,
        "response.outputs[0] ('label').data[0]: a label of 300 characters",
    ),
    case("nul-in-event-id", oip(event_id="a\x00b"), R.SCHEMA_VIOLATION, "event_id: contains a NUL character"),
    case("lone-high-surrogate", spliced(oip(event_id="S"), "S", '"\\ud800"'), R.INVALID_JSON, "hex escape"),
    case(
        "lone-low-surrogate",
        spliced(oip(event_id="S"), "S", '"a\\udc00b"'),
        R.INVALID_JSON,
        "lone leading surrogate",
    ),
    # Nesting: the JSON parser's own limit, a clean error at any depth.
    case(
        "deep-data",
        spliced(oip({"inputs": [tensor([1, 1], ["D"])]}), "D", "[" * 10_000 + "]" * 10_000),
        R.INVALID_JSON,
        f"nested too deeply: the JSON parser stops at about {JSON_MAX_DEPTH} levels",
    ),
    case(
        "deep-parameters",
        spliced(oip({**ONE_ROW, "parameters": {"p": "D"}}), "D", '{"a":' * 10_000 + "1" + "}" * 10_000),
        R.INVALID_JSON,
        "levels (Invalid JSON: recursion limit exceeded",
    ),
    case("brackets-to-the-limit", b"[" * NEAR_LIMIT, R.INVALID_JSON, "nested too deeply"),
    # Near the size limit: every item invalid. Validation stops at the first (it used to report each one:
    # 9 s and 400 MiB for one record).
    case(
        "shape-of-strings-to-the-limit",
        spliced(oip({"inputs": [tensor(["S"], [1.0])]}), "S", items('"a"', NEAR_LIMIT)[1:-1]),
        R.SCHEMA_VIOLATION,
        "request.inputs[0].shape[0]: Input should be a valid integer",
    ),
    case(
        "invalid-tensors-to-the-limit",
        spliced(oip({"inputs": ["T"]}), "T", items('{"data":1}', NEAR_LIMIT)[1:-1]),
        R.SCHEMA_VIOLATION,
        "request.inputs[0].name: Field required (and 3 more)",
    ),
    case(
        "empty-lists-to-the-limit",
        spliced(oip({"inputs": [tensor([1, 1], ["L"])]}), "L", items("[]", NEAR_LIMIT)[1:-1]),
        R.SHAPE_MISMATCH,
        "0 data elements",
    ),
    case("empty-objects-to-the-limit", OBJECTS_TO_THE_LIMIT, R.SCHEMA_VIOLATION, "an object at flat index 0"),
    case(
        "instances-to-the-limit",
        spliced(kserve({"instances": ["I"]}), "I", items("{}", NEAR_LIMIT)[1:-1]),
        R.BATCH_TOO_LARGE,
        "max_batch_rows",
    ),
    case("nothing-to-the-limit", b"[" + b"{}," * (NEAR_LIMIT // 3) + b"{}]", R.INVALID_JSON, "an array"),
    # Time.
    case(
        "year-9999",
        oip(timestamp="9999-12-31T23:59:59-23:59"),
        R.IMPLAUSIBLE_TIMESTAMP,
        "ahead of its receipt",
    ),
    case("epoch-1e300", oip(timestamp=1e300), R.SCHEMA_VIOLATION, "epoch seconds out of range"),
    case(
        "epoch-nan",
        spliced(oip(timestamp="T"), "T", "NaN"),
        R.SCHEMA_VIOLATION,
        "epoch seconds out of range",
    ),
]


@pytest.mark.parametrize(("value", "reason", "fragment"), LIMIT_CASES)
def test_a_limit_is_a_dead_letter_in_bounded_time_and_memory(
    value: bytes, reason: DeadLetterReason, fragment: str
) -> None:
    record = raw(value)
    outcome = decode_measured(DECODER, record)
    assert outcome.error is not None, "accepted"
    assert outcome.error.reason is reason, outcome.error.detail
    assert fragment in outcome.error.detail, outcome.error.detail
    check_outcome(outcome, record)


def test_near_the_limit_a_record_costs_at_most_tens_of_times_its_size() -> None:
    assert len(OBJECTS_TO_THE_LIMIT) > 0.99 * LIMITS.max_record_bytes
    outcome = decode_measured(DECODER, raw(OBJECTS_TO_THE_LIMIT))
    assert outcome.error is not None
    assert outcome.peak_bytes < 48 * len(OBJECTS_TO_THE_LIMIT)


def test_nesting_is_read_up_to_the_parsers_limit() -> None:
    # jiter counts every level: the record, request, inputs, the tensor, data, the lists in it, the number.
    def nested(levels: int) -> bytes:
        return spliced(oip({"inputs": [tensor([1, 1], ["D"])]}), "D", "[" * levels + "1" + "]" * levels)

    deepest = JSON_MAX_DEPTH - 5
    assert [
        query.vector.tolist() for query in DECODER.decode(raw(nested(deepest))) if query.vector is not None
    ] == [[1.0]]
    for levels in (deepest + 1, 100_000):
        with pytest.raises(InvalidRecord) as caught:
            DECODER.decode(raw(nested(levels)))
        assert caught.value.reason is R.INVALID_JSON
        assert caught.value.detail.startswith("nested too deeply"), caught.value.detail


def test_the_structural_bounds_are_published_in_the_schema() -> None:
    schemas = {name: json.loads(text) for name, text in json_schemas().items()}
    tensor_schema = schemas["oip-v2-request.schema.json"]["$defs"]["InferTensor"]["properties"]
    assert tensor_schema["shape"]["maxItems"] == MAX_TENSOR_DIMS
    assert tensor_schema["name"]["maxLength"] == MAX_NAME_CHARS
    assert schemas["oip-v2-request.schema.json"]["properties"]["inputs"]["maxItems"] == MAX_TENSORS


# -- properties --------------------------------------------------------------------------------------------


@given(strategies().valid_records())
def test_a_valid_record_decodes_into_its_rows(generated: tuple[dict[str, Any], dict[str, Any]]) -> None:
    record_dict, expect = generated
    record = raw(json.dumps(record_dict).encode())
    outcome = decode_measured(DECODER, record)
    assert outcome.error is None, outcome.error
    check_outcome(outcome, record)
    queries = outcome.queries
    assert queries is not None and len(queries) == expect["batch"]
    for query in queries:
        if expect["width"]:
            assert query.vector is not None and query.vector.size == expect["width"]
        else:
            assert query.vector is None
        assert (query.text is not None) is expect["text"]
        if expect["classes"] is not None:
            assert query.probabilities is not None and query.probabilities.size == expect["classes"]


@given(strategies().records)
@example(SEEDS[0])
@example(b"")
@example(b"\xff\xfe{}")
@example(b'{"a": NaN}')
def test_any_record_is_decoded_or_rejected_cleanly(value: bytes) -> None:
    record = raw(value)
    check_outcome(decode_measured(DECODER, record), record)


@given(strategies().mutated_records(), st.integers(1, 8), st.integers(1, 16))
def test_tight_limits_hold_too(value: bytes, rows: int, features: int) -> None:
    limits = IngestSettings(max_batch_rows=rows, max_features=features)
    record = raw(value)
    outcome = decode_measured(RecordDecoder(limits), record)
    check_outcome(outcome, record, limits)
