"""The served models: scikit-learn's bundled datasets, split into members and non-members, and forests
trained on the members that answer every simulated query.

`credit-risk` is `load_breast_cancer` (30 features, 2 classes) and `digits` is `load_digits` (8x8 images,
64 features in 0-16, 10 classes); neither needs a download. Each dataset is split at random (by the
simulation seed) into members, the training set, and non-members, about half each. The forests are
grown to pure leaves, so members get more confident answers than non-members: membership inference has a
real signal to find (`ServedModel.membership_auc` measures it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score

Rows = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]

# Below this many rows a query walks all trees at once in numpy; above it, each tree's compiled `apply`
# over the whole batch is faster.
_VECTORISED_BELOW = 32


class Forest:
    """A fitted `RandomForestClassifier` evaluated without scikit-learn's per-call overhead.

    `predict_proba` returns exactly what the estimator's own `predict_proba` returns (the mean of the
    trees' leaf class fractions, features compared as float32), at a fraction of the cost per call: the
    simulator asks one row at a time hundreds of thousands of times.
    """

    def __init__(self, estimator: RandomForestClassifier) -> None:
        trees = [tree.tree_ for tree in estimator.estimators_]
        offsets = np.cumsum([0] + [tree.node_count for tree in trees])
        self._trees = trees
        self._roots = offsets[:-1]
        self._depth = max(int(tree.max_depth) for tree in trees)
        # Leaves point at themselves, so every row can take `depth` steps whatever its leaf's depth.
        self._feature = np.concatenate([np.maximum(tree.feature, 0) for tree in trees])
        self._threshold = np.concatenate([tree.threshold for tree in trees])
        self._left = np.concatenate(
            [
                np.where(tree.children_left < 0, np.arange(tree.node_count), tree.children_left) + offset
                for tree, offset in zip(trees, offsets, strict=False)
            ]
        )
        self._right = np.concatenate(
            [
                np.where(tree.children_right < 0, np.arange(tree.node_count), tree.children_right) + offset
                for tree, offset in zip(trees, offsets, strict=False)
            ]
        )
        self._values = [_fractions(tree.value[:, 0, :]) for tree in trees]
        self._all_values = np.concatenate(self._values)

    def predict_proba(self, rows: Rows) -> Rows:
        """Class probabilities of `rows` ([B, D]) as [B, C]."""
        data = np.ascontiguousarray(rows, dtype=np.float32)
        if len(data) < _VECTORISED_BELOW:
            node = np.broadcast_to(self._roots, (len(data), len(self._roots))).copy()
            row = np.arange(len(data))[:, None]
            for _ in range(self._depth):
                go_left = data[row, self._feature[node]] <= self._threshold[node]
                node = np.where(go_left, self._left[node], self._right[node])
            walked: Rows = self._all_values[node].mean(axis=1)
            return walked
        total = np.zeros((len(data), self._all_values.shape[1]))
        for tree, values in zip(self._trees, self._values, strict=True):
            total += values[tree.apply(data)]
        return total / len(self._trees)


def _fractions(counts: Rows) -> Rows:
    # Older scikit-learn releases store weighted counts in the leaves, newer ones fractions.
    return counts / counts.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class _ModelSpec:
    name: str
    version: str
    load: Callable[..., Any]
    image_side: int | None
    # Without bootstrap every tree sees every member (members then always get confidence 1.0): that is
    # how strongly the small, easy tabular set must overfit for a confidence attack to have an edge; the
    # image set leaks as much with bootstrap on.
    bootstrap: bool


_SPECS = (
    _ModelSpec("credit-risk", "3", load_breast_cancer, None, bootstrap=False),
    _ModelSpec("digits", "7", load_digits, 8, bootstrap=True),
)
MODEL_NAMES: tuple[str, ...] = tuple(spec.name for spec in _SPECS)
"""The names of the served models, in a fixed order."""

_TREES = 50


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One deployed model: its dataset split, the trained forest, and what clients see of the data.

    `members` are the training rows (float64, exactly as in the dataset), `non_members` the held-out
    rows; `lower`/`upper` are the per-feature extremes of the whole dataset, `std` its per-feature
    standard deviation, and `decimals` how many decimals each feature is recorded with (0 for pixels).
    """

    name: str
    version: str
    members: Rows
    member_labels: Labels
    non_members: Rows
    non_member_labels: Labels
    lower: Rows
    upper: Rows
    std: Rows
    decimals: npt.NDArray[np.int64]
    image_side: int | None
    n_classes: int
    estimator: RandomForestClassifier
    forest: Forest
    _member_keys: frozenset[bytes] = field(repr=False)
    # Non-member indices sorted by class, and where each class starts in that order and how many it has.
    _by_class: npt.NDArray[np.intp] = field(repr=False)
    _class_starts: npt.NDArray[np.intp] = field(repr=False)
    _class_counts: npt.NDArray[np.intp] = field(repr=False)

    @property
    def n_features(self) -> int:
        """The number of input features per row."""
        return int(self.members.shape[1])

    def predict_proba(self, rows: Rows) -> Rows:
        """The model's answer to `rows` ([B, D]): class probabilities [B, C]."""
        return self.forest.predict_proba(rows)

    def labels(self, rows: Rows) -> Labels:
        """The model's predicted class of each row (what `predict` answers)."""
        predicted: Labels = self.predict_proba(rows).argmax(axis=1)
        return predicted

    def is_member_row(self, row: Rows) -> bool:
        """True when `row`, read as float32 like the detector reads it, is exactly a training row."""
        return row.astype(np.float32).tobytes() in self._member_keys

    def without_member_rows(self, rows: Rows) -> Rows:
        """`rows` less any row that is exactly a training row (float32 comparison)."""
        keep = [not self.is_member_row(row) for row in rows]
        return rows if all(keep) else rows[np.array(keep, dtype=bool)]

    def quantize(self, rows: Rows) -> Rows:
        """Clip `rows` to the dataset's range and round each feature to the decimals the dataset uses.

        Synthesised records then look like recorded ones: integer pixels, `17.99`-style measurements.
        """
        clipped = np.clip(rows, self.lower, self.upper)
        out = np.empty_like(clipped)
        for places in np.unique(self.decimals):
            columns = self.decimals == places
            out[:, columns] = np.round(clipped[:, columns], int(places))
        return out

    def synthesize(self, rng: np.random.Generator, count: int) -> Rows:
        """`count` plausible new records: never a training row, never a verbatim non-member.

        Each is a random blend of two non-members of the same class plus noise (5% of each feature's
        standard deviation for tables; about one grey level on the strokes of images), clipped and rounded
        like the dataset. Blending keeps new records spread over the data's range instead of clustering
        around the few hundred held-out rows.
        """
        rows: list[Rows] = []
        have = 0
        while have < count:
            need = count - have
            first = rng.integers(len(self.non_members), size=need)
            labels = self.non_member_labels[first]
            # A uniformly drawn non-member of the same class: offset into that class's slice of `_by_class`.
            offset = (rng.random(need) * self._class_counts[labels]).astype(np.intp)
            second = self._by_class[self._class_starts[labels] + offset]
            weight = rng.random((need, 1))
            blend = weight * self.non_members[first] + (1.0 - weight) * self.non_members[second]
            # Images get noise on their strokes only: real scans have a clean blank background.
            scale = 0.7 * (blend > 0.5) if self.image_side else 0.05 * self.std
            fresh = self.without_member_rows(self.quantize(blend + rng.normal(size=blend.shape) * scale))
            rows.append(fresh)
            have += len(fresh)
        return np.concatenate(rows)[:count]

    def membership_auc(self) -> float:
        """ROC AUC of the true-class confidence separating members from non-members (0.5: no leak)."""
        member = self.predict_proba(self.members)[np.arange(len(self.members)), self.member_labels]
        other = self.predict_proba(self.non_members)[np.arange(len(self.non_members)), self.non_member_labels]
        truth = np.r_[np.ones(len(member)), np.zeros(len(other))]
        return float(roc_auc_score(truth, np.r_[member, other]))

    def describe(self) -> dict[str, Any]:
        """Metadata for `scenario.json`: sizes, accuracy on members and non-members, leakage."""
        return {
            "version": self.version,
            "estimator": f"RandomForestClassifier(n_estimators={_TREES}, bootstrap="
            f"{self.estimator.bootstrap})",
            "features": self.n_features,
            "classes": self.n_classes,
            "members": len(self.members),
            "non_members": len(self.non_members),
            "member_accuracy": round(float(np.mean(self.labels(self.members) == self.member_labels)), 4),
            "non_member_accuracy": round(
                float(np.mean(self.labels(self.non_members) == self.non_member_labels)), 4
            ),
            "membership_auc": round(self.membership_auc(), 4),
        }


@cache
def load_models(seed: int) -> dict[str, ServedModel]:
    """The served models for `seed`, by name: the member split and the forests depend on the seed only.

    Cached, so that a process simulating several scenarios with one seed trains each model once.
    """
    return {spec.name: _train(spec, seed, stream) for stream, spec in enumerate(_SPECS)}


def dataset_scale(name: str) -> tuple[Rows, Rows]:
    """The per-feature mean and standard deviation of the whole dataset of the served model `name` (its
    `std`), read without training anything; `KeyError` for another name."""
    spec = next((spec for spec in _SPECS if spec.name == name), None)
    if spec is None:
        raise KeyError(name)
    data = np.asarray(spec.load(return_X_y=True)[0], dtype=np.float64)
    return data.mean(axis=0), data.std(axis=0)


def _train(spec: _ModelSpec, seed: int, stream: int) -> ServedModel:
    data, target = spec.load(return_X_y=True)
    data = np.asarray(data, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    rng = np.random.default_rng([seed, stream])
    order = rng.permutation(len(data))
    half = len(data) // 2
    members, non_members = np.sort(order[:half]), np.sort(order[half:])
    estimator = RandomForestClassifier(
        n_estimators=_TREES, bootstrap=spec.bootstrap, random_state=seed % 2**31, n_jobs=1
    )
    estimator.fit(data[members], target[members])
    decimals = np.array([_decimals(column) for column in data.T], dtype=np.int64)
    counts = np.bincount(target[non_members], minlength=len(estimator.classes_))
    return ServedModel(
        name=spec.name,
        version=spec.version,
        members=data[members],
        member_labels=target[members],
        non_members=data[non_members],
        non_member_labels=target[non_members],
        lower=data.min(axis=0),
        upper=data.max(axis=0),
        std=data.std(axis=0),
        decimals=decimals,
        image_side=spec.image_side,
        n_classes=len(estimator.classes_),
        estimator=estimator,
        forest=Forest(estimator),
        _member_keys=frozenset(row.astype(np.float32).tobytes() for row in data[members]),
        _by_class=np.argsort(target[non_members], kind="stable"),
        _class_starts=np.r_[0, np.cumsum(counts)[:-1]],
        _class_counts=counts,
    )


def _decimals(column: Rows) -> int:
    """The fewest decimals (up to 8) that reproduce every value of `column`."""
    return next((places for places in range(9) if np.array_equal(np.round(column, places), column)), 8)
