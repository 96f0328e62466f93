"""A client's stored state as bytes: a small JSON header, then the raw bytes of its numpy columns.

A state is a dict of numbers, strings, lists, dicts and numpy arrays (the cluster index's columns). Written
as JSON those columns cost most of a commit (every changed client's state is written at every one): to
decimal lists and base64 text, then parsed back the same way on restore. Here each array stands in the
header as a reference (`{"$array": i, "dtype": ..., "shape": ...}`) and its bytes follow the header as they
are in memory, little-endian: a state of 256 clusters is written three times faster than as JSON (with
base64 text for its points), in three quarters of the bytes.

Layout: `MAGIC`, the header's length (4 bytes, little-endian), the header (JSON), the arrays' bytes in the
order of their references.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any

import numpy as np
import orjson

from detector.features.embedding import unpack

MAGIC = b"MIAS\x01"
_LENGTH = struct.Struct("<I")
_ARRAY = "$array"
_CONTAINERS = (dict, list)
# The little-endian spelling of each dtype met, and whether it is the dtype's own (`dtype.str` is built anew
# at every call).
_CODES: dict[np.dtype[Any], tuple[str, bool]] = {}


def is_state_bytes(data: bytes) -> bool:
    """True when `data` was written by `dumps` (the stored states before it were JSON)."""
    return data[: len(MAGIC)] == MAGIC


def dumps(state: dict[str, Any]) -> bytes:
    """`state` as bytes (see the module docstring); raises `TypeError` on a value neither JSON nor an
    array."""
    arrays: list[np.ndarray] = []

    def reference(value: Any) -> dict[str, Any]:
        if not isinstance(value, np.ndarray):
            raise TypeError(f"not storable in a client state: {type(value).__name__}")
        known = _CODES.get(value.dtype)
        if known is None:
            code = value.dtype.newbyteorder("<").str
            known = _CODES[value.dtype] = (code, code == value.dtype.str)
        code, little_endian = known
        # Little-endian columns (as on every common CPU) are written as they are, C-ordered.
        value = np.ascontiguousarray(value) if little_endian else np.ascontiguousarray(value, dtype=code)
        arrays.append(value)
        return {_ARRAY: len(arrays) - 1, "dtype": code, "shape": value.shape}

    header = orjson.dumps(state, default=reference)
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *(column.data for column in arrays)])


def loads(data: bytes) -> dict[str, Any]:
    """The state `dumps` wrote, its arrays read-only views of `data` (copies, for arrays stored big-endian
    and read on a little-endian CPU or the reverse: in the native byte order): a caller keeping one copies
    it. Raises `ValueError` on bytes `dumps` did not write, or cut short."""
    if not is_state_bytes(data):
        raise ValueError("not a stored client state")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise ValueError("a stored client state cut short")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    try:
        header = orjson.loads(data[start : start + length])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"a stored client state's header is unreadable: {exc}") from None
    if type(header) is not dict:
        raise ValueError("a stored client state is not a mapping")
    reader = _ArrayReader(data, start + length)
    state: dict[str, Any] = reader.resolved(header, 0)
    if reader.offset != len(data):
        raise ValueError("a stored client state has bytes past its arrays")
    return state


# A stored array's dtype: a byte order, a numeric kind and a size (`np.dtype` parses other text with
# `literal_eval`, and raises what it meets).
_STORED_DTYPE = re.compile(r"[<>|][biuf][1248]")
# Deeper than any state (4 levels): a header nested further is not one, and would exhaust the stack.
_MAX_DEPTH = 16


class _ArrayReader:
    """Resolves a header's array references to the arrays that follow it in `data`, in order."""

    __slots__ = ("count", "data", "offset")

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset
        self.count = 0

    def resolved(self, value: Any, depth: int) -> Any:
        """`value` (a container: most values are counters' numbers, left as they are) with every array
        reference in it replaced by its array."""
        if depth > _MAX_DEPTH:
            raise ValueError("a stored client state is nested too deep")
        depth += 1
        if type(value) is list:
            return [self.resolved(item, depth) if type(item) in _CONTAINERS else item for item in value]
        if _ARRAY in value:
            return self.array(value)
        return {
            key: self.resolved(item, depth) if type(item) in _CONTAINERS else item
            for key, item in value.items()
        }

    def array(self, reference: dict[str, Any]) -> np.ndarray:
        """The next array, as `reference` describes it."""
        code, shape = reference.get("dtype"), reference.get("shape")
        if reference[_ARRAY] != self.count:
            raise ValueError("a stored client state's arrays are out of order")
        if not (isinstance(code, str) and _STORED_DTYPE.fullmatch(code) and type(shape) is list):
            raise ValueError(f"a stored client state's array is unreadable: {code!r}, shape {shape!r}")
        data, dtype = self.data, np.dtype(code)
        # No dimension longer than the bytes: an empty array of a huge shape would make its reader allocate.
        if not all(type(size) is int and 0 <= size <= len(data) for size in shape):
            raise ValueError(f"a stored client state's array has an impossible shape {shape!r}")
        count = math.prod(shape)
        if self.offset + count * dtype.itemsize > len(data):
            raise ValueError("a stored client state cut short")
        read = np.frombuffer(data, dtype=dtype, count=count, offset=self.offset).reshape(shape)
        self.offset += count * dtype.itemsize
        self.count += 1
        return read if dtype.isnative else read.astype(dtype.newbyteorder("="))


def stored_column(value: Any, dtype: str) -> np.ndarray:
    """A new, writable array of `dtype` (spelt little-endian, as `pack` takes it), in the native byte order,
    from a stored state's column: an array (`loads`) or, in a state stored as JSON, base64 text (`pack`)
    or a list of numbers."""
    if isinstance(value, str):
        return unpack(value, dtype)
    return np.array(value, dtype=np.dtype(dtype).newbyteorder("="))
