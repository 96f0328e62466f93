"""The scoring model fitted on baseline traffic: feature percentiles, rule thresholds, an IsolationForest.

Thresholds are set in operational units: each is the (1 - target FPR) quantile of the per-client maximum of
its score on the baseline, so that about that share of baseline clients would ever have been alerted.
A few clients that would fire a rule at its floor are left out of that rule's quantile (`floor_outliers`),
so that no single client can blind a rule for everyone. A rule's threshold is never below the rule's floor,
and the forest's is positive (its anomaly scores lie in (0, 1]), so every score/threshold ratio is defined;
a model file saying otherwise is refused. Beside each threshold the model records what it was calibrated on
(`Rule.measure`): a rule that scores something else since (a newer version's rules) is not judged against a
threshold of another quantity (see `detector.scoring.scorer`).

Beside them, every baseline client's own profile (`detector.scoring.profiles`): its highest score per rule,
peak rate, output choice and schedule. A known client is judged against it as well as against the
population: a key that departs from its own history is flagged however trusted (its allow-list entry no
longer covers it), and its alert says where it departed.

On disk a model is a directory: `manifest.json` (everything but the forest, with the clients' profiles,
the forest file's SHA-256 and the SHA-256 of the manifest's own content) and `forest.skops` (skops' safe
format, never pickle).
Loading checks both hashes before reading the forest, and skops refuses any type it was not told to trust.
The hashes find a damaged or edited file, not an editor who recomputes them: the directory must be
writable by nobody but whoever trains (mounted read-only).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest

from detector.scoring.profiles import ClientProfile
from detector.scoring.rules import Rule

# 2: the manifest carries the hash of its own content; 3: the clients' profiles.
FORMAT_VERSION = 3
FOREST_FILE = "forest.skops"
MANIFEST_FILE = "manifest.json"
PERCENTILES = np.linspace(0, 100, 101)
# Beyond what a baseline can show (see `_threshold`): twice the largest benign value for rule scores, which
# are counts that a heavy benign client can double from one day to the next; for the forest's bounded
# score, a quarter of the gap between the largest and the median benign client above the largest.
EXTRAPOLATION_MARGIN = 1.0
# At most this share of baseline clients may be left out of a rule's calibration for reaching its floor
# (`floor_outliers`). A few such clients are outliers (the owner's re-scoring job, a batch scorer, an
# attacker with a few keys) that must not set the threshold for everyone; more are how this deployment is
# used, and then they are the population the threshold is calibrated on.
MAX_OUTLIER_SHARE = 0.05
# However small the baseline, this many clients at a floor are outliers, not a behaviour common to the
# traffic: two re-scoring jobs among 17 clients are 12% of them.
MIN_OUTLIERS = 3
FOREST_EXTRAPOLATION_MARGIN = 0.25
# What the forest file may contain; anything else makes skops refuse to load it.
TRUSTED_TYPES = [
    "sklearn.ensemble._iforest.IsolationForest",
    "sklearn.tree._classes.ExtraTreeRegressor",
    "sklearn.tree._tree.Tree",
    "numpy.random._mt19937.MT19937",
    "numpy.random.mtrand.RandomState",
    "builtins.slice",
]


# A model's version starts with the moment it was trained: 20261129T101500Z-fpr0.001.
_VERSION_STAMP = "%Y%m%dT%H%M%SZ"
_VERSION_STAMP_LENGTH = len("20261129T101500Z")


class ModelError(ValueError):
    """A scoring model that cannot be used (missing, tampered with, or of another format version)."""


def _manifest_hash(manifest: Mapping[str, object]) -> str:
    """The SHA-256 of `manifest` but its own hash, as canonical JSON (sorted keys, no spaces)."""
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _threshold(client_maxima: list[float], target_fpr: float) -> float:
    """The (1 - target_fpr) quantile of the clients' maxima.

    A baseline of n clients cannot tell the quantile beyond 1 - 1/n: it only shows its largest value, and the
    next day's largest benign client is as likely to lie above it as below. There the threshold is the
    largest baseline value raised by `EXTRAPOLATION_MARGIN`, so that one more benign client of the same kind
    does not page anyone.
    """
    if target_fpr * len(client_maxima) >= 1.0:
        return float(np.percentile(client_maxima, 100.0 * (1.0 - target_fpr)))
    return float(max(client_maxima, default=0.0)) * (1.0 + EXTRAPOLATION_MARGIN)


def _forest_threshold(client_maxima: list[float], target_fpr: float) -> float:
    """Like `_threshold`, for the forest's anomaly score (bounded, so the margin is additive)."""
    if target_fpr * len(client_maxima) >= 1.0:
        return float(np.percentile(client_maxima, 100.0 * (1.0 - target_fpr)))
    largest, median = float(np.max(client_maxima)), float(np.median(client_maxima))
    return largest + FOREST_EXTRAPOLATION_MARGIN * (largest - median)


def rule_maximum(rule: Rule, trajectory: Sequence[Mapping[str, float]]) -> float:
    """The highest score `rule` reached over one client's snapshots (0 if its guards never held)."""
    return max((rule.score_one(snapshot) for snapshot in trajectory), default=0.0)


def fires_at_floor(rule: Rule, maximum: float) -> bool:
    """Whether a baseline client whose highest score for `rule` is `maximum` would fire it at its floor."""
    return maximum >= rule.floor


def floor_outliers(rule: Rule, maxima: Sequence[float]) -> list[int]:
    """The baseline clients (indexes into `maxima`, their highest scores for `rule`) left out of `rule`'s
    calibration: those that would fire it at its floor, provided they are at most `MAX_OUTLIER_SHARE` of
    the clients or at most `MIN_OUTLIERS`, or the rule records exposure (it has an `escalate` table); none
    otherwise.

    One heavy legitimate client (the model owner's job re-scoring its training records) or an attacker
    present in the baseline would otherwise lift the rule's threshold for every client. They are reported
    instead, for an operator to allow-list or not. An exposure rule is never calibrated above its floor:
    recording exposure pages nobody, and what pages (its escalation) must see every harvest.
    """
    crossing = [index for index, maximum in enumerate(maxima) if fires_at_floor(rule, maximum)]
    few = len(crossing) <= max(MAX_OUTLIER_SHARE * len(maxima), MIN_OUTLIERS)
    return crossing if few or rule.escalate else []


def rule_threshold(rule: Rule, maxima: Sequence[float], target_fpr: float) -> float:
    """`rule`'s threshold from the baseline clients' highest scores `maxima`: the target quantile of those
    not left out as outliers (`floor_outliers`), never below the floor; the floor itself for a rule that
    records exposure."""
    if rule.escalate:
        return rule.floor  # exposure: see `floor_outliers`
    outliers = set(floor_outliers(rule, maxima))
    kept = [maximum for index, maximum in enumerate(maxima) if index not in outliers]
    return max(rule.floor, _threshold(kept, target_fpr))


def anomaly_matrix(snapshots: Sequence[Mapping[str, float]], names: list[str]) -> np.ndarray:
    """Snapshots as a matrix for the forest: counts are log-compressed so that volume does not dominate."""
    matrix = np.array(
        [[snapshot.get(name, 0.0) for name in names] for snapshot in snapshots], dtype=np.float64
    )
    return np.log1p(np.clip(matrix, 0.0, None))


@dataclass
class ScoringModel:
    """What `mia-detector train` learns from baseline traffic (see the module docstring)."""

    version: str
    target_fpr: float
    feature_names: list[str]
    quantiles: dict[str, list[float]]
    rule_thresholds: dict[str, float]
    forest_threshold: float
    scales: dict[str, dict[str, list[float]]]
    baseline_clients: int
    forest: IsolationForest | None = field(default=None, repr=False)
    # (model, client) -> every baseline client's own profile (`detector.scoring.calibrate.client_profiles`).
    profiles: dict[tuple[str, str], ClientProfile] = field(default_factory=dict, repr=False)
    # Rule id -> what its threshold was calibrated on (`Rule.measure`); None in a model trained before
    # these were recorded.
    rule_measures: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not (self.forest_threshold > 0.0 and math.isfinite(self.forest_threshold)):
            raise ModelError(f"the forest threshold must be positive and finite, not {self.forest_threshold}")
        # 0 is what an older model wrote for a rule its baseline never triggered: the rule's floor applies.
        wrong = {rule: value for rule, value in self.rule_thresholds.items() if not 0.0 <= value < math.inf}
        if wrong:
            raise ModelError(f"rule thresholds must be finite and not negative: {wrong}")
        measures = self.rule_measures
        if measures is not None and not (
            isinstance(measures, dict) and all(type(text) is str for text in (*measures, *measures.values()))
        ):
            raise ModelError("rule measures must name each rule's measure as text")

    def calibrated_for(self, rule: Rule) -> bool | None:
        """Whether this model's threshold for `rule` was calibrated on what the rule measures now
        (`Rule.measure`): False when on something else (the rule changed since); None when the model does
        not say (it has no threshold for the rule, or was trained before measures were recorded)."""
        if self.rule_measures is None or rule.id not in self.rule_thresholds:
            return None
        return self.rule_measures.get(rule.id) == rule.measure

    @classmethod
    def fit(
        cls,
        trajectories: list[list[dict[str, float]]],
        rules: list[Rule],
        target_fpr: float,
        scales: dict[str, dict[str, list[float]]],
        seed: int = 0,
    ) -> ScoringModel:
        """Fit on baseline clients' `trajectories`: each client's snapshots, taken as its traffic grew.

        Raises `ModelError` when the baseline holds no traffic.
        """
        snapshots = [snapshot for trajectory in trajectories for snapshot in trajectory]
        if not snapshots:
            raise ModelError("the baseline holds no traffic to learn from")
        names = sorted({name for snapshot in snapshots for name in snapshot})
        matrix = np.array([[snapshot.get(name, 0.0) for name in names] for snapshot in snapshots])
        quantiles = {
            name: np.percentile(matrix[:, i], PERCENTILES).round(6).tolist() for i, name in enumerate(names)
        }
        forest = IsolationForest(n_estimators=100, random_state=seed).fit(anomaly_matrix(snapshots, names))
        scores = -forest.score_samples(anomaly_matrix(snapshots, names))
        ends = np.cumsum([len(trajectory) for trajectory in trajectories])
        forest_maxima = [float(part.max()) for part in np.split(scores, ends[:-1]) if part.size]
        thresholds = {
            rule.id: rule_threshold(
                rule, [rule_maximum(rule, trajectory) for trajectory in trajectories], target_fpr
            )
            for rule in rules
        }
        stamp = datetime.now(UTC).strftime(_VERSION_STAMP)
        return cls(
            version=f"{stamp}-fpr{target_fpr:g}",
            target_fpr=target_fpr,
            feature_names=names,
            quantiles=quantiles,
            rule_thresholds=thresholds,
            forest_threshold=_forest_threshold(forest_maxima, target_fpr),
            scales=scales,
            baseline_clients=len(trajectories),
            forest=forest,
            rule_measures={rule.id: rule.measure for rule in rules},
        )

    @property
    def trained_at(self) -> float | None:
        """When the model was trained (epoch seconds), from its version; None for a version not made by
        `fit`."""
        try:
            stamp = datetime.strptime(self.version[:_VERSION_STAMP_LENGTH], _VERSION_STAMP)
        except ValueError:
            return None
        return stamp.replace(tzinfo=UTC).timestamp()

    def anomaly_scores(self, snapshots: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Higher is more anomalous; one micro-batch call (a one-row call costs as much as thousands)."""
        if self.forest is None or not snapshots:
            return np.zeros(len(snapshots))
        return -self.forest.score_samples(anomaly_matrix(snapshots, self.feature_names))  # type: ignore[no-any-return]

    def quantile(self, feature: str, percent: int) -> float | None:
        """The baseline snapshots' `percent`-th percentile (0-100) of `feature`, or None if unknown."""
        points = self.quantiles.get(feature)
        return None if points is None else float(points[percent])

    def percentile(self, feature: str, value: float) -> float | None:
        """Where `value` falls among baseline snapshots of `feature` (0-100), or None if unknown."""
        points = self.quantiles.get(feature)
        if points is None:
            return None
        low = int(np.searchsorted(points, value, side="left"))
        high = int(np.searchsorted(points, value, side="right"))
        return (
            float(PERCENTILES[min((low + high) // 2, 100)])
            if high > low
            else float(PERCENTILES[min(low, 100)])
        )

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write `manifest.json` and `forest.skops` into `directory` (created if needed)."""
        import skops.io

        directory.mkdir(parents=True, exist_ok=True)
        forest_path = directory / FOREST_FILE
        skops.io.dump(self.forest, forest_path)
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "target_fpr": self.target_fpr,
            "feature_names": self.feature_names,
            "quantiles": self.quantiles,
            "rule_thresholds": self.rule_thresholds,
            "rule_measures": self.rule_measures,
            "forest_threshold": self.forest_threshold,
            "scales": self.scales,
            "baseline_clients": self.baseline_clients,
            "client_profiles": [
                {"model": model, "client_id": client_id, **profile.to_json()}
                for (model, client_id), profile in sorted(self.profiles.items())
            ],
            "forest_sha256": hashlib.sha256(forest_path.read_bytes()).hexdigest(),
        }
        manifest["manifest_sha256"] = _manifest_hash(manifest)
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))

    @classmethod
    def load(cls, directory: Path) -> ScoringModel:
        """Read a model written by `save`; raise `ModelError` if anything is missing or altered, or if a
        threshold is out of range (see the module docstring)."""
        import skops.io

        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text())
            forest_bytes = (directory / FOREST_FILE).read_bytes()
        except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
            raise ModelError(f"cannot read scoring model at {directory}: {exc}") from None
        if not isinstance(manifest, dict):
            raise ModelError(f"scoring model at {directory}: {MANIFEST_FILE} is not a manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ModelError(
                f"scoring model at {directory} has format {manifest.get('format_version')},"
                f" need {FORMAT_VERSION} (train it again with mia-detector train)"
            )
        if manifest.get("manifest_sha256") != _manifest_hash(manifest):
            raise ModelError(f"scoring model at {directory}: {MANIFEST_FILE} does not match its own hash")
        if hashlib.sha256(forest_bytes).hexdigest() != manifest.get("forest_sha256"):
            raise ModelError(f"scoring model at {directory}: {FOREST_FILE} does not match its manifest hash")
        try:
            forest = skops.io.loads(forest_bytes, trusted=TRUSTED_TYPES)
        except Exception as exc:  # skops raises several types for untrusted or malformed content
            raise ModelError(f"scoring model at {directory}: unsafe or unreadable forest: {exc}") from None
        try:
            return cls(
                version=manifest["version"],
                target_fpr=manifest["target_fpr"],
                feature_names=manifest["feature_names"],
                quantiles=manifest["quantiles"],
                rule_thresholds=manifest["rule_thresholds"],
                forest_threshold=manifest["forest_threshold"],
                scales=manifest["scales"],
                baseline_clients=manifest["baseline_clients"],
                forest=forest,
                profiles={
                    (entry["model"], entry["client_id"]): ClientProfile.from_json(entry)
                    for entry in manifest["client_profiles"]
                },
                rule_measures=manifest.get("rule_measures"),
            )
        except ModelError as exc:
            raise ModelError(f"scoring model at {directory}: {exc}") from None
        except (KeyError, TypeError) as exc:  # a manifest of another shape, its hash recomputed
            raise ModelError(
                f"scoring model at {directory}: {MANIFEST_FILE} is malformed ({exc!r})"
            ) from None
