"""Hostile input for the decoder and the pipeline: seed records, hypothesis strategies that generate valid,
mutated and arbitrary records, and the checks every decoded record or rejection must pass.

Shared by the property tests (tests/ingest/test_hostile.py, tests/pipeline/test_hostile.py) and the fuzz
target (tests/fuzz/decode_fuzz.py), which imports only what needs no hypothesis.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import math
import time
import tracemalloc
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from detector.domain import DeadLetterReason, InvalidRecord, Origin, Query, RawRecord, Requested, rfc3339
from detector.ingest.decode import MAX_LABEL_CHARS, RecordDecoder
from detector.ingest.wire import Envelope, from_contract, read_envelope
from detector.schemas import EXAMPLE_RECORDS, MAX_NAME_CHARS, MAX_TENSOR_DIMS, QueryLogRecord
from detector.settings import IngestSettings
from detector.simulate.sample import START, sample_records

# Every record is received an hour into the sample stream: the examples and the sample lie before it.
RECEIVED_AT = START + 3600.0
LIMITS = IngestSettings()
# Reasons the decoder gives; a conflicting duplicate needs the ledger of processed events (the pipeline's).
DECODER_REASONS = frozenset(DeadLetterReason) - {DeadLetterReason.CONFLICTING_DUPLICATE}
MAX_DETAIL_CHARS = 1000  # what a dead letter keeps of a detail
MiB = 1024 * 1024


def raw(value: bytes, position: int = 1) -> RawRecord:
    """`value` as a record read from a file at line `position`, received at `RECEIVED_AT`."""
    return RawRecord(value, None, Origin("file", "hostile.jsonl", 0, position), RECEIVED_AT)


def seed_records() -> list[bytes]:
    """Valid records of every shape the decoder reads, and a few malformed ones: the published examples and
    a slice of the sample stream."""
    examples = [json.dumps(example).encode() for example in EXAMPLE_RECORDS]
    return examples + list(sample_records(clients=5, events=60, malformed_every=9))


# -- what must hold ------------------------------------------------------------------------------------------


def check_queries(queries: list[Query], record: RawRecord, limits: IngestSettings = LIMITS) -> None:
    """The invariants of a decoded record: one query per row in row order, sharing the envelope; vectors and
    probabilities finite float32, of one width per record; bounded texts and labels."""
    assert queries, "a decoded record has at least one row"
    batch = len(queries)
    assert batch <= limits.max_batch_rows
    first = queries[0]
    widths = set()
    for row, query in enumerate(queries):
        assert (query.row, query.batch_size) == (row, batch)
        assert (query.event_id, query.timestamp, query.model, query.client_id) == (
            first.event_id,
            first.timestamp,
            first.model,
            first.client_id,
        )
        for text in (query.event_id, query.model, query.client_id):
            assert isinstance(text, str) and 1 <= len(text) <= 256 and "\x00" not in text
        assert math.isfinite(query.timestamp) and query.timestamp >= 0
        if limits.max_future_seconds is not None:
            assert query.timestamp - record.received_at <= limits.max_future_seconds
        assert isinstance(query.requested, Requested)
        assert query.vector is not None or query.text is not None, "a row holds values"
        if query.vector is not None:
            check_vector(query.vector)
            widths.add(query.vector.size)
            assert 1 <= query.vector.size <= limits.max_features
        if query.probabilities is not None:
            check_vector(query.probabilities)
            assert 1 <= query.probabilities.size <= limits.max_features
        assert query.text is None or isinstance(query.text, str)
        assert query.label is None or (isinstance(query.label, str) and len(query.label) <= MAX_LABEL_CHARS)
    assert len(widths) <= 1, f"rows of one record have different widths: {widths}"


def by_contract(value: bytes) -> Envelope | None:
    """The envelope of `value` as the published contract reads it; None when it rejects it."""
    try:
        return from_contract(QueryLogRecord.model_validate_json(value))
    except ValidationError:
        return None


def check_strict_reading(value: bytes) -> Envelope | None:
    """The strict reading of `value` (msgspec), checked to be the contract's reading whenever it takes it."""
    strict = read_envelope(value)
    if strict is not None:
        assert by_contract(value) == strict, "the strict reading took what the contract reads otherwise"
    return strict


def check_vector(vector: np.ndarray) -> None:
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.ndim == 1
    assert bool(np.isfinite(vector).all())


def check_rejection(error: InvalidRecord) -> None:
    """A rejection the pipeline can store and show: a known reason and one short, printable line."""
    assert error.reason in DECODER_REASONS, error.reason
    detail = error.detail
    assert detail and detail == detail.strip(), repr(detail)
    assert len(detail) <= MAX_DETAIL_CHARS, len(detail)
    unprintable = [char for char in detail if unicodedata.category(char) in {"Cc", "Cf", "Cs", "Zl", "Zp"}]
    assert not unprintable, f"control characters {unprintable!r} in {detail!r}"


@dataclass(frozen=True)
class Outcome:
    """What decoding one record did: its queries or its rejection, the CPU time and the peak memory."""

    queries: list[Query] | None
    error: InvalidRecord | None
    cpu_seconds: float
    peak_bytes: int


def decode_measured(decoder: RecordDecoder, record: RawRecord) -> Outcome:
    """Decode `record`, measuring CPU time and the peak of memory allocated meanwhile (tracemalloc: Python
    objects and numpy arrays). Any exception other than `InvalidRecord` propagates.

    The garbage collector is held meanwhile: a full collection of the test's heap, whenever it falls, is not
    the record's cost."""
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    collecting = gc.isenabled()
    gc.disable()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        started = time.process_time()
        queries: list[Query] | None = None
        error: InvalidRecord | None = None
        try:
            queries = decoder.decode(record)
        except InvalidRecord as rejected:
            error = rejected
        cpu = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if collecting:
            gc.enable()
        if started_tracing:
            tracemalloc.stop()
    return Outcome(queries, error, cpu, max(0, peak - before))


def check_outcome(outcome: Outcome, record: RawRecord, limits: IngestSettings = LIMITS) -> None:
    """Either valid queries or a clean rejection, in bounded time and memory for the record's size."""
    if outcome.error is not None:
        check_rejection(outcome.error)
    else:
        assert outcome.queries is not None
        check_queries(outcome.queries, record, limits)
    size = len(record.value)
    # Parsed JSON is Python objects: up to ~40 bytes each for a 2-byte `[]` or `{}`, and a rejected record
    # nested 200 deep costs pydantic's error report about 2 MiB; nothing beyond that.
    assert outcome.peak_bytes <= 4 * MiB + 64 * size, (outcome.peak_bytes, size)
    assert outcome.cpu_seconds <= 0.5 + 4.0 * size / MiB, (outcome.cpu_seconds, size)


# -- hypothesis strategies (built lazily: the fuzz target needs none) --------------------------------------


def strategies() -> Any:
    """The hypothesis strategies of this module, as a namespace (built on first use)."""
    global _STRATEGIES
    if _STRATEGIES is None:
        _STRATEGIES = _build_strategies()
    return _STRATEGIES


_STRATEGIES: Any = None


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _parent(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        value = value[step]
    return value


def _build_strategies() -> Any:
    from types import SimpleNamespace

    from hypothesis import strategies as st

    floats32 = st.floats(-3e38, 3e38, allow_nan=False, allow_infinity=False)
    # Numbers that break naive code: float32 and float64 edges, 2**31 and 2**63, values beyond any float.
    edge_numbers = st.sampled_from(
        [
            0,
            -0.0,
            -1,
            1,
            2**31,
            -(2**31) - 1,
            2**63,
            2**64,
            10**30,
            10**400,
            -(10**400),
            1e39,
            -1e39,
            5e-324,
            3.4028235e38,
            1.7976931348623157e308,
            1e9,
            float("nan"),
            float("inf"),
            float("-inf"),
        ]
    )
    numbers = st.one_of(st.integers(), st.floats(), edge_numbers)
    # Any text: controls, NUL, line separators, bidi overrides, astral characters (surrogates go in as
    # escapes, see `mutated_records`: Python's json cannot write them raw to UTF-8).
    texts = st.one_of(
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.sampled_from(["", "\x00", "a\x00b", "\n", "\u2028", "\u202e", "\ufeff", "\U0001f600", "\x1b[2J"]),
        st.integers(200, 3000).map(lambda n: "x" * n),
    )
    leaves = st.one_of(st.none(), st.booleans(), numbers, texts)

    def deep(value: Any, depth: int, as_object: bool) -> Any:
        for _ in range(depth):
            value = {"a": value} if as_object else [value]
        return value

    json_values = st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=6),
            st.dictionaries(st.one_of(st.text(max_size=12), texts), children, max_size=6),
        ),
        max_leaves=30,
    )
    # Shape dimensions beyond 32 and 64 bits, or whose products have more digits than Python prints.
    dimensions = st.sampled_from([0, 1, 2, 3, -1, 4096, 65_537, 2**31, 2**63, 10**300, 10**4000])
    hostile_values = st.one_of(
        json_values,
        edge_numbers,
        st.builds(deep, leaves, st.integers(150, 260), st.booleans()),
        st.lists(st.integers(0, 3), min_size=300, max_size=3000),
        st.lists(st.sampled_from([[], {}, None, "a", [1]]), min_size=100, max_size=2000),
        st.lists(dimensions, min_size=1, max_size=40),
    )

    @st.composite
    def timestamps(draw: Any) -> Any:
        moment = RECEIVED_AT - draw(st.floats(-3600.0, 30 * 86_400.0))
        return rfc3339(moment) if draw(st.booleans()) else moment

    def tensor(name: str, shape: list[int], datatype: str, data: list[Any], nested: bool) -> dict[str, Any]:
        if nested and len(shape) > 1:
            data = np.asarray(data, dtype=object).reshape(shape).tolist()
        return {"name": name, "shape": shape, "datatype": datatype, "data": data}

    @st.composite
    def numeric_tensor(draw: Any, batch: int, index: int) -> tuple[dict[str, Any], int]:
        dims = draw(st.lists(st.integers(1, 4), max_size=2))
        per_row = math.prod(dims)
        datatype = draw(st.sampled_from(["FP16", "FP32", "FP64", "INT8", "INT32", "INT64", "UINT8", "BOOL"]))
        values = (
            st.booleans()
            if datatype == "BOOL"
            else floats32
            if datatype.startswith("FP")
            else st.integers(-(2**31), 2**31)
        )
        data = draw(st.lists(values, min_size=batch * per_row, max_size=batch * per_row))
        return tensor(f"in{index}", [batch, *dims], datatype, data, draw(st.booleans())), per_row

    @st.composite
    def valid_records(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A record the decoder must accept, and what it must decode into: batch, width, text, classes."""
        batch = draw(st.integers(1, 6))
        expect: dict[str, Any] = {"batch": batch, "width": 0, "text": False, "classes": None}
        ids = st.text(
            st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
            min_size=1,
            max_size=MAX_NAME_CHARS,
        )
        versions = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=128)
        record: dict[str, Any] = {
            "event_id": draw(ids),
            "timestamp": draw(timestamps()),
            "model": {"name": draw(ids), "version": draw(st.one_of(st.none(), st.integers(0, 99), versions))},
            "client": {
                "id": draw(ids),
                "ip": draw(st.sampled_from([None, "203.0.113.7", "2001:db8::1", "x"])),
            },
        }
        if draw(st.booleans()):  # Open Inference Protocol v2
            inputs = []
            for index in range(draw(st.integers(0, 3))):
                numeric, per_row = draw(numeric_tensor(batch, index))
                inputs.append(numeric)
                expect["width"] += per_row
            if not inputs or draw(st.booleans()):
                prompts = draw(st.lists(st.text(max_size=30), min_size=batch, max_size=batch))
                inputs.append(tensor("prompt", [batch], "BYTES", prompts, False))
                expect["text"] = True
            record["request"] = {"inputs": inputs}
            classes = draw(st.integers(2, 5))
            response = draw(st.sampled_from(["none", "proba", "label", "both"]))
            outputs = []
            if response in ("proba", "both"):
                probabilities = draw(
                    st.lists(st.floats(0, 1), min_size=batch * classes, max_size=batch * classes)
                )
                outputs.append(
                    tensor("predict_proba", [batch, classes], "FP32", probabilities, draw(st.booleans()))
                )
                expect["classes"] = classes
            if response in ("label", "both"):
                labels = draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch))
                outputs.append(tensor("predict", [batch], "INT64", labels, False))
            if response != "none":
                record["response"] = {"outputs": outputs}
        else:  # KServe v1
            kind = draw(st.sampled_from(["lists", "objects", "strings", "prompts"]))
            width = draw(st.integers(1, 5))
            if kind == "lists":
                instances: list[Any] = draw(
                    st.lists(
                        st.lists(floats32, min_size=width, max_size=width), min_size=batch, max_size=batch
                    )
                )
            elif kind == "objects":
                names = [f"f{index}" for index in range(width)]
                instances = [{name: draw(floats32) for name in names} for _ in range(batch)]
            elif kind == "strings":
                instances = draw(st.lists(st.text(max_size=30), min_size=batch, max_size=batch))
            else:
                instances = [{"prompt": draw(st.text(max_size=30))} for _ in range(batch)]
            expect["width"] = width if kind in ("lists", "objects") else 0
            expect["text"] = kind in ("strings", "prompts")
            record["request"] = {"instances": instances}
            if draw(st.booleans()):
                classes = draw(st.integers(2, 5))
                predictions = draw(
                    st.lists(
                        st.lists(st.floats(0, 1), min_size=classes, max_size=classes),
                        min_size=batch,
                        max_size=batch,
                    )
                )
                record["response"] = {"predictions": predictions}
                expect["classes"] = classes
        return record, expect

    @st.composite
    def mutated_records(draw: Any) -> bytes:
        """A valid record (generated, or a seed) with one to three hostile changes, as JSON bytes."""
        if draw(st.booleans()):
            record = draw(valid_records())[0]
        else:
            record = json.loads(draw(st.sampled_from(JSON_SEEDS)))
        for _ in range(draw(st.integers(1, 3))):
            paths = list(itertools.islice(_paths(record), 2000))
            shapes = [path for path in paths if path and path[-1] == "shape"]
            operation = draw(st.sampled_from(["delete", "replace", "wrap", "repeat", "reshape"]))
            if operation == "reshape" and shapes:
                # Keep the batch, declare any other dimensions: the data no longer has to match.
                shape = _parent(record, draw(st.sampled_from(shapes)))
                batch = shape["shape"][:1] if isinstance(shape["shape"], list) else []
                shape["shape"] = batch + draw(st.lists(dimensions, max_size=MAX_TENSOR_DIMS))
                continue
            path = draw(st.sampled_from(paths))
            if not path:
                if operation == "replace":
                    record = copy.deepcopy(draw(hostile_values))
                continue
            parent, key = _parent(record, path), path[-1]
            if operation == "delete":
                del parent[key]
            elif operation == "replace":
                # A copy: hypothesis hands out the same list and dict constants again, which must not change.
                parent[key] = copy.deepcopy(draw(hostile_values))
            elif operation == "wrap":
                parent[key] = deep(parent[key], draw(st.integers(1, 250)), draw(st.booleans()))
            else:
                # Up to some 100 KB of repetition: enough for lengths no real record has, cheap to generate.
                item = parent[key][:20] if isinstance(parent[key], list) else [parent[key]]
                times = draw(st.integers(0, max(2, 100_000 // (len(json.dumps(item)) + 1))))
                # Copies, not aliases: a later mutation of one must not multiply through all of them.
                parent[key] = [copy.deepcopy(element) for _ in range(times) for element in item]
            if not isinstance(record, dict | list):
                break
        text = json.dumps(record, ensure_ascii=draw(st.integers(0, 4)) > 0)
        # Escapes Python's json never writes: lone surrogates, and NUL or a BOM spelled out.
        literal = draw(st.sampled_from(['"\\ud800"', '"a\\udc00b"', '"\\u0000"', '"\\ufeff"']))
        quoted = [index for index, char in enumerate(text) if char == '"']
        if quoted and draw(st.integers(0, 4)) == 0:
            at = quoted[draw(st.integers(0, len(quoted) - 1))]
            end = text.find('"', at + 1)
            if end > at:
                text = text[:at] + literal + text[end + 1 :]
        # A surrogate written raw (ensure_ascii off) is not UTF-8: a record only a broken producer sends.
        return text.encode("utf-8", "surrogatepass")

    @st.composite
    def damaged_bytes(draw: Any) -> bytes:
        """A seed record with a few bytes flipped, inserted, removed or cut."""
        value = bytearray(draw(st.sampled_from(SEEDS)))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(value)))
            operation = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
            if operation == "flip" and at < len(value):
                value[at] ^= 1 << draw(st.integers(0, 7))
            elif operation == "insert":
                value[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif operation == "delete":
                del value[at : at + draw(st.integers(1, 8))]
            else:
                del value[at:]
        return bytes(value)

    # Mostly records that get past the parser, where the decoder's own code runs.
    records = st.one_of(
        mutated_records(),
        mutated_records(),
        mutated_records(),
        damaged_bytes(),
        json_values.map(lambda value: json.dumps(value, ensure_ascii=False).encode()),
        st.binary(max_size=200),
    )
    return SimpleNamespace(
        json_values=json_values,
        valid_records=valid_records,
        mutated_records=mutated_records,
        damaged_bytes=damaged_bytes,
        records=records,
    )


SEEDS = seed_records()


def _is_json_object(value: bytes) -> bool:
    try:
        return isinstance(json.loads(value), dict)
    except ValueError:
        return False


JSON_SEEDS = [seed for seed in SEEDS if _is_json_object(seed)]
