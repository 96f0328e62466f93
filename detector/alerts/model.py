"""What detection hands over to alerting: a `Detection` per firing, and how two firings of one alert combine.

A detection names its alert by `dedup_key` (model, clients, kind): while an alert with that key is open,
further detections update it instead of raising another one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import StrEnum

# Event ids kept as evidence per alert: enough for a responder to pull the queries, bounded per row.
MAX_EVIDENCE = 20
# Longest dedup key stored verbatim; longer ones (large coordinated groups) are shortened to a digest.
MAX_DEDUP_KEY_LENGTH = 1024

DEFAULT_ATLAS_TECHNIQUE = "AML.T0024"  # MITRE ATLAS: Exfiltration via ML Inference API


class AlertKind(StrEnum):
    """The attack pattern an alert reports."""

    CONFIDENCE_HARVESTING = "confidence_harvesting"
    AUGMENTATION_PROBING = "augmentation_probing"
    BOUNDARY_PROBING = "boundary_probing"
    TRAINING_SET_TARGETING = "training_set_targeting"
    COORDINATED_CLIENTS = "coordinated_clients"
    ANOMALOUS_SESSION = "anomalous_session"


class Severity(StrEnum):
    """How urgently a responder should look; `rank` orders them (low < medium < high < critical)."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for low up to 3 for critical."""
        return _SEVERITY_ORDER.index(self)


_SEVERITY_ORDER = tuple(Severity)


class AlertStatus(StrEnum):
    """An alert is open until resolved; a detection after that opens a new alert."""

    OPEN = "open"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Reason:
    """One line of an alert's explanation: a feature's value and where it falls in the baseline (0-100)."""

    feature: str
    value: float
    baseline_percentile: float | None = None

    def __post_init__(self) -> None:
        # Alerts are stored and exported as JSON, which has no NaN or infinity.
        if not math.isfinite(self.value):
            raise ValueError(f"reason {self.feature!r}: value must be finite, got {self.value}")
        percentile = self.baseline_percentile
        if percentile is not None and not 0.0 <= percentile <= 100.0:
            raise ValueError(f"reason {self.feature!r}: baseline percentile {percentile} is not in [0, 100]")


@dataclass
class Detection:
    """One firing of a rule or model on one client, or on a group of clients for coordination.

    On construction `client_ids` is sorted and de-duplicated (the first is the primary `client_id`) and
    `evidence` (event ids, oldest first) is cut to its newest `MAX_EVIDENCE` distinct ids. Raises
    `ValueError` on no client, a non-finite score or threshold, `first_seen` after `last_seen` (event time,
    epoch seconds) or negative `queries`.
    """

    model: str
    client_ids: tuple[str, ...]
    kind: AlertKind
    severity: Severity
    rule_id: str
    score: float
    threshold: float
    reasons: list[Reason]
    evidence: list[str]
    first_seen: float
    last_seen: float
    queries: int
    atlas_technique: str = DEFAULT_ATLAS_TECHNIQUE
    triage: str = ""

    def __post_init__(self) -> None:
        self.client_ids = tuple(sorted(set(self.client_ids)))
        if not self.client_ids:
            raise ValueError("a detection needs at least one client id")
        if not (math.isfinite(self.score) and math.isfinite(self.threshold)):
            raise ValueError(f"score {self.score} and threshold {self.threshold} must be finite")
        if self.first_seen > self.last_seen:
            raise ValueError(f"first_seen {self.first_seen} is after last_seen {self.last_seen}")
        if self.queries < 0:
            raise ValueError(f"queries must not be negative, got {self.queries}")
        self.evidence = _newest_distinct(self.evidence)

    @property
    def client_id(self) -> str:
        """The primary client: the first of the sorted `client_ids`."""
        return self.client_ids[0]

    @property
    def dedup_key(self) -> str:
        """`model|client,ids|kind`, the same for every detection of one alert.

        Beyond `MAX_DEDUP_KEY_LENGTH` characters the client list is replaced by its SHA-256 digest.
        """
        clients = ",".join(self.client_ids)
        key = f"{self.model}|{clients}|{self.kind}"
        if len(key) <= MAX_DEDUP_KEY_LENGTH:
            return key
        digest = hashlib.sha256(clients.encode()).hexdigest()
        return f"{self.model}|sha256:{digest}|{self.kind}"

    def combined(self, other: Detection) -> Detection:
        """This detection and `other`, of the same alert, as one.

        The peak score, the higher severity, the widest time span and the most queries; the explanation
        (rule, threshold, reasons, technique, triage note) of the newer detection, the one with the later
        `last_seen` (`other` on a tie); the evidence of both, newest kept. Raises `ValueError` when the
        dedup keys differ.
        """
        if other.dedup_key != self.dedup_key:
            raise ValueError(f"cannot combine {self.dedup_key!r} with {other.dedup_key!r}")
        older, newer = (other, self) if other.last_seen < self.last_seen else (self, other)
        return Detection(
            model=self.model,
            client_ids=self.client_ids,
            kind=self.kind,
            severity=max(self.severity, other.severity, key=lambda severity: severity.rank),
            rule_id=newer.rule_id,
            score=max(self.score, other.score),
            threshold=newer.threshold,
            reasons=list(newer.reasons),
            evidence=[*older.evidence, *newer.evidence],
            first_seen=min(self.first_seen, other.first_seen),
            last_seen=newer.last_seen,
            queries=max(self.queries, other.queries),
            atlas_technique=newer.atlas_technique,
            triage=newer.triage,
        )


def _newest_distinct(event_ids: list[str]) -> list[str]:
    # An id seen twice counts at its latest position.
    latest_first = list(dict.fromkeys(reversed(event_ids)))
    return latest_first[:MAX_EVIDENCE][::-1]
