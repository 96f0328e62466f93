"""RecordDecoder: OIP v2 and KServe v1 records into `Query` rows, and every dead-letter reason."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from detector.domain import DeadLetterReason, InvalidRecord, Origin, Query, RawRecord, Requested
from detector.ingest import RecordDecoder
from detector.schemas import EXAMPLE_RECORDS
from detector.settings import IngestSettings

T0 = "2026-11-29T08:00:00.123Z"
T0_EPOCH = datetime(2026, 11, 29, 8, 0, 0, 123000, tzinfo=UTC).timestamp()


def tensor(name: str, shape: list[int], datatype: str, data: list[Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data, **extra}


def features(data: list[Any], shape: list[int] | None = None, datatype: str = "FP32") -> dict[str, Any]:
    """An OIP request with one input tensor (a single row when no shape is given)."""
    return {"inputs": [tensor("features", shape or [1, len(data)], datatype, data)]}


def proba(data: list[Any], shape: list[int] | None = None, name: str = "predict_proba") -> dict[str, Any]:
    """An OIP response with one confidence output (a single row when no shape is given)."""
    return {"outputs": [tensor(name, shape or [1, len(data)], "FP32", data)]}


def record(request: dict[str, Any], response: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "event_id": "evt-1",
        "timestamp": T0,
        "model": {"name": "credit-risk", "version": "3"},
        "client": {"id": "key_8f2c", "ip": "203.0.113.7", "user_agent": "curl/8"},
        "request": request,
        "latency_ms": 12.5,
    }
    if response is not None:
        envelope["response"] = response
    envelope.update(fields)
    return envelope


def raw(value: dict[str, Any] | bytes) -> RawRecord:
    # json.dumps writes NaN and Infinity literals, as Python producers do.
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    # Received a second after the records' timestamp (T0), as a live stream would be.
    origin = Origin("file", "test.jsonl", 0, 1)
    return RawRecord(value=data, key=None, origin=origin, received_at=T0_EPOCH + 1)


def decode(value: dict[str, Any] | bytes, **limits: Any) -> list[Query]:
    return RecordDecoder(IngestSettings(**limits)).decode(raw(value))


def only(value: dict[str, Any] | bytes) -> Query:
    queries = decode(value)
    assert len(queries) == 1
    return queries[0]


def rows(queries: list[Query]) -> list[list[float]]:
    return [query.vector.tolist() for query in queries if query.vector is not None]


# -- Open Inference Protocol v2 requests ------------------------------------------------------------------


def test_single_row_with_probabilities() -> None:
    query = only(record(features([0.5, 1.25, -3.0, 7.0]), proba([0.25, 0.75])))
    assert query.event_id == "evt-1"
    assert (query.row, query.batch_size) == (0, 1)
    assert query.timestamp == pytest.approx(T0_EPOCH, abs=1e-6)
    assert (query.model, query.model_version) == ("credit-risk", "3")
    assert (query.client_id, query.client_ip, query.user_agent) == ("key_8f2c", "203.0.113.7", "curl/8")
    assert query.vector is not None and query.vector.dtype == np.float32
    assert query.vector.tolist() == [0.5, 1.25, -3.0, 7.0]
    assert query.text is None
    assert query.probabilities is not None and query.probabilities.dtype == np.float32
    assert query.probabilities.tolist() == [0.25, 0.75]
    assert query.label == "1"
    assert query.requested is Requested.PROBABILITIES


def test_nested_data_reads_like_flat_data() -> None:
    flat = decode(record(features([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3])))
    nested = decode(record(features([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [2, 3])))
    assert rows(flat) == rows(nested) == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def test_batch_becomes_one_query_per_row() -> None:
    request = features(list(range(12)), [3, 4])
    response = proba([0.9, 0.1, 0.2, 0.8, 0.6, 0.4], [3, 2])
    queries = decode(record(request, response))
    assert [(query.row, query.batch_size) for query in queries] == [(0, 3), (1, 3), (2, 3)]
    assert rows(queries) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [query.label for query in queries] == ["0", "1", "0"]
    assert [query.probabilities.tolist() for query in queries if query.probabilities is not None] == [
        pytest.approx([0.9, 0.1]),
        pytest.approx([0.2, 0.8]),
        pytest.approx([0.6, 0.4]),
    ]
    assert [query.is_first_row for query in queries] == [True, False, False]


def test_higher_rank_tensor_is_flattened_per_row() -> None:
    queries = decode(record(features([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], [2, 2, 2])))
    assert rows(queries) == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_one_dimensional_numeric_tensor_is_one_feature_per_row() -> None:
    queries = decode(record(features([1.5, 2.5, 3.5], [3])))
    assert rows(queries) == [[1.5], [2.5], [3.5]]
    assert [query.batch_size for query in queries] == [3, 3, 3]


def test_numeric_inputs_are_concatenated_in_input_order() -> None:
    request = {
        "inputs": [
            tensor("age", [2, 1], "INT64", [31, 47]),
            tensor("scores", [2, 2], "FP64", [0.5, 0.25, 1.5, 2.5]),
            tensor("member", [2], "BOOL", [True, False]),
        ]
    }
    assert rows(decode(record(request))) == [[31, 0.5, 0.25, 1], [47, 1.5, 2.5, 0]]


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP64", [0.1, 1e30], [np.float32(0.1), np.float32(1e30)]),
        ("FP16", [0.5, -2.0], [0.5, -2.0]),
        ("INT64", [-3, 9_007_199_254_740_993], [-3.0, np.float32(9_007_199_254_740_993)]),
        ("UINT64", [18_446_744_073_709_551_615, 0], [np.float32(18_446_744_073_709_551_615), 0.0]),
        ("INT8", [-128, 127], [-128.0, 127.0]),
        ("BOOL", [True, False], [1.0, 0.0]),
    ],
)
def test_numeric_datatypes_become_float32(datatype: str, data: list[Any], expected: list[float]) -> None:
    query = only(record(features(data, datatype=datatype)))
    assert query.vector is not None and query.vector.dtype == np.float32
    assert query.vector.tolist() == [float(value) for value in expected]


def test_bytes_inputs_are_texts() -> None:
    flat = decode(record({"inputs": [tensor("prompt", [2], "BYTES", ["hello", "world"])]}))
    column = decode(record({"inputs": [tensor("prompt", [2, 1], "BYTES", [["hello"], ["world"]])]}))
    assert [query.text for query in flat] == [query.text for query in column] == ["hello", "world"]
    assert all(query.vector is None for query in flat)


def test_several_bytes_inputs_are_joined_per_row() -> None:
    request = {
        "inputs": [
            tensor("system", [2], "BYTES", ["be brief", "be kind"]),
            tensor("user", [2, 1], "BYTES", ["hi", "bye"]),
        ]
    }
    assert [query.text for query in decode(record(request))] == ["be brief\nhi", "be kind\nbye"]


def test_several_bytes_elements_of_a_row_are_joined() -> None:
    request = {"inputs": [tensor("turns", [1, 2], "BYTES", [["a", "b"]])]}
    assert only(record(request)).text == "a\nb"


def test_a_row_may_have_both_vector_and_text() -> None:
    request = {
        "inputs": [
            tensor("prompt", [2], "BYTES", ["x", "y"]),
            tensor("temperature", [2, 1], "FP32", [0.5, 1.0]),
        ]
    }
    queries = decode(record(request))
    assert [
        (query.text, query.vector.tolist() if query.vector is not None else None) for query in queries
    ] == [
        ("x", [0.5]),
        ("y", [1.0]),
    ]


# -- KServe v1 requests -----------------------------------------------------------------------------------


def test_kserve_v1_list_instances() -> None:
    queries = decode(record({"instances": [[1, 2, 3], [4, 5, 6]]}))
    assert rows(queries) == [[1, 2, 3], [4, 5, 6]]
    assert [(query.row, query.batch_size) for query in queries] == [(0, 2), (1, 2)]


def test_kserve_v1_nested_instances_are_flattened() -> None:
    assert rows(decode(record({"instances": [[[1, 2], [3, 4]]]}))) == [[1, 2, 3, 4]]


def test_kserve_v1_number_instances_are_one_feature_each() -> None:
    assert rows(decode(record({"instances": [1.5, 2]}))) == [[1.5], [2.0]]


def test_kserve_v1_dict_instances_use_sorted_names() -> None:
    queries = decode(record({"instances": [{"b": 2, "a": 1, "c": 3}, {"c": 6, "a": 4, "b": 5}]}))
    assert rows(queries) == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    "instances",
    [["great", "awful"], [{"text": "great"}, {"text": "awful"}], [{"prompt": "great"}, {"prompt": "awful"}]],
)
def test_kserve_v1_text_instances(instances: list[Any]) -> None:
    queries = decode(record({"instances": instances}))
    assert [query.text for query in queries] == ["great", "awful"]
    assert all(query.vector is None for query in queries)


def test_kserve_v1_inputs_alias() -> None:
    assert rows(decode(record({"inputs": [[1, 2], [3, 4]]}))) == [[1, 2], [3, 4]]
    assert rows(decode(record({"inputs": [{"y": 2, "x": 1}]}))) == [[1, 2]]


def test_broken_oip_tensor_is_not_read_as_kserve_v1_inputs() -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 2], "data": [1, 2]}]}
    with pytest.raises(InvalidRecord) as caught:
        decode(record(body))
    assert caught.value.reason is DeadLetterReason.SCHEMA_VIOLATION
    assert caught.value.detail == "request.inputs[0].datatype: Field required"


# -- responses --------------------------------------------------------------------------------------------


def test_label_output_gives_the_label() -> None:
    response = {"outputs": [tensor("predict", [2], "INT64", [3, 0])]}
    queries = decode(record(features([1, 2, 3, 4], [2, 2]), response))
    assert [query.label for query in queries] == ["3", "0"]
    assert all(query.probabilities is None for query in queries)


def test_label_and_probabilities_outputs_together() -> None:
    response = {
        "outputs": [
            tensor("predict", [2, 1], "BYTES", [["cat"], ["dog"]]),
            tensor("predict_proba", [2, 2], "FP64", [0.6, 0.4, 0.3, 0.7]),
        ]
    }
    queries = decode(record(features([1, 2, 3, 4], [2, 2]), response))
    assert [query.label for query in queries] == ["cat", "dog"]
    assert [query.probabilities.tolist() for query in queries if query.probabilities is not None] == [
        pytest.approx([0.6, 0.4]),
        pytest.approx([0.3, 0.7]),
    ]


@pytest.mark.parametrize(
    ("output", "label", "probabilities"),
    [
        (tensor("output_0", [1, 3], "FP32", [0.1, 0.7, 0.2]), "1", [0.1, 0.7, 0.2]),
        (tensor("scores", [1, 2], "FP32", [0.9, 0.1]), "0", [0.9, 0.1]),
        (tensor("probs", [1, 2], "FP32", [[0.2, 0.8]]), "1", [0.2, 0.8]),
        (tensor("output_0", [1], "INT32", [4]), "4", None),
        (tensor("output_0", [1, 1], "BYTES", [["spam"]]), "spam", None),
        (tensor("label", [1], "FP32", [2.0]), "2", None),
        (tensor("predict", [1], "BOOL", [True]), "1", None),
        (tensor("embedding_norm", [1], "FP32", [0.3]), None, None),
        # A binary classifier's score for class 1 (XGBoost, LightGBM boosters): label and confidences.
        (tensor("predict", [1], "FP32", [0.73]), "1", [0.27, 0.73]),
        (tensor("predict", [1], "FP64", [0.25]), "0", [0.75, 0.25]),
        (tensor("probabilities", [1, 1], "FP32", [0.5]), "1", [0.5, 0.5]),
        # A regression value is no class: changes of it are no label flips.
        (tensor("predict", [1], "FP32", [3.5]), None, None),
        (tensor("predict", [1], "FP32", [-0.2]), None, None),
        # One confidence a row outside [0, 1] (a margin) stays as it is, with no label.
        (tensor("scores", [1, 1], "FP32", [-1.5]), None, [-1.5]),
    ],
)
def test_oip_response_outputs(
    output: dict[str, Any], label: str | None, probabilities: list[float] | None
) -> None:
    query = only(record(features([1.0, 2.0]), {"outputs": [output]}))
    assert query.label == label
    if probabilities is None:
        assert query.probabilities is None
    else:
        assert query.probabilities is not None
        assert query.probabilities.tolist() == pytest.approx(probabilities)


@pytest.mark.parametrize(
    ("predictions", "labels", "probabilities"),
    [
        ([1, 0], ["1", "0"], [None, None]),
        (["cat", "dog"], ["cat", "dog"], [None, None]),
        ([1.0, True], ["1", "1"], [None, None]),
        ([[0.2, 0.8], [0.7, 0.3]], ["1", "0"], [[0.2, 0.8], [0.7, 0.3]]),
        (
            [{"label": "cat", "probabilities": [0.9, 0.1]}, {"label": "dog", "probabilities": [0.4, 0.6]}],
            ["cat", "dog"],
            [[0.9, 0.1], [0.4, 0.6]],
        ),
        (
            [{"scores": [0.1, 0.9]}, {"scores": [0.8, 0.2]}],
            ["1", "0"],
            [[0.1, 0.9], [0.8, 0.2]],
        ),
        (
            [
                {"labels": ["pos", "neg"], "scores": [0.3, 0.7]},
                {"labels": ["pos", "neg"], "scores": [0.6, 0.4]},
            ],
            ["neg", "pos"],
            [[0.3, 0.7], [0.6, 0.4]],
        ),
        (
            [
                {"classes": ["a", "b", "c"], "probs": [0.1, 0.2, 0.7]},
                {"classes": ["a", "b", "c"], "probs": [1, 0, 0]},
            ],
            ["c", "a"],
            [[0.1, 0.2, 0.7], [1.0, 0.0, 0.0]],
        ),
        (
            [{"probabilities": {"yes": 0.8, "no": 0.2}}, {"probabilities": {"no": 0.9, "yes": 0.1}}],
            ["yes", "no"],
            [[0.2, 0.8], [0.9, 0.1]],
        ),
        ([{"class": 2}, {"class": 5}], ["2", "5"], [None, None]),
        # Binary classifiers' scores for class 1 (XGBoost and LightGBM servers answer so).
        ([0.73, 0.12], ["1", "0"], [[0.27, 0.73], [0.88, 0.12]]),
        ([{"prediction": 0.9}, {"prediction": 1}], ["1", "1"], [[0.1, 0.9], None]),
        # Regression values: neither a class nor confidences.
        ([3.5, -120.25], [None, None], [None, None]),
    ],
)
def test_kserve_v1_predictions(
    predictions: list[Any], labels: list[str], probabilities: list[list[float] | None]
) -> None:
    queries = decode(record({"instances": [[1, 2], [3, 4]]}, {"predictions": predictions}))
    assert [query.label for query in queries] == labels
    got = [None if query.probabilities is None else query.probabilities.tolist() for query in queries]
    assert got == [None if expected is None else pytest.approx(expected) for expected in probabilities]
    assert all(query.probabilities is None or query.probabilities.dtype == np.float32 for query in queries)


def test_absent_response() -> None:
    query = only(record(features([1.0])))
    assert (query.label, query.probabilities) == (None, None)
    assert query.requested is Requested.LABEL


# -- what the client asked for ----------------------------------------------------------------------------


def asked(request: dict[str, Any], response: dict[str, Any] | None = None) -> Requested:
    return only(record(request, response)).requested


def with_outputs(*names: str, **parameters: Any) -> dict[str, Any]:
    return {**features([1.0, 2.0]), "outputs": [{"name": name} for name in names], "parameters": parameters}


@pytest.mark.parametrize(
    ("request_body", "expected"),
    [
        (with_outputs("predict"), Requested.LABEL),
        (with_outputs("label"), Requested.LABEL),
        (with_outputs("predict_proba"), Requested.PROBABILITIES),
        (with_outputs("logits"), Requested.PROBABILITIES),
        (with_outputs("predict", "probabilities"), Requested.PROBABILITIES),
        (with_outputs("predict", top_k=5), Requested.TOP_K),
        (with_outputs("predict", topk=3), Requested.TOP_K),
        (with_outputs("predict", top_k=1), Requested.LABEL),
        (with_outputs("predict_proba", logprobs=True), Requested.LOGPROBS),
        (with_outputs("predict", top_logprobs=2), Requested.LOGPROBS),
        (with_outputs("predict", top_k=5, logprobs=True), Requested.LOGPROBS),
        (
            {**features([1.0]), "outputs": [{"name": "predict", "parameters": {"top_k": 4}}]},
            Requested.TOP_K,
        ),
        ({"instances": [[1.0]], "parameters": {"top_k": 10}}, Requested.TOP_K),
        ({"instances": [[1.0]], "parameters": {"logprobs": 1}}, Requested.LOGPROBS),
    ],
)
def test_requested_from_the_request(request_body: dict[str, Any], expected: Requested) -> None:
    # The response returns confidences, so a LABEL answer can only come from the request.
    response = proba([0.4, 0.6]) if "inputs" in request_body else {"predictions": [[0.4, 0.6]]}
    assert asked(request_body, response) is expected


def test_requested_inferred_from_the_response_when_the_request_does_not_say() -> None:
    assert asked(with_outputs("output_0"), proba([0.4, 0.6])) is Requested.PROBABILITIES
    assert asked(features([1.0]), {"outputs": [tensor("predict", [1], "INT64", [1])]}) is Requested.LABEL
    assert asked({"instances": [[1.0]]}, {"predictions": [[0.4, 0.6]]}) is Requested.PROBABILITIES
    assert asked({"instances": [[1.0]]}, {"predictions": ["yes"]}) is Requested.LABEL
    # A score reveals as much as probabilities do.
    assert asked({"instances": [[1.0]]}, {"predictions": [0.73]}) is Requested.PROBABILITIES
    assert (
        asked(features([1.0]), {"outputs": [tensor("predict", [1], "FP32", [0.73])]})
        is Requested.PROBABILITIES
    )


# -- timestamps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (T0, T0_EPOCH),
        ("2026-11-29T10:00:00.123+02:00", T0_EPOCH),
        (T0_EPOCH, T0_EPOCH),
        (1764403200, 1764403200.0),
    ],
)
def test_timestamps_are_epoch_seconds(timestamp: str | float, expected: float) -> None:
    assert only(record(features([1.0]), timestamp=timestamp)).timestamp == pytest.approx(expected, abs=1e-6)


@pytest.fixture
def local_zone_ahead_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "IST-5:30")  # a POSIX rule: needs no tz database
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_zone_ahead_of_utc")
def test_naive_timestamps_are_utc_whatever_the_local_zone() -> None:
    query = only(record(features([1.0]), timestamp="2026-11-29T08:00:00.123"))
    assert query.timestamp == pytest.approx(T0_EPOCH, abs=1e-6)


def test_example_records_decode() -> None:
    oip, kserve = (decode(example) for example in EXAMPLE_RECORDS)
    assert oip[0].label == "1" and oip[0].vector is not None and oip[0].vector.shape == (4,)
    assert [query.text for query in kserve] == ["great product", "arrived broken"]
    assert [query.label for query in kserve] == ["positive", "negative"]
    assert kserve[0].model_version == "7"


# -- dead letters -----------------------------------------------------------------------------------------

OK_REQUEST = features([1.0, 2.0])


def invalid_utf8() -> bytes:
    return json.dumps(record(OK_REQUEST)).encode().replace(b"evt-1", b"evt-\xff")


def no_field(name: str) -> dict[str, Any]:
    envelope = record(OK_REQUEST)
    del envelope[name]
    return envelope


R = DeadLetterReason


def case(
    case_id: str, value: dict[str, Any] | bytes, reason: DeadLetterReason, fragment: str, **limits: Any
) -> Any:
    """A dead-letter case: the record, the reason expected, and text the detail must contain."""
    return pytest.param(value, limits, reason, fragment, id=case_id)


def with_data(data: list[Any], datatype: str = "FP32") -> dict[str, Any]:
    return record(features(data, datatype=datatype))


def with_response(response: dict[str, Any]) -> dict[str, Any]:
    return record(OK_REQUEST, response)


DEAD_LETTERS = [
    case("too-large", record(OK_REQUEST), R.RECORD_TOO_LARGE, "max_record_bytes (64)", max_record_bytes=64),
    case("latin-1", invalid_utf8(), R.INVALID_ENCODING, "not UTF-8"),
    case("utf-16", json.dumps(record(OK_REQUEST)).encode("utf-16"), R.INVALID_ENCODING, "at byte 0"),
    case("truncated", b'{"event_id": "evt-1", ', R.INVALID_JSON, "Invalid JSON"),
    case("trailing-comma", b'{"event_id": "evt-1",}', R.INVALID_JSON, "Invalid JSON"),
    case("empty", b"", R.INVALID_JSON, "Invalid JSON"),
    case("array", b"[1, 2]", R.INVALID_JSON, "an array, not a JSON object"),
    case("string", b'"evt-1"', R.INVALID_JSON, "a string, not a JSON object"),
    case("no-event-id", no_field("event_id"), R.SCHEMA_VIOLATION, "event_id: Field required"),
    case("no-client", no_field("client"), R.SCHEMA_VIOLATION, "client: Field required"),
    case("no-request", no_field("request"), R.SCHEMA_VIOLATION, "request: Field required"),
    case("bad-timestamp", record(OK_REQUEST, timestamp="yesterday"), R.SCHEMA_VIOLATION, "timestamp"),
    case(
        "year-9999",
        record(OK_REQUEST, timestamp="9999-12-31T23:59:59Z"),
        R.IMPLAUSIBLE_TIMESTAMP,
        "ahead of its receipt, more than ingest.max_future_seconds (86400)",
    ),
    case(
        "two-days-ahead",
        record(OK_REQUEST, timestamp=T0_EPOCH + 2 * 86_400),
        R.IMPLAUSIBLE_TIMESTAMP,
        "172799 s ahead of its receipt",
    ),
    case("year-0001", record(OK_REQUEST, timestamp="0001-01-01T00:00:00Z"), R.IMPLAUSIBLE_TIMESTAMP, "1970"),
    case("negative-epoch", record(OK_REQUEST, timestamp=-1.5), R.IMPLAUSIBLE_TIMESTAMP, "before 1970-01-01"),
    case(
        "too-old",
        record(OK_REQUEST, timestamp=T0_EPOCH - 3600),
        R.IMPLAUSIBLE_TIMESTAMP,
        "3601 s before its receipt, more than ingest.max_age_seconds (600)",
        max_age_seconds=600,
    ),
    case(
        "nul-in-client-id",
        record(OK_REQUEST, client={"id": "key\u0000x"}),
        R.SCHEMA_VIOLATION,
        "client.id: contains a NUL character, which cannot be stored",
    ),
    case("huge-epoch", record(OK_REQUEST, timestamp=1e20), R.SCHEMA_VIOLATION, "epoch seconds out of range"),
    case("client-id-number", record(OK_REQUEST, client={"id": 7}), R.SCHEMA_VIOLATION, "client.id"),
    case(
        "empty-request", record({}), R.SCHEMA_VIOLATION, "request: neither an Open Inference Protocol v2 body"
    ),
    case(
        "shape-not-list",
        record({"inputs": [{"name": "x", "shape": 2, "datatype": "FP32", "data": [1.0, 2.0]}]}),
        R.SCHEMA_VIOLATION,
        "request.inputs[0].shape",
    ),
    case("strings-as-fp32", with_data(["1.5", "2"]), R.SCHEMA_VIOLATION, "a string at flat index 0"),
    case("null-in-fp32", with_data([1.0, None]), R.SCHEMA_VIOLATION, "null at flat index 1"),
    case("object-in-int", with_data([{"a": 1}], "INT32"), R.SCHEMA_VIOLATION, "an object at flat index 0"),
    case("numbers-as-bytes", with_data([3], "BYTES"), R.SCHEMA_VIOLATION, "a number at index 0"),
    case("empty-batch", record(features([], [0, 3])), R.SCHEMA_VIOLATION, "empty batch"),
    case("negative-dimension", record(features([1.0], [1, -1])), R.SCHEMA_VIOLATION, "negative dimension"),
    case("no-values", record(features([], [1, 0])), R.SCHEMA_VIOLATION, "the rows hold no values"),
    case("no-instances", record({"instances": []}), R.SCHEMA_VIOLATION, "request.instances"),
    case(
        "bool-instance", record({"instances": [True]}), R.SCHEMA_VIOLATION, "request.instances[0]: a boolean"
    ),
    case("mixed-instances", record({"instances": ["a", 1]}), R.SCHEMA_VIOLATION, "a number at index 1"),
    case(
        "null-prediction", with_response({"predictions": [None]}), R.SCHEMA_VIOLATION, "predictions[0]: null"
    ),
    case("response-without-outputs", with_response({"id": "r"}), R.SCHEMA_VIOLATION, "response: neither"),
    case(
        "bytes-probabilities",
        with_response({"outputs": [tensor("probs", [1, 2], "BYTES", ["a", "b"])]}),
        R.SCHEMA_VIOLATION,
        "BYTES where class confidences are expected",
    ),
    case("fp8", with_data([1.0], "FP8"), R.UNSUPPORTED_DATATYPE, "datatype 'FP8' is not one of"),
    case("lowercase", with_data([1.0], "fp32"), R.UNSUPPORTED_DATATYPE, "datatype 'fp32'"),
    case(
        "response-datatype",
        with_response({"outputs": [tensor("predict", [1], "STRING", ["a"])]}),
        R.UNSUPPORTED_DATATYPE,
        "response.outputs[0] ('predict')",
    ),
    case("too-few-elements", record(features([1.0, 2.0], [1, 3])), R.SHAPE_MISMATCH, "(3 expected)"),
    case("too-many-elements", record(features([1.0, 2.0, 3.0], [1, 2])), R.SHAPE_MISMATCH, "(2 expected)"),
    case("ragged-data", record(features([[1.0, 2.0], [3.0]], [2, 2])), R.SHAPE_MISMATCH, "ragged"),
    case("ragged-leaf", record(features([1.0, [2.0]], [1, 2])), R.SHAPE_MISMATCH, "ragged"),
    case(
        "ragged-texts",
        record({"inputs": [tensor("t", [2], "BYTES", [["a"], "b"])]}),
        R.SHAPE_MISMATCH,
        "ragged",
    ),
    case("ragged-instances", record({"instances": [[1, 2], [3]]}), R.SHAPE_MISMATCH, "ragged"),
    case(
        "instance-names-differ",
        record({"instances": [{"a": 1, "b": 2}, {"a": 1, "c": 2}]}),
        R.SHAPE_MISMATCH,
        "request.instances[1]: feature names differ",
    ),
    case(
        "inputs-disagree-on-batch",
        record(
            {"inputs": [tensor("a", [2, 1], "FP32", [1.0, 2.0]), tensor("b", [3], "FP32", [1.0, 2.0, 3.0])]}
        ),
        R.SHAPE_MISMATCH,
        "request.inputs[1] ('b'): batch of 3 (shape [3]) where 2 is expected",
    ),
    case(
        "oip-response-rows",
        record(features([1.0, 2.0], [2, 1]), proba([0.1, 0.9], [1, 2])),
        R.SHAPE_MISMATCH,
        "('predict_proba'): batch of 1 (shape [1, 2]) where 2 is expected",
    ),
    case(
        "kserve-response-rows",
        record({"instances": [[1.0], [2.0]]}, {"predictions": [1]}),
        R.SHAPE_MISMATCH,
        "1 prediction(s) for a batch of 2",
    ),
    case(
        "label-not-one-per-row",
        with_response({"outputs": [tensor("predict", [1, 2], "INT64", [1, 0])]}),
        R.SHAPE_MISMATCH,
        "not one label per row",
    ),
    case("too-wide", with_data([1.0] * 5), R.SHAPE_MISMATCH, "max_features (4)", max_features=4),
    case(
        "too-wide-instances", record({"instances": [[1.0] * 5]}), R.SHAPE_MISMATCH, "5 values", max_features=4
    ),
    case("nan", with_data([1.0, float("nan")]), R.NON_FINITE, "('features'): NaN at flat index 1"),
    case("infinity", with_data([float("inf"), 1.0]), R.NON_FINITE, ": Infinity at flat index 0"),
    case("minus-infinity", with_data([1.0, -float("inf")]), R.NON_FINITE, "-Infinity at flat index 1"),
    case(
        "overflowing-literal",
        json.dumps(with_data([1.0, 2.0])).encode().replace(b"2.0", b"1e999"),
        R.NON_FINITE,
        "Infinity at flat index 1",
    ),
    case("beyond-float32", with_data([1e39], "FP64"), R.NON_FINITE, "beyond the float32 range"),
    case(
        "huge-integer",
        with_data([10**400], "INT64"),
        R.NON_FINITE,
        "beyond the float32 range at flat index 0",
    ),
    case("nan-instance", record({"instances": [[float("nan")]]}), R.NON_FINITE, "request.instances: NaN"),
    case(
        "nan-probability", with_response(proba([float("nan"), 0.5])), R.NON_FINITE, "('predict_proba'): NaN"
    ),
    case(
        "nan-prediction",
        record({"instances": [[1.0]]}, {"predictions": [[0.5, float("nan")]]}),
        R.NON_FINITE,
        "response.predictions: NaN at flat index 1",
    ),
    case("nan-label", with_response({"predictions": [float("nan")]}), R.NON_FINITE, "NaN as a label"),
    case(
        "batch-too-large",
        record(features([1.0, 2.0, 3.0], [3, 1])),
        R.BATCH_TOO_LARGE,
        "max_batch_rows (2)",
        max_batch_rows=2,
    ),
    case(
        "too-many-instances",
        record({"instances": [[1.0], [2.0], [3.0]]}),
        R.BATCH_TOO_LARGE,
        "batch of 3 rows",
        max_batch_rows=2,
    ),
]


@pytest.mark.parametrize(("value", "limits", "reason", "fragment"), DEAD_LETTERS)
def test_dead_letter(
    value: dict[str, Any] | bytes, limits: dict[str, Any], reason: DeadLetterReason, fragment: str
) -> None:
    with pytest.raises(InvalidRecord) as caught:
        decode(value, **limits)
    assert caught.value.reason is reason, caught.value.detail
    assert fragment in caught.value.detail
    assert "\n" not in caught.value.detail and caught.value.detail == caught.value.detail.strip()


def test_every_dead_letter_reason_is_tested() -> None:
    # A conflicting duplicate takes the ledger of processed events: the pipeline's tests cover it.
    assert {param.values[2] for param in DEAD_LETTERS} == set(DeadLetterReason) - {R.CONFLICTING_DUPLICATE}


def test_datasets_have_no_receipt_time_to_check_against() -> None:
    # `train` and `evaluate` read labelled files whose timestamps may lie anywhere (days ahead, say).
    ahead = json.dumps(record(OK_REQUEST, timestamp=T0_EPOCH + 30 * 86_400)).encode()
    with pytest.raises(InvalidRecord):
        RecordDecoder(IngestSettings()).decode(raw(ahead))
    assert len(RecordDecoder(IngestSettings().for_datasets()).decode(raw(ahead))) == 1


def test_a_record_exactly_at_the_size_limit_passes() -> None:
    value = json.dumps(record(OK_REQUEST)).encode()
    assert len(decode(value, max_record_bytes=len(value))) == 1
    with pytest.raises(InvalidRecord) as caught:
        decode(value, max_record_bytes=len(value) - 1)
    assert caught.value.reason is DeadLetterReason.RECORD_TOO_LARGE


def test_a_record_too_large_to_read_still_names_its_client_and_model() -> None:
    # An attack tool batching past the limit goes unanalysed: its dead letter must at least say who sent it,
    # wherever the record names them (here after 5,000 bytes of tensor) and however odd the id.
    fields = record(OK_REQUEST, padding="x" * 5000, client={"id": "tool\n7"})
    value = json.dumps(
        {key: fields[key] for key in sorted(fields, key=lambda key: key in ("model", "client"))}
    )
    assert value.index('"client"') > 5000
    with pytest.raises(InvalidRecord) as caught:
        decode(value.encode(), max_record_bytes=1000)
    assert caught.value.reason is DeadLetterReason.RECORD_TOO_LARGE
    assert caught.value.detail == (
        f"record is {len(value)} bytes, more than ingest.max_record_bytes (1000), "
        "from client 'tool\\n7' of model 'credit-risk'"
    )
    # Only its first bytes read (a JSON Lines line past the limit), or no contract's names: its size alone.
    cut = RawRecord(
        value.encode()[:1002], None, Origin("file", "t", 0, 1), T0_EPOCH + 1, full_size=len(value)
    )
    unnamed = json.dumps({"client": 7, "padding": "x" * 5000}).encode()
    for tried in (cut, raw(unnamed)):
        with pytest.raises(InvalidRecord) as caught:
            RecordDecoder(IngestSettings(max_record_bytes=1000)).decode(tried)
        assert (
            caught.value.detail == f"record is {tried.size} bytes, more than ingest.max_record_bytes (1000)"
        )


def test_an_attack_tools_batch_of_images_is_read_under_the_default_limits() -> None:
    # Attack tools query in batches (128 rows by default in the Adversarial Robustness Toolbox's black-box
    # classifier): 128 images of 32x32x3 float32 values in [0, 1], written as a model server logs them.
    images = np.random.default_rng(7).random((128, 32 * 32 * 3), dtype=np.float32)
    scores = np.full((128, 10), 0.1, dtype=np.float32)
    value = json.dumps(
        record(features(images.ravel().tolist(), [128, 3072]), proba(scores.ravel().tolist(), [128, 10]))
    ).encode()
    assert len(value) > 7_900_000
    queries = RecordDecoder(IngestSettings()).decode(raw(value))
    assert len(queries) == 128
    assert all(query.vector is not None and query.vector.shape == (3072,) for query in queries)


def test_schema_detail_names_the_field_without_union_member_names() -> None:
    with pytest.raises(InvalidRecord) as caught:
        decode(record({"instances": "not a list"}))
    assert caught.value.detail == "request.instances: Input should be a valid array"


def test_tensor_names_cannot_break_the_detail_line() -> None:
    request = {"inputs": [tensor("evil\nname", [1, 1], "FP32", [float("nan")])]}
    with pytest.raises(InvalidRecord) as caught:
        decode(record(request))
    assert "\n" not in caught.value.detail
    assert "'evil\\nname'" in caught.value.detail
