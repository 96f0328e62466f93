"""Opened alerts in the log: the terminal's and the log shipper's view of what the detector found."""

from __future__ import annotations

import logging

from detector.alerts.lifecycle import AlertChange
from detector.domain import Detection, rfc3339
from detector.text import visible

alert_log = logging.getLogger("detector.alerts")


class AlertLog:
    """Logs every alert opened (the pipeline's `AlertListener`): one record per alert, WARNING, on the
    logger `detector.alerts`, one line in either log format: who, what, how sure, and the top reasons, with
    names shown as `visible` shows them.

    The record's fields hold the facts exactly, for JSON logs: `alert_id`, `kind`, `severity`, `model`,
    `client_ids`, `rule_id`, `score`, `threshold`, `queries`, `detected_after_queries`, `top_reason`, and the
    event times (RFC 3339) `first_seen` and `detected_at` (of the query on which the rule crossed).
    """

    def opened(self, alerts: list[tuple[AlertChange, Detection]]) -> None:
        """Log the alerts just opened, each with the detection that opened it."""
        for change, detection in alerts:
            reasons = [reason.describe(visible) for reason in detection.reasons[:3]]
            alert_log.warning(
                "ALERT %-8s %-22s client=%s model=%s score=%.4g (threshold %.4g) %s",
                detection.severity.value,
                detection.kind.value,
                visible(",".join(detection.client_ids)),
                visible(detection.model),
                detection.score,
                detection.threshold,
                ", ".join(reasons),
                extra={
                    "alert_id": change.alert.id,
                    "kind": detection.kind.value,
                    "severity": detection.severity.value,
                    "model": detection.model,
                    "client_ids": list(detection.client_ids),
                    "rule_id": detection.rule_id,
                    "score": detection.score,
                    "threshold": detection.threshold,
                    "queries": detection.queries,
                    "detected_after_queries": change.alert.detected_after_queries,
                    "top_reason": reasons[0] if reasons else None,
                    "first_seen": rfc3339(detection.first_seen),
                    "detected_at": rfc3339(change.alert.detected_at.timestamp()),
                },
            )
