"""Scoring: the rules and the anomaly model applied to clients' feature snapshots, one `Verdict` per kind.

This is the one place where a score meets its threshold. The detector turns the verdicts that fired into
detections, the pipeline's metrics observe every verdict's ratio and the evaluation ranks clients by their
highest one: all of them read these verdicts, so they agree by construction.

A rule's score is its feature's value when every guard of the rule holds, else 0; its threshold is the one
calibrated on the baseline when a model is loaded, never below the rule's floor (which is positive), and the
floor alone when the model calibrated it on something the rule no longer measures (`stale`). Per
alert kind, the rule with the highest score/threshold ratio speaks (the first in the rules file on a tie).
The anomaly model judges clients that sent at least `ANOMALY_MIN_QUERIES` queries, one micro-batch at a
time, against the forest's threshold (positive too).

A rule with an `escalate` table (exposure, such as confidence harvesting) speaks at its escalated severity
when any of those minimums holds, and names the features that held among its contributions. With a model
loaded, each minimum is at least the baseline's `ESCALATION_PERCENTILE` of its feature.

`score` gives both; its two parts, `score_rules` and `score_anomalies`, are what the detector calls at its
own cadences (the rules on every batch, the forest at each commit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from detector.domain import AlertKind, Reason, Severity, Verdict, Verdicts
from detector.features.volume import QUERIES_FEATURE
from detector.scoring.model import ScoringModel
from detector.scoring.rules import ATLAS_EXFILTRATION_VIA_INFERENCE_API, Rule

Snapshot = Mapping[str, float]  # a client's feature values by name (`ClientFeatures.snapshot`)

ANOMALY_MIN_QUERIES = 20  # the forest judges behaviour, and a handful of queries shows none
ANOMALY_RULE_ID = "MIA-ANOMALY"
ANOMALY_CONTRIBUTIONS = 5
# Escalation asks for more than the population's usual rate of a feature, measured where a few heavy clients
# (the owner's re-scoring jobs) cannot lift it.
ESCALATION_PERCENTILE = 90
ANOMALY_TRIAGE = (
    "The client's traffic is unlike any baseline client's in the combination of features listed; no single "
    "rule fired. Read the top reasons, then the client's sessions and evidence events."
)


class Scorer:
    """The rules (thresholds calibrated by `model`, if any) and the model's forest; see the module docstring.

    The rules and the model are fixed for the scorer's life: thresholds are worked out once.
    """

    def __init__(self, rules: Sequence[Rule], model: ScoringModel | None = None) -> None:
        self.rules = list(rules)
        self.model = model
        # Rules whose calibrated threshold measured something else: a model trained by another version.
        self.stale = [rule for rule in self.rules if model and model.calibrated_for(rule) is False]
        kinds: dict[AlertKind, list[tuple[Rule, float]]] = {}
        for rule in self.rules:
            kinds.setdefault(rule.kind, []).append((rule, self.threshold(rule)))
        self._kinds = [(kind, tuple(rules_of_kind)) for kind, rules_of_kind in kinds.items()]
        self._escalations = {rule.id: self.escalation(rule) for rule in self.rules if rule.escalate}

    def escalation(self, rule: Rule) -> dict[str, float]:
        """The minimums of `rule`'s `escalate` table in force: with a model, none below the baseline's
        `ESCALATION_PERCENTILE` of its feature."""
        minimums = {}
        for feature, minimum in rule.escalate.items():
            usual = self.model.quantile(feature, ESCALATION_PERCENTILE) if self.model else None
            minimums[feature] = max(minimum, usual) if usual is not None else minimum
        return minimums

    def threshold(self, rule: Rule) -> float:
        """The rule's threshold: calibrated on the baseline when a model is loaded (and calibrated it on what
        the rule measures), never below its floor."""
        calibrated = 0.0
        if self.model is not None and self.model.calibrated_for(rule) is not False:
            calibrated = self.model.rule_thresholds.get(rule.id, 0.0)
        return max(rule.floor, calibrated)

    def score(self, snapshots: Sequence[Snapshot]) -> list[Verdicts]:
        """Every verdict on each of `snapshots`: one per kind of the rules, and the anomaly model's when it
        judges the client (`score_anomalies`)."""
        anomalies = self.score_anomalies(snapshots)
        scored = []
        for snapshot, anomaly in zip(snapshots, anomalies, strict=True):
            verdicts = self.score_rules(snapshot)
            if anomaly is not None:
                verdicts[anomaly.kind] = anomaly
            scored.append(verdicts)
        return scored

    def score_rules(self, snapshot: Snapshot) -> Verdicts:
        """The rules' verdicts on one snapshot: for each alert kind of the rules, the verdict of its rule
        with the highest score/threshold ratio, in the order the kinds first appear in the rules."""
        verdicts: Verdicts = {}
        for kind, rules in self._kinds:
            best, best_threshold = rules[0]
            best_score = best.score_one(snapshot)
            for rule, threshold in rules[1:]:
                score = rule.score_one(snapshot)
                if score / threshold > best_score / best_threshold:
                    best, best_threshold, best_score = rule, threshold, score
            severity, contributions = best.severity, best.explain
            minimums = self._escalations.get(best.id)
            if minimums and best_score >= best_threshold:
                severity, contributions = best.escalated(snapshot, minimums)
            verdicts[kind] = Verdict(
                kind,
                best.id,
                float(best_score),
                best_threshold,
                severity,
                contributions,
                best.triage,
                best.atlas,
            )
        return verdicts

    def score_anomalies(self, snapshots: Sequence[Snapshot]) -> list[Verdict | None]:
        """The anomaly model's verdict on each of `snapshots`, all scored in one micro-batch; None for a
        client with fewer than `ANOMALY_MIN_QUERIES` queries, and for every client without a forest.

        Contributions are the features furthest into the baseline's tail, ranked only when the verdict
        fired: ranking every feature of every client judged would cost more than scoring it.
        """
        verdicts: list[Verdict | None] = [None] * len(snapshots)
        model = self.model
        if model is None or model.forest is None:
            return verdicts
        eligible = [
            index
            for index, snapshot in enumerate(snapshots)
            if snapshot.get(QUERIES_FEATURE, 0.0) >= ANOMALY_MIN_QUERIES
        ]
        if not eligible:
            return verdicts
        scores = model.anomaly_scores([snapshots[index] for index in eligible])
        threshold = model.forest_threshold
        for index, score in zip(eligible, scores, strict=True):
            fired = score >= threshold
            verdicts[index] = Verdict(
                AlertKind.ANOMALOUS_SESSION,
                ANOMALY_RULE_ID,
                float(score),
                threshold,
                Severity.MEDIUM,
                self._unusual(snapshots[index], model) if fired else (),
                ANOMALY_TRIAGE,
                ATLAS_EXFILTRATION_VIA_INFERENCE_API,
            )
        return verdicts

    def explain(self, snapshot: Snapshot, verdict: Verdict) -> list[Reason]:
        """The verdict's contributions as reasons: each feature's value in `snapshot` and, when a model is
        loaded, where that value falls among the baseline's."""
        model = self.model
        reasons = []
        for name in verdict.contributions:
            value = snapshot.get(name, 0.0)
            reasons.append(
                Reason(
                    feature=name,
                    value=round(value, 6),
                    baseline_percentile=model.percentile(name, value) if model else None,
                )
            )
        return reasons

    @staticmethod
    def _unusual(snapshot: Snapshot, model: ScoringModel) -> tuple[str, ...]:
        ranked = sorted(snapshot, key=lambda name: -(model.percentile(name, snapshot[name]) or 0.0))
        return tuple(ranked[:ANOMALY_CONTRIBUTIONS])
