"""Detection canaries: the synthetic attacks a daemon injects into its own input topic (`Canary`), and how a
canary's client is told from a real one (`CanaryClients`).

A canary's client id is a reserved prefix, a random token and a tag, the truncated HMAC-SHA256 of both
under the canary key (`MIA_CANARY_KEY`): `mia-canary-3f9a1c2b7d4e-8c1f0a9b2d3e4f56`. Whoever holds the key
tells a canary by its id alone, wherever the id went (records, alerts, risk decisions, other replicas); a
real client that takes the prefix without the key is an ordinary client, so it cannot pass its own attack
off as a canary's to keep it from the incident sinks and the risk feed.

Canaries query a model name of their own, `CANARY_MODEL`: a real model's input scale, sessions and
training-set pools never see their records, and the dashboards leave that model out. Client ids come from
callers, model names from the serving stack that logs the records.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from detector.domain.alerts import Alert, AlertKind

CANARY_MODEL = "mia-canary"
# 64 bits of the HMAC: a forger would have to send the order of 2^63 attacks, each of them detected.
_TAG_CHARS = 16
_TOKEN_BYTES = 6


@dataclass(frozen=True)
class CanaryClients:
    """The canary clients of `key` under `prefix`: minting a new one, and recognising one."""

    prefix: str
    key: bytes = field(repr=False)

    def mint(self) -> str:
        """A client id no canary had before (a random token), which `verifies` accepts."""
        token = secrets.token_hex(_TOKEN_BYTES)
        return f"{self.prefix}{token}-{self._tag(token)}"

    def verifies(self, client_id: str) -> bool:
        """True when `client_id` was minted with this key and prefix."""
        if not client_id.startswith(self.prefix):
            return False
        token, dash, tag = client_id[len(self.prefix) :].rpartition("-")
        return bool(dash) and hmac.compare_digest(tag, self._tag(token))

    def covers(self, alert: Alert) -> bool:
        """True when every client `alert` names is a canary: the alert is a canary's, never an incident."""
        return all(self.verifies(client_id) for client_id in alert.client_ids)

    def _tag(self, token: str) -> str:
        digest = hmac.new(self.key, f"{self.prefix}{token}".encode(), hashlib.sha256).hexdigest()
        return digest[:_TAG_CHARS]


@dataclass(frozen=True)
class Canary:
    """One canary injected: its client, the kind of alert its attack must raise, when it was injected
    (wall time, epoch seconds, also the event time of its first record) and how many queries it sent."""

    client_id: str
    kind: AlertKind
    injected_at: float
    queries: int
    model: str = CANARY_MODEL
