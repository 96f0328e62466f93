"""Alerts: what detection hands over (a `Detection` per firing, and how two firings of one alert combine),
the one shape of an alert (`Alert`: stored, notified, listed and exported alike), its explanation
(`Reason`, with its one written form), and the operators' silences.

A detection names its alert by `dedup_key` (model, clients, kind; or model, group, kind for a detection of a
group of clients): while an alert with that key is open, further detections update it instead of raising
another one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_serializer, model_validator

from detector.domain.exposure import Exposure
from detector.domain.times import rfc3339
from detector.text import shorten, visible

# Event ids kept as evidence per alert: enough for a responder to pull the queries, bounded per row.
MAX_EVIDENCE = 20
# Longest dedup key stored verbatim; longer ones (large coordinated groups) are shortened to a digest.
MAX_DEDUP_KEY_LENGTH = 1024
# How a dedup key names a group of clients (`Detection.group`) instead of its client list.
GROUP_PREFIX = "group:"

DEFAULT_ATLAS_TECHNIQUE = "AML.T0024"  # MITRE ATLAS: Exfiltration via ML Inference API
# The reasons a detection on a known client gives for departing from its own baseline profile begin so
# (`detector.scoring.profiles`).
OWN_BASELINE_PREFIX = "own_baseline."


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

    def reaches(self, minimum: Severity) -> bool:
        """True when this severity is `minimum` or above."""
        return self.rank >= minimum.rank


_SEVERITY_ORDER = tuple(Severity)


class AlertStatus(StrEnum):
    """An alert is open until resolved; a detection after that opens a new alert."""

    OPEN = "open"
    RESOLVED = "resolved"


# The input contract's limit on client ids, model names and event ids (`detector.schemas`): a name that has
# to be cut to this never came from a valid record.
NAME_CHARS = 256


def display_name(name: str) -> str:
    """A client id, model name, event id or feature name as people are shown it: on one line with every
    control and format character shown as an escape (`detector.text.visible`), at most `NAME_CHARS`
    characters. Such names come from the prediction API's callers; an ordinary one is returned as it is."""
    return shorten(visible(name), NAME_CHARS)


class Reason(BaseModel):
    """One line of an alert's explanation: a feature's value and where it falls in the baseline (0-100)."""

    model_config = ConfigDict(frozen=True)
    feature: str
    value: float
    baseline_percentile: float | None = None

    @model_validator(mode="after")
    def _storable(self) -> Reason:
        # Alerts are stored and exported as JSON, which has no NaN or infinity.
        if not math.isfinite(self.value):
            raise ValueError(f"reason {self.feature!r}: value must be finite, got {self.value}")
        percentile = self.baseline_percentile
        if percentile is not None and not 0.0 <= percentile <= 100.0:
            raise ValueError(f"reason {self.feature!r}: baseline percentile {percentile} is not in [0, 100]")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def text(self) -> str:
        """The reason as every output writes it: `distinct_training_hits = 57 (p99.9 of baseline)`, the
        feature as `display_name` shows it; everything else is letters, digits, spaces and `=().+-`."""
        return self.describe(display_name)

    def describe(self, name: Callable[[str], str]) -> str:
        """`text` with the feature shown by `name` (a sink's own escaping, say)."""
        text = f"{name(self.feature)} = {self.value:.4g}"
        if self.baseline_percentile is not None:
            text += f" (p{self.baseline_percentile:.4g} of baseline)"
        return text


@dataclass
class Detection:
    """One firing of a rule or model on one client, or on a group of clients for coordination.

    `detected_at` is the event time of the query the verdict was taken on and `detected_after_queries` the
    client's (or the group's) queries by then: when in the stream the behaviour became visible, whatever the
    speed it was consumed at. A detection that did not fire (`fired` False) is a verdict still within the
    hold band below its threshold (`HOLD_RATIO`): it keeps an open alert of its key alive and opens none.

    A detection of a `group` (a coordinated campaign's pool) names its alert by the group, not by the
    clients: the detections of one group while its alert is open are one incident, whichever clients each
    names (a campaign's later keys, or the share another replica held), and the alert names them all.

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
    detected_at: float
    detected_after_queries: int
    atlas_technique: str = DEFAULT_ATLAS_TECHNIQUE
    triage: str = ""
    fired: bool = True
    # True when a client known from the baseline departs from its own profile there (the reasons say where):
    # an allow-list entry no longer covers it.
    departed: bool = False
    # The `last_seen` of the earliest detection combined into this one (NaN: its own): where the incident it
    # stands for began, to tell whether it continues an alert that went before it.
    began_at: float = math.nan
    # The group of clients the detection is of ("" for a client, or clients named by their list).
    group: str = ""
    # What the client (a group: its clients together) was given by the model by `last_seen`; None: not
    # accounted.
    exposure: Exposure | None = None

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
        if math.isnan(self.began_at):
            self.began_at = self.last_seen

    @property
    def client_id(self) -> str:
        """The primary client: the first of the sorted `client_ids`."""
        return self.client_ids[0]

    @property
    def dedup_key(self) -> str:
        """`model|client,ids|kind` (`model|group:GROUP|kind` for a group), the same for every detection
        of one alert.

        Beyond `MAX_DEDUP_KEY_LENGTH` characters the client list is replaced by its SHA-256 digest.
        """
        if self.group:
            return f"{self.model}|{GROUP_PREFIX}{self.group}|{self.kind}"
        clients = ",".join(self.client_ids)
        key = f"{self.model}|{clients}|{self.kind}"
        if len(key) <= MAX_DEDUP_KEY_LENGTH:
            return key
        digest = hashlib.sha256(clients.encode()).hexdigest()
        return f"{self.model}|sha256:{digest}|{self.kind}"

    def combined(self, other: Detection) -> Detection:
        """This detection and `other`, of the same alert, as one.

        The clients of both (the same but for a group's); the peak score, the higher severity, the widest
        time span and the most queries; the explanation (rule, threshold, reasons, technique, triage note)
        of the newer detection, the one with the later `last_seen` (`other` on a tie); the evidence of both,
        newest kept; the detection time of the earlier one that fired (of the earlier one when neither
        did), fired when either did; departed when either did, the older one's departure reasons kept when
        the newer has none. The queries of a group's detections naming disjoint clients (a campaign's waves,
        or shares of replicas) add up. The exposure: of the newer detection (the older one's when the newer
        has none) when both name the same clients; else none when either has none; the sum for disjoint
        clients; that of the detection whose clients include the other's; the larger of each count when
        they only overlap (a lower bound: what each client was given is not kept).
        Raises `ValueError` when the dedup keys differ.
        """
        if other.dedup_key != self.dedup_key:
            raise ValueError(f"cannot combine {self.dedup_key!r} with {other.dedup_key!r}")
        older, newer = (other, self) if other.last_seen < self.last_seen else (self, other)
        first = min((self, other), key=lambda detection: (not detection.fired, detection.detected_at))
        reasons = list(newer.reasons)
        if older.departed and not newer.departed:
            reasons += [reason for reason in older.reasons if reason.feature.startswith(OWN_BASELINE_PREFIX)]
        disjoint = not set(self.client_ids) & set(other.client_ids)
        return Detection(
            model=self.model,
            client_ids=(*self.client_ids, *other.client_ids),
            kind=self.kind,
            severity=max(self.severity, other.severity, key=lambda severity: severity.rank),
            rule_id=newer.rule_id,
            score=max(self.score, other.score),
            threshold=newer.threshold,
            reasons=reasons,
            evidence=[*older.evidence, *newer.evidence],
            first_seen=min(self.first_seen, other.first_seen),
            last_seen=newer.last_seen,
            queries=self.queries + other.queries if disjoint else max(self.queries, other.queries),
            detected_at=first.detected_at,
            detected_after_queries=first.detected_after_queries,
            atlas_technique=newer.atlas_technique,
            triage=newer.triage,
            fired=self.fired or other.fired,
            departed=self.departed or other.departed,
            began_at=min(self.began_at, other.began_at),
            group=self.group,
            exposure=self._combined_exposure(other, newer, older),
        )

    def _combined_exposure(self, other: Detection, newer: Detection, older: Detection) -> Exposure | None:
        """The exposure of this detection and `other` as one (see `combined`)."""
        mine, theirs = set(self.client_ids), set(other.client_ids)
        if mine == theirs:
            return newer.exposure if newer.exposure is not None else older.exposure
        if self.exposure is None or other.exposure is None:
            return None  # a part of the group not accounted: a blank, not an understatement
        if not mine & theirs:
            return self.exposure + other.exposure
        if mine > theirs:
            return self.exposure
        if theirs > mine:
            return other.exposure
        return self.exposure.at_least(other.exposure)

    def continues(self, last_seen: float, quiet_seconds: float) -> bool:
        """True when this detection belongs to the incident whose latest query was at `last_seen` (event
        time): it (its earliest detection, `began_at`) came no more than `quiet_seconds` after it. Otherwise
        that incident went quiet in between and was over before this one."""
        return self.began_at - last_seen <= quiet_seconds


def add_to_incidents(incidents: list[Detection], detection: Detection, quiet_seconds: float) -> None:
    """Add `detection` to the incidents of its key (detections combined, oldest first), taken in order.

    It is combined into the latest incident when it continues it (`Detection.continues`), else starts a new
    one if it fired. A detection that only holds starts one only when there is none yet: it may continue an
    alert opened before these detections; after a quiet gap it can continue nothing.
    """
    if incidents and detection.continues(incidents[-1].last_seen, quiet_seconds):
        incidents[-1] = incidents[-1].combined(detection)
    elif detection.fired or not incidents:
        incidents.append(detection)


def _newest_distinct(event_ids: list[str]) -> list[str]:
    # An id seen twice counts at its latest position.
    latest_first = list(dict.fromkeys(reversed(event_ids)))
    return latest_first[:MAX_EVIDENCE][::-1]


class Alert(BaseModel):
    """An alert: the detections of one (model, client(s), kind) while it is open, combined. The one shape
    of an alert: as stored, as every notification carries it, as listed and exported.

    `first_seen` and `last_seen` are event time; `raised_at`, `updated_at`, `resolved_at` and
    `acknowledged_at` wall time. Every time is an aware UTC datetime.
    """

    model_config = ConfigDict(frozen=True)
    id: int
    dedup_key: str
    model: str
    client_ids: list[str] = Field(min_length=1)
    kind: AlertKind
    severity: Severity
    status: AlertStatus
    rule_id: str
    score: float
    threshold: float
    reasons: list[Reason]
    evidence: list[str] = Field(description="event ids of the newest queries behind the alert")
    atlas_technique: str
    triage: str = ""
    first_seen: datetime = Field(description="event time of the first query of the behaviour")
    last_seen: datetime = Field(description="event time of the latest query of the behaviour")
    raised_at: datetime
    updated_at: datetime
    resolved_at: datetime | None = None
    acknowledged_at: datetime | None = None
    queries: int = Field(ge=0)
    detected_at: datetime = Field(
        description="event time of the query on which the alert's rule first crossed its threshold"
    )
    detected_after_queries: int = Field(ge=0, description="the client's queries up to `detected_at`")
    updates: int = Field(default=0, ge=0, description="how many times new evidence changed the alert")
    exposure: Exposure | None = Field(
        default=None,
        description="what the client (a coordinated group: its clients together, each as of its latest "
        "query pooled) had been given by the model by `last_seen`; null for alerts raised before exposure "
        "was accounted",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def client_id(self) -> str:
        """The primary client (the first of the sorted ids)."""
        return self.client_ids[0]

    @field_serializer(
        "first_seen", "last_seen", "detected_at", "raised_at", "updated_at", "resolved_at", "acknowledged_at"
    )
    def _rfc3339(self, moment: datetime | None) -> str | None:
        # Every time the detector writes for people and receivers has one form: RFC 3339, UTC, `Z`.
        return rfc3339(moment.timestamp()) if moment is not None else None

    @property
    def top_reason(self) -> str:
        """The first line of the explanation (`Reason.text`), or "" when there is none."""
        return self.reasons[0].text if self.reasons else ""

    @property
    def group(self) -> str:
        """The group of clients a coordinated alert is of, as its dedup key names it; "" for an alert named
        by its client list."""
        subject = self.dedup_key[len(self.model) + 1 : -(len(self.kind) + 1)]
        grouped = subject.startswith(GROUP_PREFIX) and "," not in subject
        if self.kind is AlertKind.COORDINATED_CLIENTS and grouped:
            return subject[len(GROUP_PREFIX) :]
        return ""

    def as_detection(self) -> Detection:
        """The alert as the one detection that all its detections combine into."""
        return Detection(
            model=self.model,
            client_ids=tuple(self.client_ids),
            kind=self.kind,
            severity=self.severity,
            rule_id=self.rule_id,
            score=self.score,
            threshold=self.threshold,
            reasons=list(self.reasons),
            evidence=list(self.evidence),
            first_seen=self.first_seen.timestamp(),
            last_seen=self.last_seen.timestamp(),
            queries=self.queries,
            detected_at=self.detected_at.timestamp(),
            detected_after_queries=self.detected_after_queries,
            atlas_technique=self.atlas_technique,
            triage=self.triage,
            group=self.group,
            exposure=self.exposure,
        )

    @classmethod
    def notice(
        cls,
        *,
        dedup_key: str,
        model: str,
        client_id: str,
        kind: AlertKind,
        severity: Severity,
        rule_id: str,
        reason: Reason,
        triage: str,
        seen_at: datetime,
        raised_at: datetime,
        queries: int = 0,
        resolved_at: datetime | None = None,
    ) -> Alert:
        """An alert that reports no attack but something about the detector itself (a test notification, a
        missed canary), for a notification to carry: never stored (id 0), of one client, explained by one
        `reason`, scoring 0 against a threshold of 1, with no evidence; first and last seen and detected at
        `seen_at` (event time), raised at `raised_at` (wall time). Open and updated at `raised_at`, or, given
        `resolved_at` (a canary passing after a miss), resolved and updated then."""
        return cls(
            id=0,
            dedup_key=dedup_key,
            model=model,
            client_ids=[client_id],
            kind=kind,
            severity=severity,
            status=AlertStatus.OPEN if resolved_at is None else AlertStatus.RESOLVED,
            rule_id=rule_id,
            score=0.0,
            threshold=1.0,
            reasons=[reason],
            evidence=[],
            atlas_technique=DEFAULT_ATLAS_TECHNIQUE,
            triage=triage,
            first_seen=seen_at,
            last_seen=seen_at,
            raised_at=raised_at,
            updated_at=resolved_at or raised_at,
            resolved_at=resolved_at,
            queries=queries,
            detected_at=seen_at,
            detected_after_queries=0,
        )


@dataclass(frozen=True)
class NotificationState:
    """What was last notified about an alert: when (wall time) and at which severity; None if never."""

    notified_at: datetime | None = None
    notified_severity: Severity | None = None


@dataclass(frozen=True)
class TrackedAlert:
    """An open alert with what was last notified about it: what the alert lifecycle decides on."""

    alert: Alert
    notified: NotificationState = field(default_factory=NotificationState)


@dataclass(frozen=True)
class AllowEntry:
    """An operator's decision that a client (for every kind, or one kind) is benign, and why."""

    client_id: str
    reason: str
    kind: AlertKind | None = None

    def covers(self, client_id: str, kind: AlertKind) -> bool:
        """True when this entry silences `kind` detections for `client_id`."""
        return client_id == self.client_id and (self.kind is None or self.kind is kind)


@dataclass(frozen=True)
class AllowList:
    """The operators' allow-list: clients judged benign, for every kind of alert or for one.

    An entry names a client, not whatever its key may do: a detection on a known client that departs from
    its own baseline profile (`Detection.departed`, a compromised key at work) is not excused. A client with
    no profile (new since the baseline, or no model loaded) is excused by its entry alone.
    """

    entries: tuple[AllowEntry, ...] = ()

    def covers(self, client_id: str, kind: AlertKind) -> bool:
        """True when an entry silences `kind` for `client_id`."""
        return any(entry.covers(client_id, kind) for entry in self.entries)

    def excuses(self, detection: Detection) -> bool:
        """True when an entry covers every client of `detection` for its kind and none departed from its
        own profile (see the class)."""
        return not detection.departed and all(
            self.covers(client_id, detection.kind) for client_id in detection.client_ids
        )

    @property
    def clients(self) -> frozenset[str]:
        """The clients with an entry (for any kind)."""
        return frozenset(entry.client_id for entry in self.entries)


@dataclass(frozen=True)
class Silence:
    """An operator's silence: each field that is set must match the alert; it ends at `expires_at`."""

    id: int
    client_id: str | None
    model: str | None
    kind: str | None
    rule_id: str | None
    reason: str
    created_by: str
    created_at: datetime
    expires_at: datetime

    def matches(self, alert: Alert) -> bool:
        """True when every criterion set matches `alert` (a client matches any of a group's clients)."""
        return (
            (self.client_id is None or self.client_id in alert.client_ids)
            and (self.model is None or self.model == alert.model)
            and (self.kind is None or self.kind == alert.kind.value)
            and (self.rule_id is None or self.rule_id == alert.rule_id)
        )

    def describe(self) -> str:
        """The criteria as `client=a rule=MIA-003`."""
        criteria = {"client": self.client_id, "model": self.model, "kind": self.kind, "rule": self.rule_id}
        return " ".join(f"{name}={value}" for name, value in criteria.items() if value is not None)
