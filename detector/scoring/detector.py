"""Deciding: rules and the anomaly model applied to clients' feature snapshots, explained, allow-list aware.

Scoring is separate from deciding: a rule's score is a feature value, the anomaly score comes from the
forest; `Detector` compares each with its threshold (calibrated, or the rule's floor when no model is
loaded) and turns what crosses it into a `Detection` with its reasons and evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from detector.alerts.model import AlertKind, Detection, Reason, Severity
from detector.features.client import ClientFeatures, ClientKey
from detector.scoring.model import ScoringModel
from detector.scoring.rules import ATLAS_EXFILTRATION_VIA_INFERENCE_API, Rule

EVIDENCE_KINDS: dict[AlertKind, tuple[str, ...]] = {
    AlertKind.BOUNDARY_PROBING: ("flip", "variant"),
    AlertKind.AUGMENTATION_PROBING: ("variant", "flip"),
    AlertKind.TRAINING_SET_TARGETING: ("training",),
    AlertKind.CONFIDENCE_HARVESTING: ("confidence",),
    AlertKind.ANOMALOUS_SESSION: ("flip", "variant", "training", "confidence"),
}
ANOMALY_MIN_QUERIES = 20  # the forest judges behaviour, and a handful of queries shows none
# Told, for every client judged, how its score compares with the threshold: (kind, score / threshold).
RatioObserver = Callable[[AlertKind, float], None]
ANOMALY_TRIAGE = (
    "The client's traffic is unlike any baseline client's in the combination of features listed; no single "
    "rule fired. Read the top reasons, then the client's sessions and evidence events."
)


def _excess(score: float, threshold: float) -> float:
    """How far above its threshold a score is, comparable across rules."""
    return score / threshold if threshold > 0 else score


@dataclass(frozen=True)
class AllowEntry:
    """An operator's decision that a client (for every kind, or one kind) is benign, and why."""

    client_id: str
    reason: str
    kind: AlertKind | None = None

    def covers(self, client_id: str, kind: AlertKind) -> bool:
        """True when this entry silences `kind` detections for `client_id`."""
        return client_id == self.client_id and (self.kind is None or self.kind is kind)


class Detector:
    """Applies the rules and the anomaly model to clients; see the module docstring."""

    def __init__(
        self, rules: list[Rule], model: ScoringModel | None = None, allowlist: Iterable[AllowEntry] = ()
    ) -> None:
        self.rules = rules
        self.model = model
        self.allowlist = list(allowlist)

    def threshold(self, rule: Rule) -> float:
        """The rule's threshold: calibrated on the baseline when a model is loaded, never below its floor."""
        calibrated = self.model.rule_thresholds.get(rule.id, 0.0) if self.model else 0.0
        return max(rule.floor, calibrated)

    def allowed(self, client_id: str, kind: AlertKind) -> bool:
        """True when an allow-list entry silences `kind` for `client_id`."""
        return any(entry.covers(client_id, kind) for entry in self.allowlist)

    def evaluate(
        self,
        key: ClientKey,
        client: ClientFeatures,
        values: dict[str, float] | None = None,
        *,
        observe: RatioObserver | None = None,
    ) -> list[Detection]:
        """The rule detections for one client now, one per alert kind (the rule furthest above its threshold
        speaks for the kind); empty when nothing crosses a threshold. `values` is the client's snapshot,
        taken here unless the caller already has it. `observe`, if given, is told each kind's highest
        score/threshold ratio (0 when no rule of the kind applies), allow-listed or not."""
        values = values if values is not None else client.snapshot()
        detections: dict[AlertKind, Detection] = {}
        ratios: dict[AlertKind, float] = {}
        for rule in self.rules:
            score = values.get(rule.score, 0.0)
            threshold = self.threshold(rule)
            applies = rule.applies(values)
            if observe is not None:
                ratio = _excess(score, threshold) if applies else 0.0
                ratios[rule.kind] = max(ratios.get(rule.kind, 0.0), ratio)
            if score < threshold or not applies or self.allowed(key[1], rule.kind):
                continue
            current = detections.get(rule.kind)
            if current is not None and _excess(current.score, current.threshold) >= _excess(score, threshold):
                continue
            detections[rule.kind] = self._detection(
                key,
                client,
                rule.kind,
                rule.severity,
                rule.id,
                score,
                threshold,
                self._reasons(values, rule.explain),
                rule.triage,
                rule.atlas,
            )
        if observe is not None:
            for kind, ratio in ratios.items():
                observe(kind, ratio)
        return list(detections.values())

    def evaluate_anomalies(
        self, clients: dict[ClientKey, ClientFeatures], *, observe: RatioObserver | None = None
    ) -> list[Detection]:
        """Anomalous-session detections for `clients`, scored in one micro-batch (`observe` as in
        `evaluate`, for each client scored)."""
        model = self.model
        if model is None or model.forest is None:
            return []
        eligible = [(key, client) for key, client in clients.items() if client.queries >= ANOMALY_MIN_QUERIES]
        if not eligible:
            return []
        snapshots = [client.snapshot() for _, client in eligible]
        detections = []
        for (key, client), values, score in zip(
            eligible, snapshots, model.anomaly_scores(snapshots), strict=True
        ):
            if observe is not None:
                observe(AlertKind.ANOMALOUS_SESSION, _excess(float(score), model.forest_threshold))
            if score < model.forest_threshold or self.allowed(key[1], AlertKind.ANOMALOUS_SESSION):
                continue
            unusual = sorted(values, key=lambda name: -(model.percentile(name, values[name]) or 0.0))[:5]
            detections.append(
                self._detection(
                    key,
                    client,
                    AlertKind.ANOMALOUS_SESSION,
                    Severity.MEDIUM,
                    "MIA-ANOMALY",
                    float(score),
                    model.forest_threshold,
                    self._reasons(values, unusual),
                    ANOMALY_TRIAGE,
                    ATLAS_EXFILTRATION_VIA_INFERENCE_API,
                )
            )
        return detections

    def _reasons(self, values: dict[str, float], features: Iterable[str]) -> list[Reason]:
        model = self.model
        return [
            Reason(
                name,
                round(values.get(name, 0.0), 6),
                model.percentile(name, values.get(name, 0.0)) if model else None,
            )
            for name in features
        ]

    @staticmethod
    def _detection(
        key: ClientKey,
        client: ClientFeatures,
        kind: AlertKind,
        severity: Severity,
        rule_id: str,
        score: float,
        threshold: float,
        reasons: list[Reason],
        triage: str,
        atlas: str,
    ) -> Detection:
        return Detection(
            model=key[0],
            client_ids=(key[1],),
            kind=kind,
            severity=severity,
            rule_id=rule_id,
            score=float(score),
            threshold=float(threshold),
            reasons=reasons,
            evidence=client.evidence_for(EVIDENCE_KINDS[kind]),
            first_seen=client.first_seen,
            last_seen=client.last_seen,
            queries=client.queries,
            atlas_technique=atlas,
            triage=triage,
        )
