"""Measured detection quality: the real detector replayed over labelled traffic and scored against the truth.

`evaluate` replays an events file through the same pipeline as `mia-detector replay` (rules, the scoring
model and the training-set index from the settings) into a fresh database of its own, records each client's
first alert, and compares the alerts with the simulator's ground truth (`truth.jsonl`, one line per client):

- per attack kind: attackers detected (any alert, and an alert of the attack's own kind), queries seen and
  event time elapsed from the attack's start until the first alert;
- per benign population: clients falsely alerted;
- over all clients: a continuous suspicion score (how far each client is towards its nearest threshold) and
  its ROC curve, so that separation is measured beyond the single operating point the thresholds pick.

It writes `report.md`, `roc.png`, `scores.png` and `summary.json` into the output directory.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import SecretStr
from sklearn.metrics import roc_auc_score, roc_curve

from detector.alerts.lifecycle import AlertChange
from detector.alerts.sinks import without_sinks
from detector.domain import AllowList, Detection, Severity, display_name
from detector.features.client import FeatureTracker
from detector.scoring.scorer import Scorer
from detector.service import (
    Progress,
    build_detection,
    decoded_batches,
    load_scoring_model,
    load_training_indexes,
    replay,
)
from detector.settings import Settings
from detector.storage import open_store

log = logging.getLogger(__name__)

DATABASE_FILE = "evaluation.db"
REPORT_FILE = "report.md"
ROC_FILE = "roc.png"
SCORES_FILE = "scores.png"
SUMMARY_FILE = "summary.json"
SCENARIO_FILE = "scenario.json"  # written by the simulator next to events.jsonl; optional here
# Read this many records at a time. Rules run once a batch and an alert is reported with the state at which
# its rule first fired, so the default poll-sized batches (thousands of records, a whole simulated hour at
# once) would blur "queries to alert"; a live daemon polls what arrived since its last poll.
BATCH_RECORDS = 100
# Records per commit of an evaluation run: about a third of a second of a live daemon's traffic.
COMMIT_RECORDS = 5_000
# No client's features may be evicted during an evaluation: every client must be scored at the end. The
# bound only caps memory; what is used is what the clients in the file need.
NO_EVICTION = 10_000_000
FPR_POINTS = (0.001, 0.01)
SCORE_FLOOR = 1e-3  # where a zero score is drawn on the log-scale figures
DAY_SECONDS = 86_400.0


class TruthError(ValueError):
    """The truth file is malformed: the message names the line."""


@dataclass(frozen=True)
class TruthClient:
    """One line of `truth.jsonl`: who the client is, and for an attacker, what and since when."""

    client_id: str
    role: str
    population: str
    kind: str | None
    attack_start: float | None

    @property
    def attacker(self) -> bool:
        """True for an attacking client."""
        return self.role == "attacker"


@dataclass(frozen=True)
class FirstAlert:
    """The first page naming a client (an attacker's first once its attack started: a compromised key's
    owner may have been paged before): its kind and severity, and when it was detected: after how many of
    the client's queries (`detected_after_queries`; for an attacker, those since its attack started) and at
    which event time (`detected_at`, epoch seconds; for an escalated exposure, the latest detection of the
    commit that escalated it)."""

    kind: str
    severity: str
    queries: int
    at: float


@dataclass(frozen=True)
class ClientOutcome:
    """What the evaluation found for one labelled client."""

    client_id: str
    role: str
    population: str
    kind: str | None
    score: float
    first_alert: FirstAlert | None
    alert_kinds: tuple[str, ...]
    seconds_to_alert: float | None
    exposure_kinds: tuple[str, ...] = ()
    # An attacker's key paged before its attack started: a false alarm on its owner's traffic.
    paged_before_attack: bool = False


@dataclass(frozen=True)
class KindQuality:
    """Detection of one attack kind. Shares are None without attackers; query and time figures are over
    the detected attackers (None when none was detected)."""

    kind: str
    attackers: int
    detected: int
    detected_share: float | None
    matched: int
    matched_share: float | None
    queries_median: float | None
    queries_p90: float | None
    seconds_median: float | None


@dataclass(frozen=True)
class PopulationQuality:
    """False alerts in one benign population."""

    population: str
    clients: int
    alerted: int
    alerted_share: float


@dataclass(frozen=True)
class AlertKindCount:
    """Alerts opened of one kind, split by whether they name an attacker or only benign clients (alerts
    naming only clients absent from the truth file are in `alerts` alone)."""

    kind: str
    alerts: int
    on_attackers: int
    on_benign_only: int


@dataclass(frozen=True)
class Roc:
    """Separation of attackers (positive) from benign clients by suspicion score. Every figure is None
    when either class is empty; `tpr_at_fpr` maps each FPR point to the highest TPR at an FPR not above it."""

    positives: int
    negatives: int
    auc: float | None
    tpr_at_fpr: dict[str, float | None]
    fpr: list[float] = field(repr=False)
    tpr: list[float] = field(repr=False)


@dataclass(frozen=True)
class Evaluation:
    """Every figure of one evaluation run (see the module docstring); `summary.json` holds the same."""

    events: Path
    truth: Path
    out: Path
    scenario: dict[str, Any] | None
    model_version: str | None
    training_index: bool
    records: int
    queries: int
    dead_letters: int
    span_seconds: float
    attackers: int
    attackers_detected: int
    attackers_detected_share: float | None
    benign_clients: int
    benign_alerted: int
    benign_alerted_share: float | None
    benign_alerted_per_day: float | None
    benign_exposed: int
    attackers_paged_before_attack: int
    unlabelled_clients: int
    kinds: list[KindQuality]
    populations: list[PopulationQuality]
    alert_kinds: list[AlertKindCount]
    roc: Roc
    clients: list[ClientOutcome] = field(repr=False)
    seconds: float

    @property
    def report(self) -> Path:
        """The Markdown report."""
        return self.out / REPORT_FILE


def evaluate(
    settings: Settings, events: Path, truth: Path, out: Path, progress: Progress | None = None
) -> Evaluation:
    """Replay `events` through the configured detector, compare its alerts with `truth`, write the report.

    The run uses its own SQLite database `out/evaluation.db` (recreated each time; the configured database
    is never touched) and scores every client on its features at the end, those stored once idle included.
    Writes `report.md`, `roc.png`, `scores.png` and `summary.json` into `out` (created if needed).
    `progress` is called with each batch of records read, as by `replay`. Raises `TruthError` for a
    malformed truth file.
    """
    began = time.perf_counter()
    labelled = read_truth(truth)
    out.mkdir(parents=True, exist_ok=True)
    database = out / DATABASE_FILE
    # A database left by an earlier run would make every event a duplicate, and nothing would be detected.
    database.unlink(missing_ok=True)
    # An evaluation measures alerts; it never delivers them to the receivers a configuration names.
    run_settings = without_sinks(settings).model_copy(
        update={
            "database": settings.database.model_copy(
                update={"url": SecretStr(f"sqlite:///{database}"), "migrate_on_start": True}
            ),
            "detection": settings.detection.model_copy(
                update={"max_clients": max(settings.detection.max_clients, NO_EVICTION)}
            ),
            "kafka": settings.kafka.model_copy(update={"max_poll_records": BATCH_RECORDS}),
            # By count, not by the clock: the anomaly model judges at each commit, and where those fall must
            # not depend on how busy the machine is, or two runs of one evaluation would differ.
            "commit": settings.commit.model_copy(
                update={"min_records": COMMIT_RECORDS, "min_interval_seconds": float("inf")}
            ),
            "ingest": settings.ingest.for_datasets(),
        }
    )
    model = load_scoring_model(run_settings)
    detect = build_detection(run_settings, model, load_training_indexes(run_settings))
    alerts = _AlertLog(run_settings.alerts.min_severity)
    stats = replay(run_settings, [str(events)], progress=progress, alerts=alerts, detect=detect)
    # As in the daemon, clients idle for a session gap left memory once stored: they are scored (and their
    # span measured) from the states stored, or the report would rank most clients at 0.
    store = open_store(run_settings, migrate=False)
    try:
        unreadable = detect.tracker.restore(store.every_client_state())
    finally:
        store.close()
    for model_name, client_id in unreadable:
        log.warning(
            "the stored features of client %s of model %s are unreadable: scored 0",
            display_name(client_id),
            display_name(model_name),
        )

    scores = suspicion_scores(detect.tracker, detect.detector.scorer, run_settings.detection.allow_list())
    seen = [client for _, client in detect.tracker.items()]
    span = max(c.last_seen for c in seen) - min(c.first_seen for c in seen) if seen else 0.0
    starts = {client.client_id: client.attack_start for client in labelled if client.attacker}
    before = _queries_before_attacks(run_settings, events, starts)
    outcomes = [
        _outcome(client, scores.get(client.client_id, 0.0), alerts, before[client.client_id])
        for client in labelled
    ]
    benign = [outcome for outcome in outcomes if outcome.role != "attacker"]
    attackers = [outcome for outcome in outcomes if outcome.role == "attacker"]
    benign_alerted = sum(outcome.first_alert is not None for outcome in benign)
    attackers_detected = sum(outcome.first_alert is not None for outcome in attackers)
    roles = {client.client_id: client.attacker for client in labelled}
    evaluation = Evaluation(
        events=events,
        truth=truth,
        out=out,
        scenario=_scenario(events.parent / SCENARIO_FILE),
        model_version=model.version if model else None,
        training_index=bool(
            detect.tracker.training_indexes.by_model or detect.tracker.training_indexes.default
        ),
        records=stats.records,
        queries=stats.queries,
        dead_letters=sum(stats.dead_letters.values()),
        span_seconds=span,
        attackers=len(attackers),
        attackers_detected=attackers_detected,
        attackers_detected_share=_share(attackers_detected, len(attackers)),
        benign_clients=len(benign),
        benign_alerted=benign_alerted,
        benign_alerted_share=_share(benign_alerted, len(benign)),
        benign_alerted_per_day=benign_alerted / (span / DAY_SECONDS) if span > 0 else None,
        benign_exposed=sum(
            bool(outcome.exposure_kinds) and outcome.first_alert is None for outcome in benign
        ),
        attackers_paged_before_attack=sum(outcome.paged_before_attack for outcome in attackers),
        unlabelled_clients=len(set(scores) - set(roles)),
        kinds=_kinds(attackers),
        populations=_populations(benign),
        alert_kinds=_alert_kinds(alerts.all, roles, starts),
        roc=roc([outcome.role == "attacker" for outcome in outcomes], [o.score for o in outcomes]),
        clients=outcomes,
        seconds=time.perf_counter() - began,
    )
    write_summary(evaluation, out / SUMMARY_FILE)
    plot_roc(evaluation.roc, out / ROC_FILE)
    plot_scores(outcomes, out / SCORES_FILE)
    evaluation.report.write_text(render_report(evaluation))
    return evaluation


def read_truth(path: Path) -> list[TruthClient]:
    """The clients of a truth file (JSON Lines); raises `TruthError` naming the first bad line."""
    clients: list[TruthClient] = []
    known: set[str] = set()
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
                start = entry.get("attack_start")
                client = TruthClient(
                    client_id=str(entry["client_id"]),
                    role=str(entry["role"]),
                    population=str(entry["population"]),
                    kind=None if entry.get("kind") is None else str(entry["kind"]),
                    attack_start=None if start is None else datetime.fromisoformat(start).timestamp(),
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
                raise TruthError(f"{path}:{number}: not a truth record ({error})") from None
            if client.role not in ("attacker", "benign"):
                raise TruthError(f"{path}:{number}: role must be attacker or benign, not {client.role!r}")
            if client.attacker and client.kind is None:
                raise TruthError(f"{path}:{number}: an attacker needs a kind")
            if client.client_id in known:
                raise TruthError(f"{path}:{number}: client {client.client_id} is listed twice")
            known.add(client.client_id)
            clients.append(client)
    return clients


def suspicion_scores(tracker: FeatureTracker, scorer: Scorer, allowlist: AllowList) -> dict[str, float]:
    """Per client id, how far its features are towards the nearest threshold (1.0 = at it), now.

    For each of the client's (model, client) keys, the highest verdict ratio (`Scorer.score`: the rules,
    and the anomaly model when it judges the client) over the kinds the allow-list does not silence for
    the client, as those cannot alert; the client's score is the highest over its keys, 0 at least.
    """
    keyed = tracker.items()
    scored = scorer.score([client.snapshot() for _, client in keyed])
    scores: dict[str, float] = {}
    for ((_, client_id), _), verdicts in zip(keyed, scored, strict=True):
        ratios = [
            verdict.ratio for kind, verdict in verdicts.items() if not allowlist.covers(client_id, kind)
        ]
        scores[client_id] = max([scores.get(client_id, 0.0), *ratios])
    return scores


def roc(labels: Sequence[bool], scores: Sequence[float]) -> Roc:
    """The ROC of `scores` for `labels` (True = attacker); see `Roc` for the degenerate cases."""
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return Roc(positives, negatives, None, {str(x): None for x in FPR_POINTS}, [], [])
    fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores))
    return Roc(
        positives,
        negatives,
        float(roc_auc_score(np.asarray(labels), np.asarray(scores))),
        {str(x): float(tpr[fpr <= x].max()) for x in FPR_POINTS},
        [float(value) for value in fpr],
        [float(value) for value in tpr],
    )


class _AlertLog:
    """The pipeline's `AlertListener`: every page (an alert opened at `min_severity` or above, or escalated
    to it), each client's pages, and the kinds recorded as exposure only."""

    def __init__(self, min_severity: Severity) -> None:
        self.min_severity = min_severity
        self.all: list[tuple[str, tuple[str, ...], float]] = []  # kind, clients, event time
        self.pages: dict[str, list[FirstAlert]] = {}  # every page naming each client
        self.exposures: dict[str, set[str]] = {}

    def opened(self, alerts: list[tuple[AlertChange, Detection]]) -> None:
        for change, detection in alerts:
            if change.alert.severity.reaches(self.min_severity):
                self._paged(detection, detection.detected_after_queries, detection.detected_at)
            else:
                for client_id in detection.client_ids:
                    self.exposures.setdefault(client_id, set()).add(detection.kind.value)

    def escalated(self, alerts: list[tuple[AlertChange, Detection]]) -> None:
        for change, detection in alerts:
            before = change.severity_before
            if (
                before is not None
                and not before.reaches(self.min_severity)
                and change.alert.severity.reaches(self.min_severity)
            ):
                # Paged from the escalation on, which the latest detection of the commit stands for.
                self._paged(detection, detection.queries, detection.last_seen)

    def _paged(self, detection: Detection, queries: int, at: float) -> None:
        kind = detection.kind.value
        self.all.append((kind, detection.client_ids, at))
        # A coordination alert names several clients: each of them has been flagged.
        for client_id in detection.client_ids:
            self.pages.setdefault(client_id, []).append(
                FirstAlert(kind, detection.severity.value, queries, at)
            )


def _outcome(client: TruthClient, score: float, alerts: _AlertLog, queries_before: int) -> ClientOutcome:
    """`client`'s outcome; for an attacker, only the pages once its attack started (and the queries since,
    `queries_before` the start left out) tell whether and how soon it was caught."""
    start = client.attack_start
    pages = alerts.pages.get(client.client_id, [])
    since = [page for page in pages if start is None or page.at >= start]
    first = min(since, key=lambda page: page.at) if since else None
    if first is not None:
        first = replace(first, queries=first.queries - queries_before)
    return ClientOutcome(
        client_id=client.client_id,
        role=client.role,
        population=client.population,
        kind=client.kind,
        score=score,
        first_alert=first,
        alert_kinds=tuple(sorted({page.kind for page in since})),
        seconds_to_alert=first.at - start if first is not None and start is not None else None,
        exposure_kinds=tuple(sorted(alerts.exposures.get(client.client_id, ()))),
        paged_before_attack=len(since) < len(pages),
    )


def _queries_before_attacks(
    settings: Settings, events: Path, starts: dict[str, float | None]
) -> Counter[str]:
    """How many queries each attacker sent before its attack started (`starts`, None where unknown): a
    compromised key's owner's, cover traffic of an interleaving attacker; read from `events`."""
    before: Counter[str] = Counter()
    if not any(start is not None for start in starts.values()):
        return before
    for batch in decoded_batches(settings, [str(events)]):
        for query in batch:
            start = starts.get(query.client_id)
            if start is not None and query.timestamp < start:
                before[query.client_id] += 1
    return before


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _kinds(attackers: list[ClientOutcome]) -> list[KindQuality]:
    qualities = []
    for kind in sorted({outcome.kind for outcome in attackers if outcome.kind is not None}):
        mine = [outcome for outcome in attackers if outcome.kind == kind]
        detected = [outcome for outcome in mine if outcome.first_alert is not None]
        queries = [outcome.first_alert.queries for outcome in detected if outcome.first_alert is not None]
        seconds = [outcome.seconds_to_alert for outcome in detected if outcome.seconds_to_alert is not None]
        matched = sum(kind in outcome.alert_kinds for outcome in mine)
        qualities.append(
            KindQuality(
                kind=kind,
                attackers=len(mine),
                detected=len(detected),
                detected_share=_share(len(detected), len(mine)),
                matched=matched,
                matched_share=_share(matched, len(mine)),
                queries_median=float(np.median(queries)) if queries else None,
                queries_p90=float(np.percentile(queries, 90)) if queries else None,
                seconds_median=float(np.median(seconds)) if seconds else None,
            )
        )
    return qualities


def _populations(benign: list[ClientOutcome]) -> list[PopulationQuality]:
    qualities = []
    for population in sorted({outcome.population for outcome in benign}):
        mine = [outcome for outcome in benign if outcome.population == population]
        alerted = sum(outcome.first_alert is not None for outcome in mine)
        qualities.append(PopulationQuality(population, len(mine), alerted, alerted / len(mine)))
    return qualities


def _alert_kinds(
    opened: list[tuple[str, tuple[str, ...], float]],
    roles: dict[str, bool],
    starts: dict[str, float | None],
) -> list[AlertKindCount]:
    """Pages by kind, on attackers and on benign clients; an attacker's key paged before its attack started
    was a benign client then."""
    alerts: Counter[str] = Counter()
    on_attackers: Counter[str] = Counter()
    on_benign: Counter[str] = Counter()
    for kind, client_ids, at in opened:
        alerts[kind] += 1
        named = [_attacking(client_id, at, roles, starts) for client_id in client_ids if client_id in roles]
        if any(named):
            on_attackers[kind] += 1
        elif named:
            on_benign[kind] += 1
    return [
        AlertKindCount(kind, alerts[kind], on_attackers[kind], on_benign[kind]) for kind in sorted(alerts)
    ]


def _attacking(client_id: str, at: float, roles: dict[str, bool], starts: dict[str, float | None]) -> bool:
    """True when `client_id` is an attacker whose attack had started by event time `at`."""
    start = starts.get(client_id)
    return roles[client_id] and (start is None or at >= start)


def _scenario(path: Path) -> dict[str, Any] | None:
    """The simulator's metadata next to the events (name, description, seed), if it is there."""
    if not path.is_file():
        return None
    try:
        metadata = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as error:
        log.warning("ignoring %s: %s", path, error)
        return None
    return {key: metadata.get(key) for key in ("scenario", "description", "seed", "start", "end")}


# -- outputs -------------------------------------------------------------------------------------------------


def write_summary(evaluation: Evaluation, path: Path) -> None:
    """Every figure of `evaluation` as JSON (paths as strings), the report's machine-readable twin."""
    data = orjson.dumps(evaluation, default=str, option=orjson.OPT_INDENT_2)
    path.write_bytes(data + b"\n")


def plot_roc(result: Roc, path: Path) -> None:
    """The ROC curve on a log FPR axis with the TPR at each of `FPR_POINTS` marked, as a PNG."""
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    if result.auc is None:
        axes.text(0.5, 0.5, "no ROC: attackers and benign clients are both needed", ha="center", va="center")
        axes.set_axis_off()
        figure.savefig(path, dpi=120)
        return
    # FPR 0 has no place on a log axis: it is drawn at the left edge, a decade below both the first FPR
    # point and the finest FPR the benign clients can measure.
    left = min(FPR_POINTS[0] / 10, 0.1 / result.negatives)
    fpr = np.clip(result.fpr, left, 1.0)
    axes.plot(fpr, result.tpr, color="tab:blue", label=f"detector (AUC {result.auc:.3f})")
    chance = np.logspace(np.log10(left), 0, 100)
    axes.plot(chance, chance, color="grey", linestyle=":", label="chance")
    for point, tpr in result.tpr_at_fpr.items():
        x = float(point)
        axes.axvline(x, color="tab:red", linestyle="--", linewidth=0.8)
        if tpr is not None:
            axes.plot([x], [tpr], marker="o", linestyle="", label=f"TPR {tpr:.2f} at FPR {x:.1%}")
    axes.set_xscale("log")
    axes.set_xlim(left, 1.0)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(f"false-positive rate (benign clients, n={result.negatives})")
    axes.set_ylabel(f"true-positive rate (attackers, n={result.positives})")
    axes.set_title("ROC of the per-client suspicion score")
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=120)


def plot_scores(outcomes: list[ClientOutcome], path: Path) -> None:
    """Suspicion scores of benign clients and of each attack kind (log scale, 1.0 = a threshold), as a PNG."""
    groups: dict[str, list[float]] = {"benign": []}
    for outcome in sorted(outcomes, key=lambda outcome: outcome.kind or ""):
        groups.setdefault(outcome.kind or "benign", []).append(max(outcome.score, SCORE_FLOOR))
    figure = Figure(figsize=(max(6.4, 1.6 * len(groups)), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    jitter = np.random.default_rng(0)  # fixed: the same inputs draw the same figure
    for position, scores in enumerate(groups.values(), start=1):
        if scores:
            axes.boxplot([scores], positions=[position], widths=0.5, showfliers=False)
            x = position + jitter.uniform(-0.15, 0.15, len(scores))
            axes.scatter(x, scores, s=10, alpha=0.6, color="tab:green" if position == 1 else "tab:red")
    axes.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="threshold (score 1.0)")
    axes.set_xticks(
        range(1, len(groups) + 1),
        [name.replace("_", "\n") + f"\n(n={len(scores)})" for name, scores in groups.items()],
    )
    axes.set_yscale("log")
    axes.set_ylabel(f"suspicion score (score / threshold; 0 drawn at {SCORE_FLOOR:g})")
    axes.set_title("Per-client suspicion score at the end of the run")
    axes.legend(loc="upper left")
    figure.savefig(path, dpi=120)


def format_share(share: float | None) -> str:
    """`share` as a percentage with one decimal; n/a for None."""
    return "n/a" if share is None else f"{share:.1%}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def format_duration(seconds: float | None) -> str:
    """`seconds` for people: seconds under 2 minutes, minutes under 2 hours, hours beyond; n/a for None."""
    if seconds is None:
        return "n/a"
    if abs(seconds) < 120:
        return f"{seconds:.0f} s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_report(evaluation: Evaluation) -> str:
    """The Markdown report of `evaluation`: inputs, the tables, the figures, and how to read them."""
    e = evaluation
    scenario = e.scenario
    lines = ["# Detection quality", ""]
    if scenario is not None:
        lines += [
            f"Scenario **{scenario['scenario']}** (seed {scenario['seed']}): {scenario['description']}",
            "",
        ]
    lines += [
        f"- events: `{e.events}` ({e.records} records, {e.queries} queries, {e.dead_letters} dead letters, "
        f"spanning {format_duration(e.span_seconds)} of event time)",
        f"- truth: `{e.truth}` ({e.attackers} attacking and {e.benign_clients} benign clients"
        + (f"; {e.unlabelled_clients} clients in the events are not in it" if e.unlabelled_clients else "")
        + ")",
        "- scoring model: "
        + (
            f"`{e.model_version}`"
            if e.model_version
            else "none: every rule at its floor and no anomaly model (`mia-detector train` on baseline "
            "traffic, then `MIA_MODEL_PATH`, calibrates them)"
        ),
        "- training-set index: "
        + ("loaded" if e.training_index else "none: the training-set targeting rule cannot fire without it"),
        f"- detection run time (replay and scoring): {e.seconds:.1f} s",
        "",
        "## Attacks by kind",
        "",
        "| attack kind | attackers | detected | detected as this kind | median queries to alert "
        "| p90 queries to alert | median time to alert |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in e.kinds:
        lines.append(
            f"| {kind.kind} | {kind.attackers} | {kind.detected} ({format_share(kind.detected_share)}) "
            f"| {kind.matched} ({format_share(kind.matched_share)}) | {_number(kind.queries_median)} "
            f"| {_number(kind.queries_p90)} | {format_duration(kind.seconds_median)} |"
        )
    lines += [
        f"| **all** | {e.attackers} | {e.attackers_detected} ({format_share(e.attackers_detected_share)}) "
        "| | | | |",
        "",
        "## False alerts on benign clients",
        "",
        "| population | clients | falsely alerted | share |",
        "|---|---:|---:|---:|",
    ]
    for population in e.populations:
        lines.append(
            f"| {population.population} | {population.clients} | {population.alerted} "
            f"| {format_share(population.alerted_share)} |"
        )
    per_day = "n/a" if e.benign_alerted_per_day is None else f"{e.benign_alerted_per_day:.1f}"
    lines += [
        f"| **all** | {e.benign_clients} | {e.benign_alerted} | {format_share(e.benign_alerted_share)} |",
        "",
        f"Benign clients falsely alerted per simulated day: {per_day}. Alerts are pages: opened at "
        "`MIA_ALERTS_MIN_SEVERITY` or above, or escalated to it. Benign clients with exposure recorded "
        f"(below it) and no page: {e.benign_exposed}. Attackers' keys paged before their attack started "
        f"(false alarms on a compromised key's owner; such a page is no detection): "
        f"{e.attackers_paged_before_attack}.",
        "",
        "## Alert kinds raised",
        "",
    ]
    if e.alert_kinds:
        lines += [
            "| alert kind | alerts opened | naming an attacker | naming only benign clients |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {count.kind} | {count.alerts} | {count.on_attackers} | {count.on_benign_only} |"
            for count in e.alert_kinds
        ]
    else:
        lines.append("No alert was opened.")
    lines += ["", "## Separation of attackers from benign clients", ""]
    if e.roc.auc is None:
        lines.append("No ROC: it needs both attacking and benign clients in the truth file.")
    else:
        tpr = ", ".join(
            f"TPR {format_share(rate)} at FPR {float(x):.1%}" for x, rate in e.roc.tpr_at_fpr.items()
        )
        lines += [
            f"ROC AUC **{e.roc.auc:.3f}**; {tpr} ({e.roc.positives} attackers, {e.roc.negatives} benign "
            f"clients: the smallest non-zero FPR measurable here is {1 / e.roc.negatives:.2%}).",
        ]
    lines += [
        "",
        f"![ROC curve]({ROC_FILE})",
        "",
        f"![Suspicion scores]({SCORES_FILE})",
        "",
        "## What the figures mean",
        "",
        "- The events were replayed through the configured detector exactly as `mia-detector replay` does, "
        f"in batches of {BATCH_RECORDS} records (as a live daemon polls what arrived), into a database "
        "of this evaluation's own.",
        "- *Detected*: at least one alert named the client (a coordination alert counts for every client "
        "it names). *Detected as this kind*: one of its alerts had the attack's own kind.",
        "- *Queries to alert*: the queries the client had sent (attack and cover traffic) up to the query on "
        "which its first alert's rule first crossed its threshold (the alert's `detected_after_queries`). "
        "*Time to alert*: event time from the attack's first query to that query (the alert's "
        "`detected_at`).",
        "- *Falsely alerted*: a benign client named by any alert; per simulated day divides the count by "
        "the events' span in days.",
        "- *Suspicion score*: per client at the end of the run, the highest ratio of a rule's score to its "
        "threshold (over the rules whose guards hold) or of the anomaly score to the forest threshold (when "
        "a model is loaded and the client sent enough queries); 1.0 means at a threshold. A client alerted "
        "earlier may end below 1.0 when a guard (a share) no longer holds. The ROC ranks clients by it: it "
        "shows how much separation the thresholds leave unused, not the alerting itself.",
        "- TPR at an FPR is the largest share of attackers scored above a cut-off that flags at most that "
        "share of benign clients.",
        "",
    ]
    return "\n".join(lines)
