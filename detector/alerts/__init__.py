"""Alerts: what detection reports, de-duplicated into one open alert per model, client(s) and kind."""

from detector.alerts.model import (
    DEFAULT_ATLAS_TECHNIQUE,
    MAX_DEDUP_KEY_LENGTH,
    MAX_EVIDENCE,
    AlertKind,
    AlertStatus,
    Detection,
    Reason,
    Severity,
)

__all__ = [
    "DEFAULT_ATLAS_TECHNIQUE",
    "MAX_DEDUP_KEY_LENGTH",
    "MAX_EVIDENCE",
    "AlertKind",
    "AlertStatus",
    "Detection",
    "Reason",
    "Severity",
]
