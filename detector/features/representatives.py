"""The points that stand for a client's record clusters, kept small: the recent exact, the others quantised.

A cluster is represented by its latest member's point. Held as float32 those points were most of a client's
memory (256 x 32 x 4 bytes). Here only the `HOT` (to `EXACT_ROWS`) most recently matched slots keep their
point exact, with its shift/flip-invariant view: those are where probing happens (a boundary walk's steps
shrink far below the quantisation error, an augmentation burst follows its record within a few queries).
The other slots keep their point as 32 int8 codes, a float32 scale and norm (41 bytes with their exact
row's index; distances off by about 0.005 of the unit): enough to tell whether a query returns to an old
record (`VARIANT_RADIUS` is 0.12). Image rows' invariant views are kept so too (40 more bytes a slot, for
image clients only): augmentation probing in rounds returns to every record shifted or flipped a whole
round later, long after it left the exact rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from detector.features.columns import extended, sequences
from detector.features.embedding import PROJECTION_DIM
from detector.features.state_bytes import stored_column

# The slots kept exact: the recent clusters a probing burst returns to.
HOT = 16
# The exact rows held: when all are in use, the `EXACT_ROWS - HOT` least recent are quantised in one batch of
# array calls. Fewer spare rows mean more frequent (smaller) batches; each spare row costs every client that
# uses it 138 bytes (its float32 point, half norm, slot and recency), more for image rows' invariant view.
EXACT_ROWS = HOT + HOT // 2
_CODE_MAX = 127.0


def quantised(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `points` as int8 codes and one float32 scale a row (code x scale ≈ point)."""
    scales = np.abs(points).max(axis=1) / _CODE_MAX
    # A zero (or underflowing) row keeps scale 1: its codes are all zero either way.
    scales = np.where((scales > 0) & np.isfinite(scales), scales, 1.0).astype(np.float32)
    codes = np.rint(points / scales[:, None]).astype(np.int8)
    return codes, scales


def _half_norms(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Half the squared norm of each quantised point (codes x scale)."""
    halves: np.ndarray = np.einsum("ij,ij->i", codes, codes, dtype=np.float32) * (scales * scales / 2)
    return halves


def _squared(bracket: float, point: np.ndarray) -> float:
    """The squared distance to `point` of the row of `bracket` (see `QuantisedRows.nearest`): never below 0
    however the sums round; +inf for none."""
    return max(2.0 * bracket + float(point @ point), 0.0)


def _half_norm(point: np.ndarray) -> float:
    """Half the squared norm of one exact point."""
    return float(point @ point) / 2


class QuantisedRows:
    """Rows held quantised, one a slot (see `quantised`), with half each row's squared norm: the nearest
    row then takes one product (codes @ point). A slot not held here (never put, or `released`: held
    elsewhere) has half norm +inf and scale 0, and is never the nearest."""

    __slots__ = ("codes", "half_norms", "scales")

    def __init__(self, capacity: int) -> None:
        self.codes = np.zeros((capacity, PROJECTION_DIM), dtype=np.int8)
        self.scales = np.zeros(capacity, dtype=np.float32)
        self.half_norms = np.full(capacity, np.inf, dtype=np.float32)

    def grow(self, capacity: int) -> None:
        """Hold `capacity` slots (more than now), the present ones unchanged."""
        self.codes = extended(self.codes, capacity, 0)
        self.scales = extended(self.scales, capacity, 0.0)
        self.half_norms = extended(self.half_norms, capacity, np.inf)

    def hold(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """`slots` hold `rows` quantised; a row that is not finite (no point to hold) is released."""
        finite = np.isfinite(rows).all(axis=1)
        codes, scales = quantised(rows[finite])
        held = slots[finite]
        self.codes[held], self.scales[held] = codes, scales
        self.half_norms[held] = _half_norms(codes, scales)
        self.release(slots[~finite])

    def release(self, slots: int | np.ndarray) -> None:
        """`slots` hold nothing here any more."""
        self.scales[slots] = 0.0
        self.half_norms[slots] = np.inf

    def row(self, slot: int) -> np.ndarray:
        """The point `slot` holds, as quantised."""
        point: np.ndarray = self.codes[slot] * self.scales[slot]
        return point

    def nearest(self, point: np.ndarray, used: int) -> tuple[int, float]:
        """The slot among the first `used` whose row is nearest `point`, and its bracket |x|^2 / 2 - x . p
        (+inf when none holds a row): the squared distance is 2 x bracket + |p|^2, within the quantisation
        error. Brackets compare without |p|^2, which is the same for every row."""
        brackets = self.codes[:used] @ point
        brackets *= self.scales[:used]
        np.subtract(self.half_norms[:used], brackets, out=brackets)
        slot = int(brackets.argmin())
        return slot, float(brackets[slot])

    def state(self, used: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the codes and scales of the first `used` slots."""
        return self.codes[:used].copy(), self.scales[:used].copy()

    @classmethod
    def of(cls, codes: Any, scales: Any, used: int, capacity: int) -> QuantisedRows:
        """The rows of the first `used` slots as `state` gave them (or as a state stored them, see
        `stored_column`) in a column of `capacity`; a scale of 0 holds nothing. Raises `ValueError` unless
        there is one finite scale, 0 or more, a slot."""
        held = cls(capacity)
        if used:
            stored_scales = stored_column(scales, "<f4")
            if stored_scales.shape != (used,) or not np.all(
                np.isfinite(stored_scales) & (stored_scales >= 0)
            ):
                raise ValueError("a stored state's quantised rows do not have one finite scale a slot")
            held.codes[:used] = stored_column(codes, "<i1").reshape(used, PROJECTION_DIM)
            held.scales[:used] = stored_scales
            valid = stored_scales > 0
            norms = _half_norms(held.codes[:used], held.scales[:used])
            held.half_norms[:used] = np.where(valid, norms, np.inf)
        return held


class Representatives:
    """One point a slot: exact (with the invariant view) for at least the `HOT` most recently put or touched,
    quantised for the others. Slots are numbered by the caller, from 0, and grown with `grow`.

    Exact rows are filled in order; when all `EXACT_ROWS` are in use all but the `HOT` most recent are
    quantised at once (one batch of array calls every `EXACT_ROWS - HOT` new records, not one each) and the
    `HOT` move to the front.
    """

    __slots__ = (
        "_exact_count",
        "_exact_half_norms",
        "_exact_invariants",
        "_exact_points",
        "_exact_slots",
        "_exact_touched",
        "_invariants",
        "_points",
        "_row_of",
    )

    def __init__(self, capacity: int = 4) -> None:
        # Quantised points, held for the slots without an exact row.
        self._points = QuantisedRows(capacity)
        self._row_of = np.full(capacity, -1, dtype=np.int8)  # each slot's exact row, -1 for none
        # As many exact rows as slots, up to EXACT_ROWS; the first `_exact_count` are in use.
        rows = min(EXACT_ROWS, capacity)
        self._exact_count = 0
        self._exact_slots = np.zeros(rows, dtype=np.int16)
        self._exact_points = np.zeros((rows, PROJECTION_DIM), dtype=np.float32)
        self._exact_half_norms = np.zeros(rows, dtype=np.float32)
        self._exact_touched = np.zeros(rows, dtype=np.int32)
        # The invariant views, once a client sent an image row: exact beside the exact points (+inf for a row
        # without one: never within any radius of a query's), quantised for the other slots.
        self._exact_invariants: np.ndarray | None = None
        self._invariants: QuantisedRows | None = None

    def grow(self, capacity: int) -> None:
        """Hold `capacity` slots (more than now), the present ones unchanged."""
        self._points.grow(capacity)
        if self._invariants is not None:
            self._invariants.grow(capacity)
        self._row_of = extended(self._row_of, capacity, -1)
        rows = min(EXACT_ROWS, capacity)
        self._exact_slots = extended(self._exact_slots, rows, 0)
        self._exact_points = extended(self._exact_points, rows, 0.0)
        self._exact_half_norms = extended(self._exact_half_norms, rows, 0.0)
        self._exact_touched = extended(self._exact_touched, rows, 0)
        if self._exact_invariants is not None:
            self._exact_invariants = extended(self._exact_invariants, rows, np.inf)

    def put(self, slot: int, point: np.ndarray, invariant: np.ndarray | None, now: int) -> None:
        """`point` (and its invariant view) now represents `slot`, put at query sequence `now`."""
        self._keep_exact(slot, point, invariant, now)

    def touch(self, slot: int, invariant: np.ndarray | None, now: int) -> None:
        """`slot` was matched at `now` without a new point (an exact repeat): it becomes one of the recent.
        Brought back from the quantised columns, its exact point (and invariant view) is lost; `invariant`
        (the repeat's, maybe of an older member) serves only a slot that held none."""
        row = int(self._row_of[slot])
        if row >= 0:
            self._exact_touched[row] = now
            return
        invariants = self._invariants
        if invariants is not None and invariants.scales[slot] > 0:
            invariant = invariants.row(slot)  # the latest member's, as the point is
        self._keep_exact(slot, self._points.row(slot), invariant, now)

    def rebase(self, shift: int) -> None:
        """Move every put and touch back `shift` queries (see `detector.features.columns.sequences`)."""
        self._exact_touched = sequences(self._exact_touched, shift)

    def nearest(self, point: np.ndarray, used: int) -> tuple[int, float]:
        """The slot nearest `point` among the first `used` (at least one) and its squared distance, exact
        to a slot with an exact row, within the quantisation error to the others."""
        # |x - p|^2 = 2 (|x|^2 / 2 - x . p) + |p|^2: the nearest slot minimises the bracket.
        exact = self._exact_count
        slot, row, best = 0, -1, math.inf
        if exact:
            brackets = self._exact_points[:exact] @ point
            np.subtract(self._exact_half_norms[:exact], brackets, out=brackets)
            row = int(brackets.argmin())
            slot, best = int(self._exact_slots[row]), float(brackets[row])
        if used > exact:
            older, bracket = self._points.nearest(point, used)
            if bracket < best:
                slot, row, best = older, -1, bracket
        if row >= 0:
            # Measured again on the difference: the bracket's float32 sums lose the steps of a walk.
            difference = self._exact_points[row] - point
            return slot, float(difference @ difference)
        return slot, _squared(best, point)

    def nearest_invariant(self, invariant: np.ndarray, used: int) -> tuple[int, float] | None:
        """Among the first `used` slots, the one whose invariant view is nearest `invariant`, with the
        squared distance (exact to a slot with an exact row, within the quantisation error to the others);
        None when none of them has one."""
        if self._exact_invariants is None or invariant.shape[0] != PROJECTION_DIM:
            return None
        exact = self._exact_count
        slot, squared = 0, math.inf
        if exact:
            difference = self._exact_invariants[:exact] - invariant
            distances = np.einsum("ij,ij->i", difference, difference)
            row = int(distances.argmin())
            slot, squared = int(self._exact_slots[row]), float(distances[row])
        if self._invariants is not None and used > exact:
            older, bracket = self._invariants.nearest(invariant, used)
            distance = _squared(bracket, invariant)
            if distance < squared:
                slot, squared = older, distance
        return (slot, squared) if math.isfinite(squared) else None

    def _keep_exact(self, slot: int, point: np.ndarray, invariant: np.ndarray | None, now: int) -> None:
        row = int(self._row_of[slot])
        if row < 0:
            if self._exact_count == self._exact_slots.shape[0]:
                self._quantise_least_recent()
            row = self._exact_count
            self._exact_count += 1
            self._exact_slots[row] = slot
            self._row_of[slot] = row
            self._points.release(slot)
            if self._invariants is not None:
                self._invariants.release(slot)
        self._exact_points[row] = point
        self._exact_half_norms[row] = _half_norm(point)
        self._exact_touched[row] = now
        usable = invariant is not None and invariant.shape[0] == PROJECTION_DIM
        if usable and self._exact_invariants is None:
            rows = self._exact_slots.shape[0]
            self._exact_invariants = np.full((rows, PROJECTION_DIM), np.inf, dtype=np.float32)
        if self._exact_invariants is not None:
            self._exact_invariants[row] = invariant if usable else np.inf

    def _quantise_least_recent(self) -> None:
        """Quantise the slots of all exact rows but the `HOT` most recent; move those to the front."""
        count = self._exact_count
        order = self._exact_touched[:count].argsort(kind="stable")
        older, recent = order[: count - HOT], order[count - HOT :]
        invariants = self._exact_invariants
        self._quantise(
            self._exact_slots[older],
            self._exact_points[older],
            None if invariants is None else invariants[older],
        )
        for column in (self._exact_slots, self._exact_points, self._exact_half_norms, self._exact_touched):
            column[:HOT] = column[recent]
        if invariants is not None:
            invariants[:HOT] = invariants[recent]
        self._row_of[self._exact_slots[:HOT]] = np.arange(HOT)
        self._exact_count = HOT

    def _quantise(self, slots: np.ndarray, points: np.ndarray, invariants: np.ndarray | None) -> None:
        """`slots` keep their `points` (and `invariants`, +inf rows for none) quantised, and no exact row."""
        self._points.hold(slots, points)
        if invariants is not None:
            if self._invariants is None:
                self._invariants = QuantisedRows(self._row_of.shape[0])
            self._invariants.hold(slots, invariants)
        self._row_of[slots] = -1

    # -- state ---------------------------------------------------------------------------------------------

    def state(self, used: int) -> dict[str, Any]:
        """The state of the first `used` slots (numpy columns beside plain values, see
        `detector.features.state_bytes`), sharing nothing with this object."""
        exact = slice(0, self._exact_count)
        codes, scales = self._points.state(used)
        invariant_codes, invariant_scales = (
            (None, None) if self._invariants is None else self._invariants.state(used)
        )
        exact_invariants = self._exact_invariants
        return {
            "codes": codes,
            "scales": scales,
            "invariant_codes": invariant_codes,
            "invariant_scales": invariant_scales,
            "exact_slots": self._exact_slots[exact].copy(),
            "exact_points": self._exact_points[exact].copy(),
            "exact_invariants": None if exact_invariants is None else exact_invariants[exact].copy(),
            "exact_touched": self._exact_touched[exact].copy(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], used: int, capacity: int, shift: int = 0) -> Representatives:
        """The representatives `state` holds (see `state`), for `used` slots in a column of `capacity`, their
        sequences moved back `shift` (see `rebase`). A state holding more exact rows than are kept (stored
        by a version keeping more) comes back with all but the `HOT` most recent quantised; one stored
        before quantised invariant views were kept, with the invariant views of its exact rows only. Raises
        `ValueError` on exact rows of slots not held, or two of one slot."""
        kept = cls(capacity)
        kept._points = QuantisedRows.of(state["codes"], state["scales"], used, capacity)
        if state.get("invariant_codes") is not None:
            kept._invariants = QuantisedRows.of(
                state["invariant_codes"], state["invariant_scales"], used, capacity
            )
        slots = np.array(state["exact_slots"], dtype=np.int16)
        exact = slots.shape[0]
        if slots.ndim != 1 or (exact and (slots.min() < 0 or slots.max() >= used)):
            raise ValueError("a stored state's exact rows are not of slots it holds")
        if np.unique(slots).shape[0] != exact:
            raise ValueError("a stored state holds two exact rows of one slot")
        touched = sequences(state["exact_touched"], shift)
        points = stored_column(state["exact_points"], "<f4").reshape(exact, PROJECTION_DIM)
        stored = state["exact_invariants"]
        invariants = None if stored is None else stored_column(stored, "<f4").reshape(exact, PROJECTION_DIM)
        if exact > kept._exact_slots.shape[0]:
            order = touched.argsort(kind="stable")
            older, recent = order[: exact - HOT], order[exact - HOT :]
            kept._quantise(slots[older], points[older], None if invariants is None else invariants[older])
            slots, touched, points = slots[recent], touched[recent], points[recent]
            invariants = None if invariants is None else invariants[recent]
            exact = HOT
        kept._exact_count = exact
        kept._exact_slots[:exact] = slots
        kept._row_of[slots] = np.arange(exact)
        kept._points.release(slots)
        if kept._invariants is not None:
            kept._invariants.release(slots)
        kept._exact_touched[:exact] = touched
        kept._exact_points[:exact] = points
        kept._exact_half_norms[:exact] = [_half_norm(point) for point in points]
        if invariants is not None:
            rows = kept._exact_slots.shape[0]
            kept._exact_invariants = np.full((rows, PROJECTION_DIM), np.inf, dtype=np.float32)
            kept._exact_invariants[:exact] = invariants
        return kept

    @classmethod
    def of_points(
        cls, points: np.ndarray, invariants: np.ndarray | None, touched_at: np.ndarray, capacity: int
    ) -> Representatives:
        """The representatives of exact `points` (and `invariants`), one a slot, matched at `touched_at`:
        what a state stored with float32 points comes back as."""
        kept = cls(capacity)
        used = points.shape[0]
        if used:
            kept._quantise(np.arange(used), points, invariants)
        for slot in touched_at.argsort(kind="stable")[-HOT:]:  # the most recent put last, as they were
            invariant = None if invariants is None else invariants[slot]
            kept._keep_exact(int(slot), points[slot], invariant, int(touched_at[slot]))
        return kept
