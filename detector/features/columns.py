"""Numpy columns that grow: the per-client arrays of the cluster index start small and grow on demand."""

from __future__ import annotations

import numpy as np


def extended(column: np.ndarray, rows: int, fill: float = 0) -> np.ndarray:
    """`column` with at least `rows` rows: itself when it has them, else a copy filled on with `fill`."""
    if column.shape[0] >= rows:
        return column
    grown = np.full((rows, *column.shape[1:]), fill, dtype=column.dtype)
    grown[: column.shape[0]] = column
    return grown
