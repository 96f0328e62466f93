"""The risk feed in memory: every stored decision (`RiskView`), read again from the database every
`MIA_RISK_REFRESH_SECONDS` by `RiskFeed`'s background thread, which then hands the decisions in force to
its listeners (the compacted topic). So the endpoint never waits on the database, and the decisions of
every replica and of the operators' commands are served and published within one refresh. A failed refresh
keeps the last view (logged once until a refresh succeeds again), and tells the listeners nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from detector.domain import RiskDecision, in_force, risk_document, utc
from detector.metrics import RISK_ACTIONS, Metrics

log = logging.getLogger(__name__)

ClientKey = tuple[str, str]  # (model, client id)
InForce = Mapping[ClientKey, dict[str, Any]]  # the document of every client with a decision in force


class RiskView:
    """Every stored decision by (model, client), as of the last `refresh` (from `read`)."""

    def __init__(
        self, read: Callable[[], Iterable[RiskDecision]], clock: Callable[[], float] = time.time
    ) -> None:
        self._read = read
        self._clock = clock
        self._decisions: dict[ClientKey, list[RiskDecision]] = {}
        self._failing = False

    def refresh(self) -> bool:
        """Read the decisions again; on failure keep the last ones. True when the read succeeded."""
        try:
            decisions = list(self._read())
        except Exception as error:  # a database outage must not stop the answers
            if not self._failing:
                log.warning("risk decisions not refreshed, serving the last ones read: %s", error)
            self._failing = True
            return False
        grouped: dict[ClientKey, list[RiskDecision]] = defaultdict(list)
        for decision in decisions:
            grouped[(decision.model, decision.client_id)].append(decision)
        self._decisions = dict(grouped)  # one assignment: readers see the old view or the new one
        if self._failing:
            log.info("risk decisions refreshed again")
        self._failing = False
        return True

    def document(self, model: str, client_id: str) -> dict[str, Any]:
        """What the endpoint answers for (`model`, `client_id`) now."""
        decision, alert_ids = in_force(self._decisions.get((model, client_id), ()), utc(self._clock()))
        return risk_document(model, client_id, decision, alert_ids)

    def in_force(self) -> dict[ClientKey, dict[str, Any]]:
        """The document of every client with a decision in force now (the others are `allow`)."""
        now = utc(self._clock())
        documents = {}
        for (model, client_id), decisions in self._decisions.items():
            decision, alert_ids = in_force(decisions, now)
            if decision is not None:
                documents[(model, client_id)] = risk_document(model, client_id, decision, alert_ids)
        return documents


RiskListener = Callable[[InForce], None]


class RiskFeed:
    """Refreshes `view` every `refresh_seconds` from a background thread, then calls each of `listeners`
    with the view's decisions in force (`RiskView.in_force`, computed once a refresh). A listener that fails
    is logged, counted and called again at the next refresh; `metrics` are told when it refreshed, what
    failed and the decisions in force by action."""

    def __init__(
        self,
        view: RiskView,
        refresh_seconds: float,
        listeners: Iterable[RiskListener] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.view = view
        self._refresh_seconds = refresh_seconds
        self._listeners = list(listeners)
        self._metrics = metrics or Metrics()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="risk-feed", daemon=True)

    def start(self) -> RiskFeed:
        """Refresh once (and tell the listeners), then go on in the background."""
        self._refresh()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop refreshing."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_seconds):
            self._refresh()

    def _refresh(self) -> None:
        metrics = self._metrics
        if not self.view.refresh():
            metrics.risk_refresh_failures.inc()
            return
        metrics.risk_refreshed.set(time.time())
        # Once per refresh: the metrics and every listener see the same decisions, judged at one moment.
        in_force = self.view.in_force()
        actions = Counter(document["action"] for document in in_force.values())
        for action in RISK_ACTIONS:
            metrics.risk_in_force.labels(action=action).set(actions[action])
        for listener in self._listeners:
            try:
                listener(in_force)
            except Exception as error:  # a broker outage must not stop the endpoint's refreshes
                metrics.risk_publish_failures.inc()
                log.warning("risk feed: %s failed: %s", getattr(listener, "__name__", listener), error)
