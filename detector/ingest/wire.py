"""The query-log envelope as the decoder reads it: a strict reading on msgspec, and the published pydantic
contract (`detector.schemas`) deciding whatever the strict reading declines.

`read_envelope` parses a record in one pass into msgspec structs. It is stricter than the contract: it takes
only JSON types exactly as the contract names them (no numeric strings, no floats for integers), RFC 3339
timestamps with an offset in their plain form, and bodies whose format is plain from their fields. What it
accepts, the contract accepts and reads as the same envelope (`tests/ingest/test_wire.py` checks both on
generated records); what it declines (None), the contract decides, rejecting it with its own error report or
reading it through `from_contract`. The contract stays the one definition of what is accepted.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta

from detector.schemas import (
    MAX_NAME_CHARS,
    MAX_TENSOR_DIMS,
    MAX_TENSORS,
    InferTensor,
    OipRequest,
    OipResponse,
    QueryLogRecord,
    epoch_moment,
)

# The contract's `StoredText`: no NUL character.
_NO_NUL = "^[^\x00]*$"
_Id = Annotated[str, Meta(min_length=1, max_length=256, pattern=_NO_NUL)]
_Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
_VERSION_CHARS = 128
# The RFC 3339 form every serving stack writes: `fromisoformat` and the contract read it alike. Anything
# else (no offset, a space, a leap second, more than microseconds) is left to the contract.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")
# pydantic's JSON parser (jiter) stops at about this depth (counting the record's own levels) with a clean
# error, "recursion limit exceeded", so a deeply nested `data` or `parameters` costs nothing and cannot
# exhaust the stack. The decoder relies on that (tests/ingest/test_hostile.py pins it) and names it.
JSON_MAX_DEPTH = 200
# msgspec has no such limit: the strict reading takes records well inside it and leaves deeper ones to the
# contract, which rejects them or not exactly as before.
_STRICT_MAX_DEPTH = 150
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENS = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSES = np.frombuffer(b"]}", dtype=np.uint8)


class Tensor(msgspec.Struct, gc=False):
    """One named tensor of an Open Inference Protocol v2 body (the contract's `InferTensor`)."""

    name: _Name
    shape: Annotated[list[int], Meta(min_length=1, max_length=MAX_TENSOR_DIMS)]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(msgspec.Struct, gc=False):
    """An output the client asked for."""

    name: _Name
    parameters: dict[str, Any] | None = None


class Request(msgspec.Struct, gc=False):
    """A request body: Open Inference Protocol v2 when `inputs` is set, else KServe v1 (`instances`)."""

    inputs: Annotated[list[Tensor], Meta(min_length=1, max_length=MAX_TENSORS)] | None = None
    instances: Annotated[list[Any], Meta(min_length=1)] | None = None
    outputs: Annotated[list[RequestedOutput], Meta(max_length=MAX_TENSORS)] | None = None
    parameters: dict[str, Any] | None = None
    id: str | None = None

    @property
    def is_oip(self) -> bool:
        return self.inputs is not None


class Response(msgspec.Struct, gc=False):
    """A response body: Open Inference Protocol v2 when `outputs` is set, else KServe v1 (`predictions`)."""

    outputs: Annotated[list[Tensor], Meta(max_length=MAX_TENSORS)] | None = None
    predictions: list[Any] | None = None
    model_name: str | None = None
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None

    @property
    def is_oip(self) -> bool:
        return self.outputs is not None


class _Model(msgspec.Struct, gc=False):
    name: _Id
    version: str | int | None = None  # a number beyond 64 bits or with a fraction is left to the contract


class _Client(msgspec.Struct, gc=False):
    id: _Id
    ip: Annotated[str, Meta(max_length=64, pattern=_NO_NUL)] | None = None
    user_agent: Annotated[str, Meta(max_length=1024, pattern=_NO_NUL)] | None = None


class _Record(msgspec.Struct, gc=False):
    event_id: _Id
    timestamp: str | int | float
    model: _Model
    client: _Client
    request: Request
    response: Response | None = None
    latency_ms: float | None = None


class Envelope(msgspec.Struct, gc=False):
    """One query-log record, read: who asked which model what, when (epoch seconds), and the answer."""

    event_id: str
    timestamp: float
    model: str
    model_version: str | None
    client_id: str
    client_ip: str | None
    user_agent: str | None
    request: Request
    response: Response | None


_DECODER = msgspec.json.Decoder(_Record)


class _SenderModel(msgspec.Struct, gc=False):
    name: _Id


class _SenderClient(msgspec.Struct, gc=False):
    id: _Id


class _Sender(msgspec.Struct, gc=False):
    # Only the two names: any other field of theirs, however odd, must not keep a record from being named.
    model: _SenderModel
    client: _SenderClient


_SENDER_DECODER = msgspec.json.Decoder(_Sender)


def sender_of(value: bytes) -> tuple[str, str] | None:
    """(model name, client id) of a whole JSON record naming them as the contract does, None otherwise:
    for a record too large to read, so that its dead letter still says who sent it. Every other field is
    skipped, never built (about 600 MB/s), and anything the strict reading refuses gives None."""
    try:
        sender = _SENDER_DECODER.decode(value)
    except (msgspec.DecodeError, RecursionError):
        return None
    return sender.model.name, sender.client.id


def read_envelope(value: bytes) -> Envelope | None:
    """The envelope of `value` by the strict reading; None when it declines (the contract decides then)."""
    if not _shallow(value) or not _utf8(value):
        return None
    try:
        record = _DECODER.decode(value)
    except msgspec.DecodeError:
        return None
    request, response = record.request, record.response
    # A body is read as the first format of the contract it fits, and nothing else of it is kept.
    if request.is_oip:
        request.instances = None
    elif request.instances is not None:
        request.outputs = request.id = None
    else:
        return None
    if response is not None:
        if response.is_oip:
            response.predictions = None
        elif response.predictions is not None:
            response.model_name = response.model_version = response.id = response.parameters = None
        else:
            return None
    timestamp = _epoch_seconds(record.timestamp)
    version = record.model.version
    if version is not None and not isinstance(version, str):
        version = str(version)  # serving stacks write versions as numbers as often as strings
    if timestamp is None or (version is not None and (len(version) > _VERSION_CHARS or "\x00" in version)):
        return None
    client = record.client
    return Envelope(
        record.event_id,
        timestamp,
        record.model.name,
        version,
        client.id,
        client.ip,
        client.user_agent,
        request,
        response,
    )


def _utf8(value: bytes) -> bool:
    """True when `value` is UTF-8 throughout: msgspec skips the fields a struct does not name unchecked."""
    if value.isascii():
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _shallow(value: bytes) -> bool:
    """True when `value`, if it is JSON at all, nests at most `_STRICT_MAX_DEPTH` arrays and objects deep.

    Counting the brackets settles almost every record (a depth needs as many openings); a record with more
    is measured with its strings taken out."""
    if value.count(b"[") + value.count(b"{") <= _STRICT_MAX_DEPTH:
        return True
    structure = np.frombuffer(_STRING.sub(b"", value), dtype=np.uint8)
    steps = np.isin(structure, _OPENS).astype(np.int32) - np.isin(structure, _CLOSES)
    return int(np.cumsum(steps).max(initial=0)) <= _STRICT_MAX_DEPTH


def _epoch_seconds(timestamp: str | int | float) -> float | None:
    """The event time as the contract reads it, or None for a form left to the contract."""
    try:
        if isinstance(timestamp, str):
            if _RFC3339.fullmatch(timestamp) is None:
                return None
            return datetime.fromisoformat(timestamp).timestamp()
        return epoch_moment(timestamp).timestamp()
    except ValueError:
        return None


def from_contract(record: QueryLogRecord) -> Envelope:
    """The envelope of a record the contract accepted (and the strict reading declined)."""
    moment = record.timestamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    request = record.request
    if isinstance(request, OipRequest):
        read_request = Request(
            inputs=[_tensor(tensor) for tensor in request.inputs],
            outputs=None
            if request.outputs is None
            else [RequestedOutput(output.name, output.parameters) for output in request.outputs],
            parameters=request.parameters,
            id=request.id,
        )
    else:
        read_request = Request(instances=request.instances, parameters=request.parameters)
    response = record.response
    read_response: Response | None
    if response is None:
        read_response = None
    elif isinstance(response, OipResponse):
        read_response = Response(
            outputs=[_tensor(tensor) for tensor in response.outputs],
            model_name=response.model_name,
            model_version=response.model_version,
            id=response.id,
            parameters=response.parameters,
        )
    else:
        read_response = Response(predictions=response.predictions)
    return Envelope(
        record.event_id,
        moment.timestamp(),
        record.model.name,
        record.model.version,
        record.client.id,
        record.client.ip,
        record.client.user_agent,
        read_request,
        read_response,
    )


def _tensor(tensor: InferTensor) -> Tensor:
    return Tensor(tensor.name, tensor.shape, tensor.datatype, tensor.data, tensor.parameters)
