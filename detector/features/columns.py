"""Numpy columns that grow, and columns of query sequences: the per-client arrays of the cluster index start
small and grow on demand; the query sequences they hold are int32, rebased long before they could overflow."""

from __future__ import annotations

import numpy as np

# A client's query sequence is rebased when it reaches SEQUENCE_LIMIT (two billion queries): back to
# REBASED_SEQUENCE, every sequence held moved back as much, the oldest clipped (still the oldest).
SEQUENCE_LIMIT = 2**31 - 1
REBASED_SEQUENCE = 2**30


def extended(column: np.ndarray, rows: int, fill: float = 0) -> np.ndarray:
    """`column` with at least `rows` rows: itself when it has them, else a copy filled on with `fill`."""
    if column.shape[0] >= rows:
        return column
    grown = np.full((rows, *column.shape[1:]), fill, dtype=column.dtype)
    grown[: column.shape[0]] = column
    return grown


def sequences(values: object, shift: int = 0) -> np.ndarray:
    """An int32 column of query sequences from `values` (any integers), each moved back `shift`, those
    that would fall below the int32 range clipped to its bottom."""
    moved = np.asarray(values, dtype=np.int64) - shift
    return np.maximum(moved, -SEQUENCE_LIMIT).astype(np.int32)
