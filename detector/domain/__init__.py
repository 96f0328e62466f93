"""The detector's value types, shared by every package: what flows between the steps (raw records and
dead letters, queries, sessions, detections and alerts, notifications). They import nothing of the detector
but `detector.text`, so no package imports another one for a type."""

from detector.domain.alerts import (
    DEFAULT_ATLAS_TECHNIQUE,
    MAX_DEDUP_KEY_LENGTH,
    MAX_EVIDENCE,
    NAME_CHARS,
    OWN_BASELINE_PREFIX,
    Alert,
    AlertKind,
    AlertStatus,
    AllowEntry,
    AllowList,
    Detection,
    NotificationState,
    Reason,
    Severity,
    Silence,
    TrackedAlert,
    add_to_incidents,
    display_name,
)
from detector.domain.canary import CANARY_MODEL, Canary, CanaryClients
from detector.domain.errors import Backpressure
from detector.domain.exposure import Exposure
from detector.domain.notifications import (
    MAX_SUMMARY_CHARS,
    PRODUCT,
    Notification,
    NotificationEvent,
    dashboard_link,
)
from detector.domain.queries import Query, Requested
from detector.domain.records import DeadLetter, DeadLetterReason, InvalidRecord, Origin, RawRecord
from detector.domain.risk import (
    Coarsening,
    RiskAction,
    RiskDecision,
    RiskParameters,
    in_force,
    risk_document,
)
from detector.domain.sessions import SessionKey, SessionState, SessionStatus
from detector.domain.times import rfc3339, utc
from detector.domain.verdicts import HOLD_RATIO, Verdict, Verdicts

__all__ = [
    "CANARY_MODEL",
    "DEFAULT_ATLAS_TECHNIQUE",
    "HOLD_RATIO",
    "MAX_DEDUP_KEY_LENGTH",
    "MAX_EVIDENCE",
    "MAX_SUMMARY_CHARS",
    "NAME_CHARS",
    "OWN_BASELINE_PREFIX",
    "PRODUCT",
    "Alert",
    "AlertKind",
    "AlertStatus",
    "AllowEntry",
    "AllowList",
    "Backpressure",
    "Canary",
    "CanaryClients",
    "Coarsening",
    "DeadLetter",
    "DeadLetterReason",
    "Detection",
    "Exposure",
    "InvalidRecord",
    "Notification",
    "NotificationEvent",
    "NotificationState",
    "Origin",
    "Query",
    "RawRecord",
    "Reason",
    "Requested",
    "RiskAction",
    "RiskDecision",
    "RiskParameters",
    "SessionKey",
    "SessionState",
    "SessionStatus",
    "Severity",
    "Silence",
    "TrackedAlert",
    "Verdict",
    "Verdicts",
    "add_to_incidents",
    "dashboard_link",
    "display_name",
    "in_force",
    "rfc3339",
    "risk_document",
    "utc",
]
