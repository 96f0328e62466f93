"""Exact membership: each value cut to a cell 4 significant digits wide, so that a training row and the same
row after a trip through JSON fall in the same cells.

Queries reach the detector as JSON numbers parsed into float32, so cells must survive a round trip through a
JSON writer keeping 6 significant digits. Rounding to 5 decimals does not: on Gaussian rows of 30
full-precision features, 61 % of rows change after `%.6g`, all of them when features span several orders of
magnitude. Rounding to 5 significant digits moves ~5 % of values, so ~77 % of such rows. Hence 4 digits,
with cell boundaries at ...45 so that values written with 4 or 5 significant digits are never near one, and
for the training values within `ROUND_TRIP_TOLERANCE` of a boundary (~1.4 % of full-precision floats) the
row is also stored with the value in the neighbouring cell (`training_tokens`). Queries are cut the same
way, without variants (`tokens`).
"""

from __future__ import annotations

import numpy as np

SIGNIFICANT_DIGITS = 4
# Cell k holds scaled values t in [k - 0.55, k + 0.45): values written with SIGNIFICANT_DIGITS + 1 digits
# (t = k + j/10) are then at least 0.05 from a boundary, far more than a round trip moves them.
CELL_OFFSET = 0.55
# How far (in units of the last kept digit) a round trip may move a value: half a unit of the 6th
# significant digit (0.005) plus a float32 rounding on each side (up to 0.0006 each).
ROUND_TRIP_TOLERANCE = 0.007
# Values near a boundary double a row's digests; beyond this many, only the nearest ones are doubled.
MAX_AMBIGUOUS_FEATURES = 8
# Decimal exponents of float32 values lie in [-46, 38]: the bias keeps the packed token positive.
EXPONENT_BIAS = 100


def scaled(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sign, t, exponent) of finite float32 `values`: |v| = t * 10**(exponent - 3), t in [1000, 10000).

    Zeros have sign 0 (and t 1000, exponent 0, both ignored).
    """
    wide = values.astype(np.float64)
    sign = np.sign(wide)
    magnitude = np.where(sign != 0, np.abs(wide), 1.0)
    exponent = np.floor(np.log10(magnitude))
    t = magnitude * 10.0 ** (SIGNIFICANT_DIGITS - 1 - exponent)
    # log10 may be one ulp off at powers of ten: bring t back into its decade.
    high = t >= 10.0**SIGNIFICANT_DIGITS
    low = t < 10.0 ** (SIGNIFICANT_DIGITS - 1)
    t = np.where(high, t / 10.0, np.where(low, t * 10.0, t))
    exponent = exponent + high - low
    return sign, t, exponent


def tokens(sign: np.ndarray, t: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """One int64 per value naming its cell: sign, decimal exponent and 4-digit cell number; 0 for zero."""
    cell = np.floor(t + CELL_OFFSET)
    carry = cell >= 10.0**SIGNIFICANT_DIGITS  # 9999.6 is in the cell of 1000 of the next decade
    cell = np.where(carry, 10.0 ** (SIGNIFICANT_DIGITS - 1), cell)
    packed = (exponent + carry + EXPONENT_BIAS) * 10.0**SIGNIFICANT_DIGITS + cell
    return (sign * packed).astype(np.int64)


def training_tokens(rows: np.ndarray) -> np.ndarray:
    """Token rows of finite float32 training `rows`, then variants for values a round trip may move.

    A value within `ROUND_TRIP_TOLERANCE` of a cell boundary may be read back in the neighbouring cell, so
    each such row also appears with every combination of those values moved across (at most
    2**`MAX_AMBIGUOUS_FEATURES` variants, the values nearest a boundary first).
    """
    sign, t, exponent = scaled(rows)
    cut = tokens(sign, t, exponent)
    shifted = t + CELL_OFFSET
    fraction = shifted - np.floor(shifted)
    margin = np.minimum(fraction, 1.0 - fraction)
    ambiguous = (sign != 0) & (margin < ROUND_TRIP_TOLERANCE)
    if not ambiguous.any():
        return cut
    step = np.where(fraction < 0.5, -2.0 * ROUND_TRIP_TOLERANCE, 2.0 * ROUND_TRIP_TOLERANCE)
    across = tokens(sign, t + step, exponent)
    variants = [cut]
    for row in np.flatnonzero(ambiguous.any(axis=1)):
        columns = np.flatnonzero(ambiguous[row])
        columns = columns[np.argsort(margin[row, columns], kind="stable")][:MAX_AMBIGUOUS_FEATURES]
        subsets = ((np.arange(1, 2 ** len(columns))[:, None] >> np.arange(len(columns))) & 1).astype(bool)
        block = np.repeat(cut[row][None, :], len(subsets), axis=0)
        block[:, columns] = np.where(subsets, across[row, columns], cut[row, columns])
        variants.append(block)
    return np.concatenate(variants)
