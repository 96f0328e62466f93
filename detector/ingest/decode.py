"""Turn one raw record (a JSON query-log envelope) into one `Query` per input row, or reject it.

Parsing and envelope validation happen in compiled code: msgspec's strict reading (`detector.ingest.wire`)
and, for what it declines, the published pydantic contract (`QueryLogRecord.model_validate_json`), which
rejects with its own error report. Tensor data goes to numpy in one call after one C-level check; only
rejected or unusual data is looked at element by element, to say precisely what is wrong. Every rejection
is an `InvalidRecord` with a `DeadLetterReason` and a one-line detail that says where in the record the
problem is, without quoting the model inputs themselves.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from detector.domain import DeadLetterReason, InvalidRecord, Query, RawRecord, Requested
from detector.ingest.wire import (
    JSON_MAX_DEPTH,
    Envelope,
    Request,
    Response,
    Tensor,
    from_contract,
    read_envelope,
    sender_of,
)
from detector.schemas import KServeV1Request, KServeV1Response, OipRequest, OipResponse, QueryLogRecord
from detector.settings import IngestSettings

_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_LABEL_TYPES = frozenset(
    {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL", "BYTES"}
)
_DATATYPES = _FLOAT_TYPES | _LABEL_TYPES

# Output names a client asks for (request) and output names a server answers with (response).
_ASKED_CONFIDENCE = frozenset({"predict_proba", "probabilities", "probs", "scores", "logits"})
_ASKED_LABEL = frozenset({"predict", "label", "labels", "class"})
_CONFIDENCE_NAMES = frozenset({"predict_proba", "probabilities", "probs", "scores"})
_LABEL_NAMES = frozenset({"predict", "label", "labels", "class"})
# Keys of a KServe v1 prediction object, in order of preference. A list under a label key holds class names.
_CONFIDENCE_KEYS = ("probabilities", "predict_proba", "probs", "scores")
_LABEL_KEYS = ("label", "class", "predict", "prediction", "labels", "classes")
_TEXT_KEYS = ("text", "prompt")

_STRENGTH = {Requested.LABEL: 0, Requested.PROBABILITIES: 1, Requested.TOP_K: 2, Requested.LOGPROBS: 3}
_UNION_MEMBERS = frozenset(
    cls.__name__ for cls in (OipRequest, KServeV1Request, OipResponse, KServeV1Response)
)
_F32_MAX = float(np.finfo(np.float32).max)
# A label is a class index or a class name. Clusters keep one per record they remember, so a response that
# sent a megabyte as its label would multiply into every client's state.
MAX_LABEL_CHARS = 256

Vector = npt.NDArray[np.float32]


@dataclass(slots=True)
class _Inputs:
    """What one request asked about: per row, a float32 vector and/or a text."""

    batch_size: int
    vectors: Sequence[Vector] | None
    texts: list[str] | None
    requested: Requested | None  # None when the request does not say


@dataclass(slots=True)
class _Outputs:
    """What the model answered, one entry per row."""

    labels: Sequence[str | None]
    probabilities: Sequence[Vector | None]


class _Problem(Exception):
    """A reason and message still missing where in the record they apply: `at` completes it."""

    def __init__(self, reason: DeadLetterReason, message: str, path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path

    def under(self, prefix: str) -> _Problem:
        """The same problem, one level further down (`prefix` is `[3]` or `.scores`)."""
        return _Problem(self.reason, self.message, prefix + self.path)

    def at(self, where: str) -> InvalidRecord:
        return InvalidRecord(self.reason, f"{where}{self.path}: {self.message}")


class RecordDecoder:
    """Decodes query-log records (OIP v2 or KServe v1 bodies) within the limits of `IngestSettings`.

    Rows: the first dimension of every OIP input is the batch; numeric inputs are concatenated per row (in
    input order) into one float32 vector, BYTES inputs joined per row with newlines into the text. A KServe
    v1 instance is a list of numbers (flattened), an object of name → number (sorted by name), a string, or
    an object with a `text` or `prompt` string. Answers: a confidence output (by name, or a float output of
    several values per row) gives `probabilities` and, unless a label output says otherwise, the argmax
    label; KServe v1 predictions are labels, confidence lists, or objects holding either.
    """

    def __init__(self, limits: IngestSettings) -> None:
        self._limits = limits

    def decode(self, record: RawRecord) -> list[Query]:
        """Return one `Query` per input row of `record`, in row order.

        Raises `InvalidRecord` (reason and one-line detail) when the record is too large, not UTF-8, not a
        JSON object, breaks the input contract, or carries tensors that are inconsistent, too large, or hold
        NaN or infinities.
        """
        envelope = self._parse(record.value, record.size)
        timestamp = envelope.timestamp
        self._check_time(timestamp, record.received_at)
        request = envelope.request
        inputs = self._oip_inputs(request) if request.is_oip else self._kserve_inputs(request)
        batch = inputs.batch_size
        response = envelope.response
        if response is None:
            outputs = _Outputs([None] * batch, [None] * batch)
        elif response.is_oip:
            outputs = self._oip_outputs(response, batch)
        else:
            outputs = self._kserve_outputs(response, batch)

        vectors = inputs.vectors if inputs.vectors is not None else [None] * batch
        texts = inputs.texts if inputs.texts is not None else [None] * batch
        queries: list[Query] = []
        for row, (vector, text, label, probabilities) in enumerate(
            zip(vectors, texts, outputs.labels, outputs.probabilities, strict=True)
        ):
            requested = inputs.requested
            if requested is None:
                requested = Requested.LABEL if probabilities is None else Requested.PROBABILITIES
            queries.append(
                Query(
                    event_id=envelope.event_id,
                    row=row,
                    batch_size=batch,
                    timestamp=timestamp,
                    model=envelope.model,
                    model_version=envelope.model_version,
                    client_id=envelope.client_id,
                    client_ip=envelope.client_ip,
                    user_agent=envelope.user_agent,
                    vector=vector,
                    text=text,
                    requested=requested,
                    label=label,
                    probabilities=probabilities,
                )
            )
        return queries

    def _check_time(self, timestamp: float, received_at: float) -> None:
        """Reject event times no stream can have: before 1970, further ahead of receipt than
        `max_future_seconds`, or (when set) older than `max_age_seconds`."""
        limits = self._limits
        if timestamp < 0:
            problem = "is before 1970-01-01"
        elif limits.max_future_seconds is not None and timestamp - received_at > limits.max_future_seconds:
            problem = (
                f"is {timestamp - received_at:.0f} s ahead of its receipt, more than "
                f"ingest.max_future_seconds ({limits.max_future_seconds:g})"
            )
        elif limits.max_age_seconds is not None and received_at - timestamp > limits.max_age_seconds:
            problem = (
                f"is {received_at - timestamp:.0f} s before its receipt, more than "
                f"ingest.max_age_seconds ({limits.max_age_seconds:g})"
            )
        else:
            return
        raise InvalidRecord(DeadLetterReason.IMPLAUSIBLE_TIMESTAMP, f"timestamp {problem}")

    def _parse(self, value: bytes, size: int) -> Envelope:
        """The envelope of a record of `size` bytes, of which `value` holds all (or, past the limit, the
        first)."""
        limit = self._limits.max_record_bytes
        if size > limit:  # `value` is never longer than `size`
            detail = f"record is {size} bytes, more than ingest.max_record_bytes ({limit})"
            # Who sends records too large to analyse is worth knowing (an attack tool batching more than
            # the limit goes unanalysed): named where the record is whole and says it.
            sender = sender_of(value) if len(value) == size else None
            if sender is not None:
                detail += f", from client {sender[1]!r} of model {sender[0]!r}"
            raise InvalidRecord(DeadLetterReason.RECORD_TOO_LARGE, detail)
        envelope = read_envelope(value)
        if envelope is not None:
            return envelope
        try:
            return from_contract(QueryLogRecord.model_validate_json(value))
        except ValidationError as exc:
            raise _rejection(value, exc) from None

    # -- requests ----------------------------------------------------------------------------------------

    def _oip_inputs(self, request: Request) -> _Inputs:
        tensors = request.inputs or []
        batch = tensors[0].shape[0]
        width = 0
        blocks: list[Vector] = []
        texts_per_input: list[list[str]] = []
        try:
            self._check_batch(batch)
        except _Problem as problem:
            raise problem.at("request.inputs") from None
        for index, tensor in enumerate(tensors):
            try:
                per_row = _layout(tensor, batch, self._limits.max_features)
                if tensor.datatype == "BYTES":
                    texts_per_input.append(_texts(tensor, batch, per_row))
                else:
                    width += per_row
                    self._check_width(width)
                    blocks.append(_tensor_values(tensor, batch * per_row))
            except _Problem as problem:
                raise problem.at(_tensor_where("request.inputs", index, tensor)) from None
        texts: list[str] | None = None
        if len(texts_per_input) == 1:
            texts = texts_per_input[0]
        elif texts_per_input:
            texts = ["\n".join(parts) for parts in zip(*texts_per_input, strict=True)]
        vectors: Sequence[Vector] | None = None
        if len(blocks) == 1:
            vectors = _rows(blocks[0], batch)
        elif blocks:
            vectors = list(np.concatenate([block.reshape(batch, -1) for block in blocks], axis=1))
        if not width and texts is None:
            raise InvalidRecord(DeadLetterReason.SCHEMA_VIOLATION, "request.inputs: the rows hold no values")
        return _Inputs(batch, vectors if width else None, texts, _asked(request))

    def _kserve_inputs(self, request: Request) -> _Inputs:
        instances = request.instances or []
        batch = len(instances)  # at least 1: the model requires it
        vectors: Sequence[Vector] | None = None
        texts: list[str] | None = None
        try:
            self._check_batch(batch)
            first = instances[0]
            if isinstance(first, str):
                texts = _strings(instances)
            elif isinstance(first, dict):
                text_key = next((key for key in _TEXT_KEYS if isinstance(first.get(key), str)), None)
                if text_key is not None:
                    texts = _instance_texts(instances, text_key)
                else:
                    vectors = self._matrix_rows(_float32(_named_rows(instances)), batch)
            elif isinstance(first, list | int | float) and not isinstance(first, bool):
                vectors = self._matrix_rows(_float32(instances), batch)
            else:
                raise _Problem(
                    DeadLetterReason.SCHEMA_VIOLATION,
                    f"{_json_type(first)} where a list, object, number or string is expected",
                    "[0]",
                )
        except _Problem as problem:
            raise problem.at("request.instances") from None
        return _Inputs(batch, vectors, texts, _asked_by_parameters(None, request.parameters))

    # -- responses ---------------------------------------------------------------------------------------

    def _oip_outputs(self, response: Response, batch: int) -> _Outputs:
        confidence: tuple[int, Tensor] | None = None
        label: tuple[int, Tensor] | None = None
        for index, tensor in enumerate(response.outputs or []):
            # A known name decides; an unknown one is judged by datatype and shape.
            name = tensor.name.lower()
            shape, datatype = tensor.shape, tensor.datatype
            per_row = _values_per_row(shape, 2) if min(shape) >= 0 else 0
            if name in _CONFIDENCE_NAMES:
                is_confidence = True
            elif name in _LABEL_NAMES:
                is_confidence = False
            elif datatype in _FLOAT_TYPES and len(shape) > 1 and per_row > 1:
                is_confidence = True
            elif datatype in _LABEL_TYPES and len(shape) <= 2 and per_row == 1:
                is_confidence = False
            else:
                continue
            if is_confidence and confidence is None:
                confidence = (index, tensor)
            elif not is_confidence and label is None:
                label = (index, tensor)

        probabilities: Sequence[Vector | None] = [None] * batch
        labels: Sequence[str | None] | None = None
        if confidence is not None:
            index, tensor = confidence
            try:
                per_row = _layout(tensor, batch, self._limits.max_features)
                if tensor.datatype == "BYTES":
                    raise _Problem(
                        DeadLetterReason.SCHEMA_VIOLATION, "BYTES where class confidences are expected"
                    )
                self._check_width(per_row)
                values = _tensor_values(tensor, batch * per_row)
            except _Problem as problem:
                raise problem.at(_tensor_where("response.outputs", index, tensor)) from None
            if per_row > 1:
                probabilities, labels = _rows(values, batch), _argmax_labels(values, batch)
            elif values.size and values.min() >= 0.0 and values.max() <= 1.0:
                labels, probabilities = _binary_scores(values)
            else:
                probabilities = _rows(values, batch)
        if label is not None:
            index, tensor = label
            try:
                labels, scores = _label_tensor(tensor, batch, self._limits.max_features)
            except _Problem as problem:
                raise problem.at(_tensor_where("response.outputs", index, tensor)) from None
            if confidence is None:
                probabilities = scores
        return _Outputs([None] * batch if labels is None else labels, probabilities)

    def _kserve_outputs(self, response: Response, batch: int) -> _Outputs:
        predictions = response.predictions or []
        try:
            if len(predictions) != batch:
                raise _Problem(
                    DeadLetterReason.SHAPE_MISMATCH,
                    f"{len(predictions)} prediction(s) for a batch of {batch}",
                )
            first = predictions[0]
            if isinstance(first, list):
                values = _float32(predictions)
                rows = self._matrix_rows(values, batch)
                return _Outputs(
                    _argmax_labels(values, batch) if values.size > batch else [None] * batch, rows
                )
            labels: list[str | None] = []
            probabilities: list[Vector | None] = []
            for row, prediction in enumerate(predictions):
                try:
                    if isinstance(first, dict):
                        label, vector = self._prediction_object(prediction)
                    else:
                        label, vector = _scalar_prediction(prediction, numeric=False)
                except _Problem as problem:
                    raise problem.under(f"[{row}]") from None
                labels.append(label)
                probabilities.append(vector)
        except _Problem as problem:
            raise problem.at("response.predictions") from None
        return _Outputs(labels, probabilities)

    def _prediction_object(self, prediction: Any) -> tuple[str | None, Vector | None]:
        """The label and class confidences of one prediction object (`{"label": ..., "scores": [...]}`)."""
        if not isinstance(prediction, dict):
            raise _Problem(
                DeadLetterReason.SCHEMA_VIOLATION,
                f"{_json_type(prediction)} where an object like the first prediction is expected",
            )
        vector = None
        class_names: tuple[str, list[Any]] | None = None  # (key, names) aligned with the vector
        scores_key = next((key for key in _CONFIDENCE_KEYS if key in prediction), None)
        if scores_key is not None:
            scores = prediction[scores_key]
            try:
                if isinstance(scores, dict):  # class name -> confidence, in sorted-name order like instances
                    class_names = (scores_key, sorted(scores))
                    scores = [scores[name] for name in class_names[1]]
                elif not isinstance(scores, list):
                    raise _Problem(
                        DeadLetterReason.SCHEMA_VIOLATION,
                        f"{_json_type(scores)} where a list of numbers or an object of them is expected",
                    )
                vector = _float32(scores)
                self._check_width(vector.size)
            except _Problem as problem:
                raise problem.under(f".{scores_key}") from None
        for key in _LABEL_KEYS:
            value = prediction.get(key)
            if isinstance(value, list):
                class_names = class_names or (key, value)
            elif value is not None:
                try:
                    label, score = _scalar_prediction(value, numeric=False)
                except _Problem as problem:
                    raise problem.under(f".{key}") from None
                return label, score if vector is None else vector
        if vector is None or vector.size < 2:
            return None, vector
        best = int(vector.argmax())
        if class_names is not None and len(class_names[1]) == vector.size:
            key, names = class_names
            try:
                return _scalar_label(names[best], numeric=False), vector
            except _Problem as problem:
                raise problem.under(f".{key}[{best}]") from None
        return str(best), vector

    # -- limits ------------------------------------------------------------------------------------------

    def _matrix_rows(self, values: Vector, batch: int) -> Sequence[Vector]:
        """Split `values` (a flat batch of equal rows) into rows, within the feature limit."""
        width = values.size // batch
        self._check_width(width)
        if not width:
            raise _Problem(DeadLetterReason.SCHEMA_VIOLATION, "the rows hold no values")
        return _rows(values, batch)

    def _check_batch(self, batch: int) -> None:
        limit = self._limits.max_batch_rows
        if batch == 0:
            raise _Problem(DeadLetterReason.SCHEMA_VIOLATION, "empty batch (0 rows)")
        if batch > limit:
            raise _Problem(
                DeadLetterReason.BATCH_TOO_LARGE,
                f"batch of {_count(batch)} rows, more than ingest.max_batch_rows ({limit})",
            )

    def _check_width(self, width: int) -> None:
        limit = self._limits.max_features
        if width > limit:
            raise _Problem(
                DeadLetterReason.SHAPE_MISMATCH,
                f"{width} values per row, more than ingest.max_features ({limit})",
            )


# -- tensors -----------------------------------------------------------------------------------------------


def _layout(tensor: Tensor, batch: int, max_per_row: int) -> int:
    """The number of values per row of `tensor` (at least 1, at most `max_per_row`), after checking its
    datatype and that it has `batch` rows. Works from the declared shape alone: nothing is allocated."""
    if tensor.datatype not in _DATATYPES:
        raise _Problem(
            DeadLetterReason.UNSUPPORTED_DATATYPE,
            f"datatype {_quote(tensor.datatype)} is not one of {', '.join(sorted(_DATATYPES))}",
        )
    shape = tensor.shape
    if min(shape) < 0:
        raise _Problem(DeadLetterReason.SCHEMA_VIOLATION, f"negative dimension in shape {_shape(shape)}")
    if shape[0] != batch:
        raise _Problem(
            DeadLetterReason.SHAPE_MISMATCH,
            f"batch of {_count(shape[0])} (shape {_shape(shape)}) where {batch} is expected",
        )
    per_row = _values_per_row(shape, max_per_row)
    if per_row > max_per_row:
        raise _Problem(
            DeadLetterReason.SHAPE_MISMATCH,
            f"shape {_shape(shape)} declares more values per row than ingest.max_features ({max_per_row})",
        )
    if per_row == 0:
        # Rows of nothing: a few bytes of shape would otherwise stand for thousands of empty queries.
        raise _Problem(DeadLetterReason.SCHEMA_VIOLATION, f"the rows hold no values (shape {_shape(shape)})")
    return per_row


def _values_per_row(shape: list[int], cap: int) -> int:
    """The product of `shape`'s dimensions after the first (all non-negative), or `cap + 1` when it is
    larger than `cap`.

    Python's integers never overflow, but the product of a few dimensions of thousands of digits each is a
    number Python refuses to print (more than 4,300 digits) and slow to compute: stop once it passes `cap`.
    """
    dims = shape[1:]
    if 0 in dims:
        return 0
    count = 1
    for dim in dims:
        count *= dim
        if count > cap:
            return cap + 1
    return count


def _tensor_values(tensor: Tensor, expected: int) -> Vector:
    """The numeric data of `tensor`, flattened in row-major order, checked to hold `expected` elements."""
    values = _float32(tensor.data)
    if values.size != expected:
        raise _Problem(
            DeadLetterReason.SHAPE_MISMATCH,
            f"{values.size} data elements for shape {_shape(tensor.shape)} ({expected} expected)",
        )
    return values


def _float32(data: list[Any]) -> Vector:
    """`data` (a flat or regularly nested list of numbers; booleans count as 0 and 1) as a flat float32 array.

    Ragged nesting is SHAPE_MISMATCH, anything but numbers SCHEMA_VIOLATION, and NaN, infinities and numbers
    beyond the float32 range NON_FINITE.
    """
    flat = _leaves(data) if data and isinstance(data[0], list) else data
    if flat is None:
        raise _Problem(DeadLetterReason.SHAPE_MISMATCH, "ragged nested data")
    # The Euclidean norm bounds every element, and computing it in C rejects non-numbers (TypeError), NaN and
    # infinities (a non-finite norm) in one pass. A failed check only means "look closer", below.
    try:
        if math.hypot(*flat) <= _F32_MAX:
            return np.array(flat, dtype=np.float32)
    except (TypeError, OverflowError):
        pass
    return _checked_float32(flat)


def _checked_float32(flat: list[Any]) -> Vector:
    """`_float32` element by element: name the first bad element, or convert what only looked suspect."""
    for index, item in enumerate(flat):
        if isinstance(item, list):
            raise _Problem(DeadLetterReason.SHAPE_MISMATCH, "ragged nested data")
        if not isinstance(item, int | float):
            raise _Problem(
                DeadLetterReason.SCHEMA_VIOLATION,
                f"{_json_type(item)} at flat index {index} where numbers are expected",
            )
        try:
            fits = abs(float(item)) <= _F32_MAX
        except OverflowError:  # an integer beyond even float64
            fits = False
        if not fits:
            raise _Problem(DeadLetterReason.NON_FINITE, f"{_non_finite_name(item)} at flat index {index}")
    return np.array(flat, dtype=np.float64).astype(np.float32)


def _non_finite_name(number: float) -> str:
    if isinstance(number, float):
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "-Infinity" if number < 0 else "Infinity"
    return "a number beyond the float32 range"


def _rows(values: Vector, batch: int) -> Sequence[Vector]:
    """One view per row of the flat batch `values`."""
    # A single row is by far the most common request; it needs no reshape.
    return [values] if batch == 1 else list(values.reshape(batch, -1))


def _leaves(data: list[Any]) -> list[Any] | None:
    """The leaves of a nested list in row-major order, or None when its nesting is ragged.

    Only the nesting levels are checked here; a list among the leaves is left for the caller to report.
    """
    level = data
    while level and isinstance(level[0], list):
        size = len(level[0])
        if any(not isinstance(item, list) or len(item) != size for item in level):
            return None
        level = [leaf for item in level for leaf in item]
    return level


def _texts(tensor: Tensor, batch: int, per_row: int) -> list[str]:
    """The BYTES data of `tensor` as one string per row (a row's several elements joined with newlines)."""
    leaves = _leaves(tensor.data)
    if leaves is None:
        raise _Problem(DeadLetterReason.SHAPE_MISMATCH, "ragged nested data")
    expected = batch * per_row
    if len(leaves) != expected:
        raise _Problem(
            DeadLetterReason.SHAPE_MISMATCH,
            f"{len(leaves)} data elements for shape {_shape(tensor.shape)} ({expected} expected)",
        )
    texts = _strings(leaves)
    if per_row == 1:
        return texts
    return ["\n".join(texts[row * per_row : (row + 1) * per_row]) for row in range(batch)]


def _strings(items: list[Any]) -> list[str]:
    """`items` when every one is a string; otherwise a problem naming the first that is not."""
    for index, item in enumerate(items):
        if not isinstance(item, str):
            if isinstance(item, list):
                raise _Problem(DeadLetterReason.SHAPE_MISMATCH, "ragged nested data")
            raise _Problem(
                DeadLetterReason.SCHEMA_VIOLATION,
                f"{_json_type(item)} at index {index} where strings are expected",
            )
    return items


def _instance_texts(instances: list[Any], key: str) -> list[str]:
    texts = []
    for index, instance in enumerate(instances):
        text = instance.get(key) if isinstance(instance, dict) else None
        if not isinstance(text, str):
            raise _Problem(
                DeadLetterReason.SCHEMA_VIOLATION,
                f"expected an object with a {key!r} string, like the first instance",
                f"[{index}]",
            )
        texts.append(text)
    return texts


def _named_rows(instances: list[Any]) -> list[list[Any]]:
    """Objects of name → number (or nested lists of numbers) as rows of values in sorted-name order."""
    first = instances[0]
    names = sorted(first)
    rows = []
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise _Problem(
                DeadLetterReason.SCHEMA_VIOLATION,
                f"{_json_type(instance)} where an object like the first instance is expected",
                f"[{index}]",
            )
        if instance.keys() != first.keys():
            raise _Problem(
                DeadLetterReason.SHAPE_MISMATCH,
                "feature names differ from those of the first instance",
                f"[{index}]",
            )
        rows.append([instance[name] for name in names])
    return rows


# -- labels ------------------------------------------------------------------------------------------------


def _label_tensor(
    tensor: Tensor, batch: int, max_per_row: int
) -> tuple[list[str | None], list[Vector | None]]:
    """One label per row from an output tensor (class indices, class names or booleans), and the class
    confidences of the rows that hold a binary classifier's score instead (see `_scalar_prediction`)."""
    if _layout(tensor, batch, max_per_row) != 1:
        raise _Problem(
            DeadLetterReason.SHAPE_MISMATCH, f"shape {_shape(tensor.shape)} is not one label per row"
        )
    leaves = _leaves(tensor.data)
    if leaves is None:
        raise _Problem(DeadLetterReason.SHAPE_MISMATCH, "ragged nested data")
    if len(leaves) != batch:
        raise _Problem(
            DeadLetterReason.SHAPE_MISMATCH,
            f"{len(leaves)} data elements for shape {_shape(tensor.shape)} ({batch} expected)",
        )
    numeric = tensor.datatype != "BYTES"
    labels: list[str | None] = []
    scores: list[Vector | None] = []
    for index, value in enumerate(leaves):
        try:
            label, score = _scalar_prediction(value, numeric=numeric)
        except _Problem as problem:
            raise problem.under(f".data[{index}]") from None
        labels.append(label)
        scores.append(score)
    return labels, scores


def _argmax_labels(values: Vector, batch: int) -> list[str | None]:
    if batch == 1:
        return [str(values.argmax())]
    return [str(best) for best in values.reshape(batch, -1).argmax(axis=1).tolist()]


def _scalar_prediction(value: Any, *, numeric: bool) -> tuple[str | None, Vector | None]:
    """One row's prediction given as one value, as (label, class confidences). A whole number, a boolean or
    (unless `numeric`) a string is a class label (see `_scalar_label`). A float that is not whole is no class:
    in [0, 1] it is a binary classifier's score for class 1 (XGBoost and LightGBM boosters answer so), read
    as label 1 from 0.5 on and confidences [1 - p, p] (a score reveals as much as probabilities do); outside
    [0, 1] a regression value, neither (its changes are no label flips)."""
    if isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        if 0.0 <= value <= 1.0:
            labels, rows = _binary_scores(np.array([value], dtype=np.float32))
            return labels[0], rows[0]
        return None, None
    return _scalar_label(value, numeric=numeric), None


def _binary_scores(scores: Vector) -> tuple[list[str | None], list[Vector | None]]:
    """The labels and class confidences of binary classifiers' scores for class 1 (each in [0, 1]): label 1
    from 0.5 on, else 0; confidences [1 - p, p]."""
    confidences = np.empty((scores.shape[0], 2), dtype=np.float32)
    confidences[:, 0] = 1.0 - scores
    confidences[:, 1] = scores
    labels: list[str | None] = ["1" if score >= 0.5 else "0" for score in scores.tolist()]
    return labels, list(confidences)


def _scalar_label(value: Any, *, numeric: bool) -> str:
    """A number (or, unless `numeric`, a string) as a label, written like an argmax index (`1`, not `1.0`),
    of at most `MAX_LABEL_CHARS` characters."""
    if isinstance(value, str) and not numeric:
        return _short_label(value)
    if not isinstance(value, int | float):
        expected = "a number" if numeric else "a string or a number"
        raise _Problem(DeadLetterReason.SCHEMA_VIOLATION, f"{_json_type(value)} where {expected} is expected")
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Problem(DeadLetterReason.NON_FINITE, f"{_non_finite_name(value)} as a label")
        if value.is_integer():
            return _short_label(str(int(value)))
    return _short_label(str(value))


def _short_label(label: str) -> str:
    if len(label) > MAX_LABEL_CHARS:
        raise _Problem(
            DeadLetterReason.SCHEMA_VIOLATION,
            f"a label of {len(label)} characters, more than {MAX_LABEL_CHARS}",
        )
    # One string per distinct label: every cluster of every client keeps its last label, and a model has
    # few (interned strings are freed with their last reference).
    return sys.intern(label)


# -- what the client asked for -----------------------------------------------------------------------------


def _asked(request: Request) -> Requested | None:
    """What an OIP request asks for, from its output names and parameters; None when it does not say."""
    asked = _asked_by_parameters(None, request.parameters)
    for output in request.outputs or ():
        name = output.name.lower()
        if name in _ASKED_CONFIDENCE:
            asked = _stronger(asked, Requested.PROBABILITIES)
        elif name in _ASKED_LABEL:
            asked = _stronger(asked, Requested.LABEL)
        asked = _asked_by_parameters(asked, output.parameters)
    return asked


def _asked_by_parameters(asked: Requested | None, parameters: dict[str, Any] | None) -> Requested | None:
    """Raise `asked` to TOP_K for `top_k`/`topk` above 1, and to LOGPROBS for `logprobs` or `top_logprobs`."""
    if not parameters:
        return asked
    if parameters.get("logprobs") or parameters.get("top_logprobs"):
        return Requested.LOGPROBS
    top_k = parameters.get("top_k", parameters.get("topk"))
    if isinstance(top_k, int | float) and not isinstance(top_k, bool) and top_k > 1:
        return _stronger(asked, Requested.TOP_K)
    return asked


def _stronger(current: Requested | None, candidate: Requested) -> Requested:
    if current is None or _STRENGTH[candidate] > _STRENGTH[current]:
        return candidate
    return current


# -- error reporting ---------------------------------------------------------------------------------------


def _tensor_where(array: str, index: int, tensor: Tensor) -> str:
    return f"{array}[{index}] ({_quote(tensor.name)})"


def _shape(shape: list[int]) -> str:
    # A shape holds at most 32 dimensions, but each may have thousands of digits.
    return _clip(str(shape), 80)


def _count(number: int) -> str:
    return _clip(str(number), 24)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(text: str, limit: int = 64) -> str:
    # repr() escapes newlines and control characters, which keeps every detail on one line.
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _rejection(value: bytes, exc: ValidationError) -> InvalidRecord:
    """Map a pydantic failure to a reason and a one-line detail naming the first problem."""
    errors = exc.errors(include_url=False, include_context=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as bad:
            return InvalidRecord(
                DeadLetterReason.INVALID_ENCODING, f"not UTF-8: {bad.reason} at byte {bad.start}"
            )
        message = _one_line(first["msg"])
        if "recursion limit exceeded" in message:
            message = f"nested too deeply: the JSON parser stops at about {JSON_MAX_DEPTH} levels ({message})"
        return InvalidRecord(DeadLetterReason.INVALID_JSON, message)
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRecord(
            DeadLetterReason.INVALID_JSON, f"the record is {_json_type(first['input'])}, not a JSON object"
        )
    problems = _problems(errors)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return InvalidRecord(DeadLetterReason.SCHEMA_VIOLATION, _one_line(problems[0] + more))


def _problems(errors: list[Any]) -> list[str]:
    """One `path: message` per distinct problem, leaving out union members the body was not meant to be.

    pydantic reports every member of `request` and `response` it tried. A member that lacks its defining
    field (`inputs`, `instances`, `outputs`, `predictions`) is left out when another member has it; when
    every member lacks it, the body is neither format and one problem says so.
    """
    lacks: dict[tuple[Any, Any], bool] = {}
    for error in errors:
        loc = error["loc"]
        if len(loc) >= 2 and loc[1] in _UNION_MEMBERS:
            member = (loc[0], loc[1])
            lacks[member] = lacks.get(member, False) or (error["type"] == "missing" and len(loc) == 3)
    neither = {
        field for (field, _) in lacks if all(lacking for (f, _), lacking in lacks.items() if f == field)
    }
    problems = []
    for error in errors:
        loc = error["loc"]
        if tuple(loc[:2]) in lacks and loc[0] in neither:
            problems.append(f"{loc[0]}: {_NEITHER[loc[0]]}")
        elif not lacks.get(tuple(loc[:2]), False):
            problems.append(f"{_path(loc)}: {_message(error)}")
    return list(dict.fromkeys(problems))


def _message(error: Any) -> str:
    # The only pattern of the contract is `StoredText`'s: say what is wrong rather than quote the regex.
    if error["type"] == "string_pattern_mismatch":
        return "contains a NUL character, which cannot be stored"
    return str(error["msg"])


_NEITHER = {
    "request": "neither an Open Inference Protocol v2 body (inputs) nor a KServe v1 body (instances)",
    "response": "neither an Open Inference Protocol v2 body (outputs) nor a KServe v1 body (predictions)",
}


def _path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part not in _UNION_MEMBERS:  # the member's class name says nothing to the sender
            text += f".{part}" if text else part
    return text or "record"


def _one_line(text: str) -> str:
    return " ".join(text.split())
