"""Deciding: the verdicts that fired on a client, turned into detections with their reasons and evidence.

Scoring is separate from deciding: `Scorer` judges each alert kind on a client's snapshot (see
`detector.scoring.scorer`); `Detector` makes a `Detection` of every verdict that fired, explained by the
verdict's contributions and backed by the client's evidence events. Whoever observes the ratios (the
pipeline's metrics) is handed the very verdicts the decision was taken on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from detector.domain import AlertKind, Detection, Verdict
from detector.features.client import ClientFeatures, ClientKey
from detector.scoring.model import ScoringModel
from detector.scoring.rules import Rule
from detector.scoring.scorer import ANOMALY_MIN_QUERIES, Scorer, Snapshot

EVIDENCE_KINDS: dict[AlertKind, tuple[str, ...]] = {
    AlertKind.BOUNDARY_PROBING: ("flip", "variant"),
    AlertKind.AUGMENTATION_PROBING: ("variant", "flip"),
    AlertKind.TRAINING_SET_TARGETING: ("training",),
    AlertKind.CONFIDENCE_HARVESTING: ("confidence",),
    AlertKind.ANOMALOUS_SESSION: ("flip", "variant", "training", "confidence"),
}
# Told the verdicts of every client judged, allow-listed or not (the pipeline's metrics).
RatioObserver = Callable[[Collection[Verdict]], None]


class Detector:
    """Detections from the verdicts of a `Scorer` over `rules` and `model`; see the module docstring."""

    def __init__(self, rules: Sequence[Rule], model: ScoringModel | None = None) -> None:
        self.scorer = Scorer(rules, model)

    @property
    def model(self) -> ScoringModel | None:
        """The scoring model in use, if any."""
        return self.scorer.model

    def evaluate(
        self,
        key: ClientKey,
        client: ClientFeatures,
        values: Snapshot | None = None,
        *,
        observe: RatioObserver | None = None,
    ) -> list[Detection]:
        """The rule detections for one client now, one per alert kind whose verdict fired (`score_rules`);
        empty when none did. `values` is the client's snapshot, taken here unless the caller already has
        it. `observe`, if given, is handed every kind's verdict."""
        values = values if values is not None else client.snapshot()
        verdicts = self.scorer.score_rules(values)
        if observe is not None:
            observe(verdicts.values())
        return [
            self._detection(key, client, values, verdict) for verdict in verdicts.values() if verdict.fired
        ]

    def evaluate_anomalies(
        self, clients: dict[ClientKey, ClientFeatures], *, observe: RatioObserver | None = None
    ) -> list[Detection]:
        """Anomalous-session detections for `clients`, scored in one micro-batch (`score_anomalies`);
        `observe`, if given, is handed the verdict of every client the model judged."""
        if self.scorer.model is None or self.scorer.model.forest is None:
            return []
        # Only clients the forest will judge are snapshotted: a snapshot is most of the cost of judging.
        eligible = [(key, client) for key, client in clients.items() if client.queries >= ANOMALY_MIN_QUERIES]
        if not eligible:
            return []
        snapshots = [client.snapshot() for _, client in eligible]
        judged = [
            (key, client, values, verdict)
            for (key, client), values, verdict in zip(
                eligible, snapshots, self.scorer.score_anomalies(snapshots), strict=True
            )
            if verdict is not None
        ]
        if observe is not None:
            observe([verdict for *_, verdict in judged])
        return [
            self._detection(key, client, values, verdict)
            for key, client, values, verdict in judged
            if verdict.fired
        ]

    def _detection(
        self, key: ClientKey, client: ClientFeatures, values: Snapshot, verdict: Verdict
    ) -> Detection:
        return Detection(
            model=key[0],
            client_ids=(key[1],),
            kind=verdict.kind,
            severity=verdict.severity,
            rule_id=verdict.rule_id,
            score=verdict.score,
            threshold=verdict.threshold,
            reasons=self.scorer.explain(values, verdict),
            evidence=client.evidence_for(EVIDENCE_KINDS[verdict.kind]),
            first_seen=client.first_seen,
            last_seen=client.last_seen,
            queries=client.queries,
            atlas_technique=verdict.atlas,
            triage=verdict.triage,
        )
