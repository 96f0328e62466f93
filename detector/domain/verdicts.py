"""Verdicts: what scoring says about one client for one alert kind, before anything is decided.

Scoring and deciding are separate: a `Verdict` carries the score of the rule (or model) that speaks for the
kind, its threshold and the features that explain it. The detector turns the verdicts that fired into
detections, the metrics observe every verdict's ratio, the evaluation ranks clients by their highest one:
all three read the same verdicts, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from detector.domain.alerts import AlertKind, Severity

# An open alert stays open while its verdict holds at this share of the threshold or more: a score wavering
# just around the threshold (a rate diluted by cover traffic) does not resolve and reopen the incident.
HOLD_RATIO = 0.8


@dataclass(frozen=True, slots=True)
class Verdict:
    """One alert kind judged on one client's features: the rule (or model) furthest towards its threshold.

    `score` is the rule's feature value (0 when one of the rule's guards does not hold) or the model's
    anomaly score; `threshold` is what the score must reach to fire. `contributions` names the features
    that explain the verdict, most telling first: a rule's own explanation, or for the anomaly model the
    features furthest into the baseline's tail when it fired. Raises `ValueError` unless the threshold is
    positive and finite and the score finite, so `ratio` is always defined.
    """

    kind: AlertKind
    rule_id: str
    score: float
    threshold: float
    severity: Severity
    contributions: tuple[str, ...]
    triage: str
    atlas: str

    def __post_init__(self) -> None:
        if not (self.threshold > 0.0 and math.isfinite(self.threshold) and math.isfinite(self.score)):
            raise ValueError(
                f"{self.rule_id}: score {self.score} must be finite and threshold {self.threshold} positive"
            )

    @property
    def fired(self) -> bool:
        """True when the score reached the threshold."""
        return self.score >= self.threshold

    @property
    def holds(self) -> bool:
        """True when the score is within the hold band or above: an open alert of the kind stays open."""
        return self.score >= HOLD_RATIO * self.threshold

    @property
    def ratio(self) -> float:
        """How far the score is towards its threshold (1.0 = at it), comparable across rules and kinds."""
        return self.score / self.threshold


# Per client: the verdict of each alert kind judged.
Verdicts = dict[AlertKind, Verdict]
