"""The published contracts: the input (query-log envelope, Open Inference Protocol v2 and KServe v1 bodies)
and the notification webhook consumers receive, exported as JSON Schema into `schemas/`.

The input models describe the wire format the decoder validates; what it decodes them into is
`detector.domain.Query`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from detector.domain.notifications import Notification

# -- wire format ---------------------------------------------------------------------------------------------

_OPEN = ConfigDict(extra="allow", allow_inf_nan=True)

StoredText = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
"""Text the detector stores (ids, names, addresses): PostgreSQL cannot store a NUL character, so a record
carrying one is rejected like any other contract violation instead of failing the database write."""

# Bounds on the structure of a body, fixed in the contract: generous for any real model, and small enough
# that a record cannot make validation do unbounded work. A list beyond its bound is rejected by its length
# alone, before its items are looked at, and every list of models stops at its first invalid item
# (`fail_fast`): otherwise a 1 MiB record of 300,000 invalid items costs seconds and hundreds of MiB in
# error reports.
MAX_TENSORS = 1024
"""Input tensors of a request, output tensors of a response, outputs a request asks for."""
MAX_TENSOR_DIMS = 32
"""Dimensions of a tensor's shape (numpy itself allows 64)."""
MAX_NAME_CHARS = 256
"""Characters of a tensor's or a requested output's name."""


class ModelRef(BaseModel):
    """Which model served the request."""

    model_config = _OPEN
    name: StoredText = Field(min_length=1, max_length=256)
    version: StoredText | None = Field(default=None, max_length=128)

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # Serving stacks write versions as numbers as often as strings.
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class ClientRef(BaseModel):
    """Who sent the request: the API key / account / principal, and where from."""

    model_config = _OPEN
    id: StoredText = Field(min_length=1, max_length=256)
    ip: StoredText | None = Field(default=None, max_length=64)
    user_agent: StoredText | None = Field(default=None, max_length=1024)


class InferTensor(BaseModel):
    """One named tensor of an Open Inference Protocol v2 body; `data` may be flat or nested."""

    model_config = _OPEN
    name: str = Field(max_length=MAX_NAME_CHARS)
    shape: list[int] = Field(min_length=1, max_length=MAX_TENSOR_DIMS, fail_fast=True)
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    """An output the client asked for (`predict`, `predict_proba`, ...)."""

    model_config = _OPEN
    name: str = Field(max_length=MAX_NAME_CHARS)
    parameters: dict[str, Any] | None = None


class OipRequest(BaseModel):
    """Open Inference Protocol v2 inference request (KServe v2, Triton, MLServer)."""

    model_config = _OPEN
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=MAX_TENSORS, fail_fast=True)
    outputs: list[RequestedOutput] | None = Field(default=None, max_length=MAX_TENSORS, fail_fast=True)


class OipResponse(BaseModel):
    """Open Inference Protocol v2 inference response."""

    model_config = _OPEN
    model_name: str | None = None
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferTensor] = Field(max_length=MAX_TENSORS, fail_fast=True)


_TENSOR_KEYS = frozenset({"datatype", "shape", "data"})


def _looks_like_tensor(item: Any) -> bool:
    return isinstance(item, dict) and not _TENSOR_KEYS.isdisjoint(item)


class KServeV1Request(BaseModel):
    """KServe v1 (TensorFlow Serving style) request: each instance is one query.

    A non-empty `inputs` list is read as `instances` when `instances` is absent and no item looks like an
    Open Inference Protocol tensor (a dict with `datatype`, `shape` or `data`).
    """

    model_config = _OPEN
    instances: list[Any] = Field(min_length=1)
    parameters: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _inputs_as_instances(cls, value: Any) -> Any:
        # Clients of TF Serving's row format send `inputs`. Tensor-like items mean a broken OIP body, which
        # must be reported against OipRequest rather than silently read as instances.
        if isinstance(value, dict) and "instances" not in value:
            inputs = value.get("inputs")
            if isinstance(inputs, list) and inputs and not any(_looks_like_tensor(item) for item in inputs):
                renamed = {key: item for key, item in value.items() if key != "inputs"}
                renamed["instances"] = inputs
                return renamed
        return value


class KServeV1Response(BaseModel):
    """KServe v1 response: each prediction is a label or a list of class probabilities."""

    model_config = _OPEN
    predictions: list[Any]


EXAMPLE_RECORDS: tuple[dict[str, Any], ...] = (
    {
        "event_id": "evt-0001",
        "timestamp": "2026-11-29T08:00:00.123Z",
        "model": {"name": "credit-risk", "version": "3"},
        "client": {"id": "key_8f2c", "ip": "203.0.113.7", "user_agent": "python-requests/2.32"},
        "request": {
            "id": "req-0001",
            "inputs": [
                {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1.25, -3.0, 7.0]}
            ],
            "outputs": [{"name": "predict_proba"}],
        },
        "response": {
            "model_name": "credit-risk",
            "model_version": "3",
            "id": "req-0001",
            "outputs": [{"name": "predict_proba", "shape": [1, 2], "datatype": "FP32", "data": [0.12, 0.88]}],
        },
        "latency_ms": 12.5,
    },
    {
        "event_id": "evt-0002",
        "timestamp": 1764403200.123,
        "model": {"name": "sentiment", "version": 7},
        "client": {"id": "acct_42"},
        "request": {"instances": ["great product", "arrived broken"]},
        "response": {"predictions": ["positive", "negative"]},
    },
)
"""One Open Inference Protocol v2 record and one KServe v1 record, published as the schema's `examples`."""


class QueryLogRecord(BaseModel):
    """One prediction request and its response: one Kafka message, or one line of a JSON Lines file."""

    model_config = ConfigDict(
        extra="allow", allow_inf_nan=True, json_schema_extra={"examples": list(EXAMPLE_RECORDS)}
    )
    event_id: StoredText = Field(min_length=1, max_length=256)
    timestamp: datetime = Field(description="RFC 3339 string (UTC when it has no offset), or epoch seconds")
    model: ModelRef
    client: ClientRef
    # Left to right instead of pydantic's "smart" mode: the first member almost always matches, and smart mode
    # validates both members (about a third of the decode time of a small record).
    request: OipRequest | KServeV1Request = Field(union_mode="left_to_right")
    response: OipResponse | KServeV1Response | None = Field(default=None, union_mode="left_to_right")
    latency_ms: float | None = None

    @field_validator("timestamp", mode="before")
    @classmethod
    def _epoch_seconds(cls, value: Any) -> Any:
        # pydantic reads large numbers as milliseconds; the contract says epoch *seconds*.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return epoch_moment(value)
        return value


def epoch_moment(seconds: float) -> datetime:
    """The UTC moment `seconds` after the epoch, as the contract reads a numeric timestamp; raises
    `ValueError` for NaN, infinities and moments beyond what `datetime` holds."""
    try:
        return datetime.fromtimestamp(float(seconds), tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError("epoch seconds out of range") from None


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "query-log-record": QueryLogRecord,
    "oip-v2-request": OipRequest,
    "oip-v2-response": OipResponse,
    "kserve-v1-request": KServeV1Request,
    "kserve-v1-response": KServeV1Response,
    "notification": Notification,
}
"""Every model whose JSON Schema is published in `schemas/`, by file stem."""


def json_schemas(models: Mapping[str, type[BaseModel]] = SCHEMA_MODELS) -> dict[str, str]:
    """`{file name: JSON text}` of the JSON Schema of each of `models` (by default the wire formats)."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in models.items()
    }


def export_json_schemas(directory: Path, models: Mapping[str, type[BaseModel]] = SCHEMA_MODELS) -> list[Path]:
    """Write the JSON Schema of each of `models` into `directory`; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in json_schemas(models).items():
        path = directory / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
