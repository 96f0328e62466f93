"""The risk policy: what gateways are told to do with the clients an open alert names (reviewed data in
`risk_policy.toml`), and keeping the stored decisions in step with the alerts, audited.

Every change of an open alert (opened, updated, escalated) decides again for each of its clients; an alert
that resolves withdraws its decisions. A decision whose action and parameters stay the same keeps the time
it was first taken and only has its expiry moved on (not audited); every other change is audited with who
made it (`policy`, or the operator) and why.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from detector.domain import (
    Alert,
    AlertKind,
    AlertStatus,
    RiskAction,
    RiskDecision,
    RiskParameters,
    Severity,
)
from detector.text import shorten

POLICY_ACTOR = "policy"
_POLICY_FILE = "risk_policy.toml"


class RiskRecords(Protocol):
    """What the policy needs of storage, within one transaction (`detector.storage.risk.RiskRepository`)."""

    def of_alerts(self, alert_ids: Iterable[int]) -> list[RiskDecision]: ...

    def put(self, decision: RiskDecision) -> None: ...

    def remove(self, decisions: Iterable[RiskDecision]) -> None: ...

    def audit(self, change: str, decision: RiskDecision, at: datetime, actor: str, reason: str) -> None: ...


@dataclass(frozen=True)
class PolicyEntry:
    """One line of the policy: from `min_severity` up, alerts of `kind` get `action` with `parameters` for
    `ttl` after their latest change (None: until they resolve)."""

    kind: AlertKind
    min_severity: Severity
    action: RiskAction
    parameters: RiskParameters
    ttl: timedelta | None


class RiskPolicy:
    """The decisions for the clients of an alert (`decide`), and storing them as alerts change (`apply`)."""

    def __init__(self, entries: Sequence[PolicyEntry]) -> None:
        self.entries = sorted(entries, key=lambda entry: (entry.kind, entry.min_severity.rank))

    @classmethod
    def load(cls, path: Path | None = None) -> RiskPolicy:
        """The policy in `path`, or the packaged `risk_policy.toml`; raises `ValueError` when it cannot be
        read, saying which entry is malformed (an unknown kind, severity or action, parameters the action
        does not take), or which kind and severity appear twice."""
        where = str(path) if path else _POLICY_FILE
        try:
            packaged = resources.files("detector.alerts").joinpath(_POLICY_FILE)
            text = path.read_text() if path else packaged.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read {where}: {getattr(error, 'strerror', None) or error}") from None
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{where}: {error}") from None
        entries = [_entry(raw, where, number) for number, raw in enumerate(document.get("policy", []), 1)]
        keys = [(entry.kind, entry.min_severity) for entry in entries]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{where}: a kind and min_severity appear twice")
        return cls(entries)

    def entry_for(self, kind: AlertKind, severity: Severity) -> PolicyEntry | None:
        """The entry applying to an alert of `kind` and `severity`: of its kind, the one with the highest
        `min_severity` that `severity` reaches; None when there is none."""
        applying = [e for e in self.entries if e.kind is kind and severity.reaches(e.min_severity)]
        return applying[-1] if applying else None

    def decide(self, alert: Alert, now: datetime) -> list[RiskDecision]:
        """The decision on each client of open `alert` at `now` (none when no entry applies)."""
        entry = self.entry_for(alert.kind, alert.severity)
        if entry is None:
            return []
        reason = shorten(f"alert {alert.id}: {alert.kind} ({alert.severity}); {alert.top_reason}", 500)
        return [
            RiskDecision(
                model=alert.model,
                client_id=client_id,
                action=entry.action,
                parameters=entry.parameters,
                source="policy",
                alert_id=alert.id,
                actor=POLICY_ACTOR,
                reason=reason,
                decided_at=now,
                expires_at=now + entry.ttl if entry.ttl is not None else None,
            )
            for client_id in alert.client_ids
        ]

    def apply(
        self, records: RiskRecords, changed: Iterable[Alert], resolved: Iterable[Alert], now: datetime
    ) -> None:
        """Store the decisions of the open alerts among `changed`, and withdraw those of `resolved`, each
        change audited (see the module docstring)."""
        for alert in changed:
            if alert.status is not AlertStatus.OPEN:
                continue
            stored = {decision.client_id: decision for decision in records.of_alerts([alert.id])}
            for decision in self.decide(alert, now):
                before = stored.get(decision.client_id)
                if before is not None and _same(before, decision):
                    records.put(decision.model_copy(update={"decided_at": before.decided_at}))
                    continue
                records.put(decision)
                change = "decided" if before is None else "changed"
                records.audit(change, decision, now, POLICY_ACTOR, decision.reason)
        ended = {alert.id for alert in resolved}
        withdrawn = records.of_alerts(ended) if ended else []
        records.remove(withdrawn)
        for decision in withdrawn:
            records.audit("withdrawn", decision, now, POLICY_ACTOR, f"alert {decision.alert_id} resolved")


def _same(before: RiskDecision, after: RiskDecision) -> bool:
    return before.action is after.action and before.parameters == after.parameters


def _entry(raw: Any, where: str, number: int) -> PolicyEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: policy entry {number} is not a table")
    known = {"kind", "min_severity", "action", "ttl_seconds", "coarsening", "decimals", "requests_per_minute"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: policy entry {number} has unknown keys {unknown}")
    try:
        action = RiskAction(raw["action"])
        if action is RiskAction.ALLOW:
            raise ValueError("allow is what no entry means: leave the kind out")
        parameters = RiskParameters(
            coarsening=raw.get("coarsening"),
            decimals=raw.get("decimals"),
            requests_per_minute=raw.get("requests_per_minute"),
        ).check(action)
        ttl = raw.get("ttl_seconds")
        if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
            raise ValueError(f"ttl_seconds must be a positive integer, got {ttl!r}")
        return PolicyEntry(
            kind=AlertKind(raw["kind"]),
            min_severity=Severity(raw.get("min_severity", "medium")),
            action=action,
            parameters=parameters,
            ttl=timedelta(seconds=ttl) if ttl is not None else None,
        )
    except KeyError as error:
        raise ValueError(f"{where}: policy entry {number} lacks {error.args[0]!r}") from None
    except (ValueError, ValidationError) as error:
        first = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise ValueError(f"{where}: policy entry {number}: {first}") from None
