"""What gateways are told to do with a client: its risk decision.

A decision gives a (model, client) less to work with while an incident against it is open: `coarsen` its
responses (labels only, probabilities rounded, or the top class only), `throttle` its requests, or `block`
it. Decisions come from the reviewed risk policy, one per open alert naming the client, or from an operator,
whose decision on a client overrides the policy's. Each may expire. Gateways ask for the one decision in
force (`in_force`): the operator's when there is one, else the strictest of the policy's; `allow` when none.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from detector.domain.times import rfc3339


class RiskAction(StrEnum):
    """What a gateway does with a client's requests; `rank` orders them from allow to block."""

    ALLOW = "allow"
    COARSEN = "coarsen"
    THROTTLE = "throttle"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        """0 for allow up to 3 for block: the stricter, the higher."""
        return _ACTION_ORDER.index(self)


_ACTION_ORDER = (RiskAction.ALLOW, RiskAction.COARSEN, RiskAction.THROTTLE, RiskAction.BLOCK)


class Coarsening(StrEnum):
    """How `coarsen` reduces a response."""

    LABELS = "labels"  # the predicted label only, no scores
    ROUND = "round"  # probabilities rounded to `decimals`
    TOP1 = "top1"  # the top class and its probability only


class RiskParameters(BaseModel):
    """The parameters of an action: `coarsen` needs `coarsening` (and `decimals` for `round`), `throttle`
    needs `requests_per_minute`; the others take none."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    coarsening: Coarsening | None = None
    decimals: int | None = Field(default=None, ge=0, le=6)
    requests_per_minute: int | None = Field(default=None, ge=1)

    def check(self, action: RiskAction) -> RiskParameters:
        """These parameters when they are what `action` needs; raises `ValueError` saying what is wrong."""
        if action is RiskAction.COARSEN:
            if self.coarsening is None or self.requests_per_minute is not None:
                raise ValueError("coarsen takes a coarsening (labels, round or top1) and no rate")
            if (self.coarsening is Coarsening.ROUND) != (self.decimals is not None):
                raise ValueError("coarsen takes decimals with round, and only then")
        elif action is RiskAction.THROTTLE:
            if self.requests_per_minute is None or self.coarsening is not None or self.decimals is not None:
                raise ValueError("throttle takes requests_per_minute and nothing else")
        elif self != RiskParameters():
            raise ValueError(f"{action} takes no parameters")
        return self


class RiskDecision(BaseModel):
    """One decision on a (model, client): the action and its parameters, until `expires_at` (None: until
    withdrawn); from the policy for open alert `alert_id`, or from an operator (`alert_id` None), with who
    decided (`actor`: `policy` or the operator's name) and why. Times are aware UTC datetimes."""

    model_config = ConfigDict(frozen=True)
    model: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    action: RiskAction
    parameters: RiskParameters = Field(default_factory=RiskParameters)
    source: Literal["policy", "operator"]
    alert_id: int | None = None
    actor: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    decided_at: datetime
    expires_at: datetime | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RiskDecision:
        self.parameters.check(self.action)
        if (self.source == "policy") != (self.alert_id is not None):
            raise ValueError("a policy decision names its alert; an operator's names none")
        return self

    def active(self, now: datetime) -> bool:
        """True when the decision has not expired at `now`."""
        return self.expires_at is None or now < self.expires_at


def in_force(decisions: Iterable[RiskDecision], now: datetime) -> tuple[RiskDecision | None, list[int]]:
    """The decision in force among one client's `decisions` at `now`, and the ids of the open alerts behind
    the client's policy decisions: the operator's latest unexpired decision when there is one, else the
    strictest unexpired policy decision (the latest on a tie); None when none is in force."""
    active = [decision for decision in decisions if decision.active(now)]
    alert_ids = sorted({d.alert_id for d in active if d.alert_id is not None})
    operators = [decision for decision in active if decision.source == "operator"]
    if operators:
        return max(operators, key=lambda decision: decision.decided_at), alert_ids
    if not active:
        return None, alert_ids
    return max(active, key=lambda decision: (decision.action.rank, decision.decided_at)), alert_ids


def risk_document(
    model: str, client_id: str, decision: RiskDecision | None, alert_ids: list[int]
) -> dict[str, Any]:
    """What the risk endpoint and topic say of a client: its action (`allow` without a decision), the
    action's parameters, its expiry (RFC 3339, or null), who decided and why, and the open alerts behind
    it."""
    if decision is None:
        return {"model": model, "client_id": client_id, "action": RiskAction.ALLOW.value, "alert_ids": []}
    return {
        "model": model,
        "client_id": client_id,
        "action": decision.action.value,
        "parameters": decision.parameters.model_dump(mode="json", exclude_none=True),
        "expires_at": rfc3339(decision.expires_at.timestamp()) if decision.expires_at else None,
        "source": decision.source,
        "actor": decision.actor,
        "reason": decision.reason,
        "decided_at": rfc3339(decision.decided_at.timestamp()),
        "alert_ids": alert_ids,
    }
