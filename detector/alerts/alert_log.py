"""Opened and escalated alerts in the log: the terminal's and the log shipper's view of what the detector
found."""

from __future__ import annotations

import logging

from detector.alerts.lifecycle import AlertChange, NotificationPolicy
from detector.domain import Detection, Severity, rfc3339
from detector.text import visible

alert_log = logging.getLogger("detector.alerts")


class AlertLog:
    """Logs every alert opened or escalated (the pipeline's `AlertListener`): one record per alert on the
    logger `detector.alerts`, one line in either log format: who, what, how sure, and the top reasons, with
    names shown as `visible` shows them. An alert is logged as `ALERT` at WARNING when `policy` pages it, as
    `CANARY` at INFO when it is a detection canary's (`NotificationPolicy.is_canary`: no incident), or else
    as `EXPOSURE` at INFO (its severity is below the policy's minimum: it is recorded, not delivered); an
    escalation is logged again, with the severity it rose from.

    The record's fields hold the facts exactly, for JSON logs: `alert_id`, `kind`, `severity`, `model`,
    `client_ids`, `rule_id`, `score`, `threshold`, `queries`, `detected_after_queries`, `top_reason`,
    `escalated_from` (or null), and the event times (RFC 3339) `first_seen` and `detected_at` (of the query
    on which the rule crossed).
    """

    def __init__(self, policy: NotificationPolicy) -> None:
        self.policy = policy

    def opened(self, alerts: list[tuple[AlertChange, Detection]]) -> None:
        """Log the alerts just opened, each with the detection that opened it."""
        for change, detection in alerts:
            self._log(change, detection, None)

    def escalated(self, alerts: list[tuple[AlertChange, Detection]]) -> None:
        """Log the open alerts whose severity just rose, each with the detection that raised it."""
        for change, detection in alerts:
            self._log(change, detection, change.severity_before)

    def _log(self, change: AlertChange, detection: Detection, escalated_from: Severity | None) -> None:
        alert = change.alert
        reasons = [reason.describe(visible) for reason in detection.reasons[:3]]
        canary = self.policy.is_canary(alert)
        paged = self.policy.pages(alert)
        rose = f" (escalated from {escalated_from.value})" if escalated_from is not None else ""
        alert_log.log(
            logging.WARNING if paged else logging.INFO,
            "%s %-8s %-22s client=%s model=%s score=%.4g (threshold %.4g) %s%s",
            "CANARY" if canary else "ALERT" if paged else "EXPOSURE",
            alert.severity.value,
            detection.kind.value,
            visible(",".join(detection.client_ids)),
            visible(detection.model),
            detection.score,
            detection.threshold,
            ", ".join(reasons),
            rose,
            extra={
                "alert_id": alert.id,
                "kind": detection.kind.value,
                "severity": alert.severity.value,
                "model": detection.model,
                "client_ids": list(detection.client_ids),
                "rule_id": detection.rule_id,
                "score": detection.score,
                "threshold": detection.threshold,
                "queries": detection.queries,
                "detected_after_queries": alert.detected_after_queries,
                "top_reason": reasons[0] if reasons else None,
                "escalated_from": escalated_from.value if escalated_from is not None else None,
                "exposure": alert.exposure.model_dump() if alert.exposure is not None else None,
                "first_seen": rfc3339(detection.first_seen),
                "detected_at": rfc3339(alert.detected_at.timestamp()),
            },
        )
