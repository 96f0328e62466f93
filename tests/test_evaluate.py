"""`evaluate`: the real detector over labelled traffic, its figures checked against what the traffic holds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from detector.evaluate import SUMMARY_FILE, Evaluation, TruthError, evaluate, read_truth, roc
from detector.service import train
from detector.settings import Settings, load_settings
from detector.simulate.sample import oip_record
from tests.test_cli import cli_env, mia

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
START = datetime(2026, 11, 29, 8, 0, tzinfo=UTC).timestamp()
WIDTH = 30
BENIGN = {"steady_app": ["app-1", "app-2", "app-3", "app-4"], "occasional": ["occ-1", "occ-2"]}
PROBER, WALKER, STRANGER = "prober", "walker", "stranger"
ATTACK_AT = START + 3000.0  # after the 256 queries that freeze the model's feature scale, all benign


@dataclass(frozen=True)
class Labelled:
    """A small labelled traffic file: events, truth, and when each attack started."""

    events: Path
    truth: Path
    attack_start: dict[str, float]


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_labelled_traffic(directory: Path) -> Labelled:
    """Six benign clients sending distinct records with probabilities, an augmentation prober (12 records,
    each followed by 8 small-noise label-only variants), a label-only boundary walker whose label keeps
    flipping, and one client absent from the truth file."""
    rng = np.random.default_rng(5)
    scale = rng.uniform(0.5, 50.0, WIDTH).astype(np.float32)  # very different feature scales, as in real data
    records: list[tuple[float, dict[str, Any]]] = []

    def send(at: float, client: str, row: np.ndarray, label: int, *, probabilities: bool) -> None:
        probs = np.array([[0.8, 0.2] if label == 0 else [0.2, 0.8]], dtype=np.float32)
        event_id = f"{client}-{len(records)}"
        record = oip_record(event_id, at, client, row[None, :], probs, want_probabilities=probabilities)
        records.append((at, record))

    for client in (client for clients in BENIGN.values() for client in clients):
        for at in np.sort(rng.uniform(START, START + 3600.0, 60)):
            send(float(at), client, rng.normal(size=WIDTH) * scale, int(rng.integers(2)), probabilities=True)
    for at in np.sort(rng.uniform(START, START + 3600.0, 5)):
        send(float(at), STRANGER, rng.normal(size=WIDTH) * scale, 0, probabilities=True)

    at = ATTACK_AT
    for _ in range(12):
        base = rng.normal(size=WIDTH) * scale
        send(at, PROBER, base, 0, probabilities=False)
        for _ in range(8):
            at += 0.2
            send(at, PROBER, base + rng.normal(size=WIDTH) * scale * 0.02, 0, probabilities=False)
        at += 5.0

    point, direction = rng.normal(size=WIDTH) * scale, rng.normal(size=WIDTH) * scale
    for step in range(400):
        point = point + direction * 0.002 + rng.normal(size=WIDTH) * scale * 0.004
        label = (step // 3) % 2  # hovering on the decision boundary: the label keeps flipping
        send(ATTACK_AT + 10.0 + step * 0.5, WALKER, point, label, probabilities=False)

    events = directory / "events.jsonl"
    with events.open("wb") as out:
        for _, record in sorted(records, key=lambda pair: pair[0]):
            out.write(orjson.dumps(record) + b"\n")
    starts = {PROBER: ATTACK_AT, WALKER: ATTACK_AT + 10.0}
    truth = directory / "truth.jsonl"
    with truth.open("wb") as out:
        for population, clients in BENIGN.items():
            for client in clients:
                out.write(orjson.dumps(_truth(client, "benign", population, None, None)) + b"\n")
        out.write(
            orjson.dumps(_truth(PROBER, "attacker", "x", "augmentation_probing", starts[PROBER])) + b"\n"
        )
        out.write(orjson.dumps(_truth(WALKER, "attacker", "x", "boundary_probing", starts[WALKER])) + b"\n")
    return Labelled(events, truth, starts)


def _truth(client: str, role: str, population: str, kind: str | None, start: float | None) -> dict[str, Any]:
    return {
        "client_id": client,
        "role": role,
        "population": kind or population,
        "kind": kind,
        "campaign": None,
        "model": "credit-risk",
        "attack_start": None if start is None else _rfc3339(start),
        "attack_queries": 0,
    }


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Labelled:
    return write_labelled_traffic(tmp_path_factory.mktemp("traffic"))


def operator_settings(directory: Path) -> Settings:
    """Settings as an operator has them: their own database and a receiver (OCSF findings in a file), which
    an evaluation must leave alone."""
    return load_settings(
        None,
        database={"url": f"sqlite:///{directory / 'operator.db'}"},
        ocsf={"file": directory / "findings.jsonl"},
    )


@pytest.fixture(scope="module")
def evaluated(labelled: Labelled, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Evaluation]:
    directory = tmp_path_factory.mktemp("evaluation")
    yield evaluate(operator_settings(directory), labelled.events, labelled.truth, directory / "out")
    assert not (directory / "operator.db").exists()
    assert not (directory / "findings.jsonl").exists()  # alerts were raised, none delivered


def test_the_prober_and_the_walker_are_detected_with_their_kinds_and_no_benign_client_is(
    evaluated: Evaluation, labelled: Labelled
) -> None:
    outcomes = {outcome.client_id: outcome for outcome in evaluated.clients}
    prober, walker = outcomes[PROBER], outcomes[WALKER]
    assert prober.first_alert is not None and prober.first_alert.kind == "augmentation_probing"
    assert walker.first_alert is not None and "boundary_probing" in walker.alert_kinds
    assert prober.first_alert.severity == "high"
    # It cannot fire before its third burst, and it has fired before the last of its 108 queries.
    assert 3 * 9 <= prober.first_alert.queries < 108
    assert prober.seconds_to_alert is not None
    assert prober.seconds_to_alert == pytest.approx(prober.first_alert.at - labelled.attack_start[PROBER])
    assert 0 <= prober.seconds_to_alert < 12 * 7

    kinds = {kind.kind: kind for kind in evaluated.kinds}
    assert set(kinds) == {"augmentation_probing", "boundary_probing"}
    for kind in kinds.values():
        assert (kind.attackers, kind.detected, kind.matched) == (1, 1, 1)
        assert kind.detected_share == kind.matched_share == 1.0
    assert kinds["augmentation_probing"].queries_median == prober.first_alert.queries
    assert (evaluated.attackers, evaluated.attackers_detected) == (2, 2)

    assert (evaluated.benign_clients, evaluated.benign_alerted) == (6, 0)
    assert evaluated.benign_alerted_share == 0.0 and evaluated.benign_alerted_per_day == 0.0
    populations = {p.population: (p.clients, p.alerted) for p in evaluated.populations}
    assert populations == {"steady_app": (4, 0), "occasional": (2, 0)}
    assert {count.kind: count.on_benign_only for count in evaluated.alert_kinds} == {
        "augmentation_probing": 0,
        "boundary_probing": 0,
    }
    assert evaluated.unlabelled_clients == 1  # the stranger is scored but counted nowhere else
    assert evaluated.span_seconds > 3000


def test_the_score_ranks_every_attacker_above_every_benign_client(evaluated: Evaluation) -> None:
    scores = {outcome.client_id: outcome.score for outcome in evaluated.clients}
    assert scores[PROBER] >= 1.0 and scores[WALKER] >= 1.0
    assert max(scores[client] for clients in BENIGN.values() for client in clients) < 1.0
    assert evaluated.roc.auc == 1.0
    assert evaluated.roc.tpr_at_fpr == {"0.001": 1.0, "0.01": 1.0}
    assert (evaluated.roc.positives, evaluated.roc.negatives) == (2, 6)


def test_clients_idle_by_the_end_are_scored_from_their_stored_state(
    labelled: Labelled, tmp_path: Path
) -> None:
    # One last query hours later, of a client new to the stream: every other client is idle by then, and
    # leaves memory once stored.
    row, probabilities = np.ones((1, WIDTH), dtype=np.float32), np.array([[0.5, 0.5]], dtype=np.float32)
    later = oip_record("latecomer-0", START + 4 * 3600.0, "latecomer", row, probabilities)
    events = tmp_path / "events.jsonl"
    events.write_bytes(labelled.events.read_bytes() + orjson.dumps(later) + b"\n")
    evaluation = evaluate(operator_settings(tmp_path), events, labelled.truth, tmp_path / "out")
    scores = {outcome.client_id: outcome.score for outcome in evaluation.clients}
    assert scores[PROBER] >= 1.0 and scores[WALKER] >= 1.0
    assert evaluation.roc.auc == 1.0
    assert evaluation.span_seconds > 3 * 3600.0  # from the first hour's queries, of clients let go
    assert evaluation.unlabelled_clients == 2  # the stranger, let go, and the latecomer


def test_report_figures_and_summary_are_written(evaluated: Evaluation) -> None:
    for name in ("roc.png", "scores.png"):
        assert (evaluated.out / name).read_bytes().startswith(PNG_MAGIC)
    report = evaluated.report.read_text()
    assert report.startswith("# Detection quality")
    assert "| augmentation_probing | 1 | 1 (100.0%) | 1 (100.0%) |" in report
    assert "| steady_app | 4 | 0 | 0.0% |" in report
    assert "ROC AUC **1.000**" in report
    summary = orjson.loads((evaluated.out / SUMMARY_FILE).read_bytes())
    assert summary["roc"]["auc"] == 1.0 and summary["benign_alerted"] == 0
    assert {kind["kind"] for kind in summary["kinds"]} == {"augmentation_probing", "boundary_probing"}
    assert len(summary["clients"]) == 8 and summary["events"].endswith("events.jsonl")


def write_baseline(path: Path, clients: list[str]) -> None:
    """The hour before the labelled traffic: each of `clients` sending ordinary distinct records."""
    rng = np.random.default_rng(6)
    scale = np.random.default_rng(5).uniform(0.5, 50.0, WIDTH).astype(np.float32)  # the traffic's scales
    lines = []
    for client in clients:
        for index, at in enumerate(np.sort(rng.uniform(START - 3600.0, START, 60))):
            row = (rng.normal(size=WIDTH) * scale)[None, :]
            probs = np.array([[0.8, 0.2]], dtype=np.float32)
            lines.append((float(at), oip_record(f"base-{client}-{index}", float(at), client, row, probs)))
    path.write_bytes(
        b"".join(orjson.dumps(record) + b"\n" for _, record in sorted(lines, key=lambda x: x[0]))
    )


def test_an_allow_listed_key_that_turns_to_walking_a_boundary_is_still_caught(
    labelled: Labelled, tmp_path: Path
) -> None:
    """The walker's key was an ordinary, allow-listed client in the baseline: trained on that baseline, the
    detector knows its history, and the entry no longer covers what the key does now."""
    baseline = tmp_path / "baseline.jsonl"
    write_baseline(baseline, [*(c for clients in BENIGN.values() for c in clients), WALKER])
    allowlist = [{"client_id": WALKER, "reason": "the reporting team's service key"}]
    settings = load_settings(
        None, database={"url": f"sqlite:///{tmp_path / 'operator.db'}"}, detection={"allowlist": allowlist}
    )
    train(settings, [str(baseline)], 0.001, tmp_path / "model")
    trained = settings.model_copy(update={"model_path": tmp_path / "model"})

    with_history = {
        o.client_id: o for o in evaluate(trained, labelled.events, labelled.truth, tmp_path / "a").clients
    }
    assert with_history[WALKER].first_alert is not None
    assert "boundary_probing" in with_history[WALKER].alert_kinds
    # Without a model (no history), the entry covers the key whatever it does.
    blind = {
        o.client_id: o for o in evaluate(settings, labelled.events, labelled.truth, tmp_path / "b").clients
    }
    assert blind[WALKER].first_alert is None and blind[PROBER].first_alert is not None


def test_an_attacker_is_caught_by_a_page_once_its_attack_started_after_the_queries_since(
    evaluated: Evaluation, labelled: Labelled, tmp_path: Path
) -> None:
    """A compromised key's owner paged before the attack is not the attack caught, and the owner's queries
    are not the attack's: here the prober's truth says its attack starts after every page it got, and the
    walker's 5 queries into its walk."""
    outcomes = {o.client_id: o for o in evaluated.clients}
    probed, walked = outcomes[PROBER].first_alert, outcomes[WALKER].first_alert
    assert probed is not None and walked is not None
    walk_start = labelled.attack_start[WALKER] + 5 * 0.5  # a step every half second
    assert walked.at > walk_start
    starts = {PROBER: probed.at + 3600.0, WALKER: walk_start}
    truth = tmp_path / "truth.jsonl"
    lines = [orjson.loads(line) for line in labelled.truth.read_bytes().splitlines()]
    truth.write_bytes(
        b"".join(
            orjson.dumps(
                line | {"attack_start": _rfc3339(starts[line["client_id"]])}
                if line["client_id"] in starts
                else line
            )
            + b"\n"
            for line in lines
        )
    )

    later = evaluate(operator_settings(tmp_path), labelled.events, truth, tmp_path / "o")
    moved = {o.client_id: o for o in later.clients}
    assert moved[PROBER].first_alert is None and moved[PROBER].alert_kinds == ()
    assert moved[PROBER].paged_before_attack and later.attackers_paged_before_attack == 1
    assert moved[WALKER].first_alert == replace(walked, queries=walked.queries - 5)
    [probing] = [count for count in later.alert_kinds if count.kind == "augmentation_probing"]
    assert (probing.on_attackers, probing.on_benign_only) == (0, 1)  # the prober was a benign key then
    assert "Attackers' keys paged before their attack started" in later.report.read_text()


def test_a_second_run_into_the_same_directory_starts_from_a_fresh_database(
    evaluated: Evaluation, labelled: Labelled
) -> None:
    again = evaluate(operator_settings(evaluated.out.parent), labelled.events, labelled.truth, evaluated.out)
    assert again.records == evaluated.records
    assert again.attackers_detected == 2
    assert [outcome.first_alert for outcome in again.clients] == [
        outcome.first_alert for outcome in evaluated.clients
    ]


def test_without_attackers_in_the_truth_there_is_no_roc_and_no_crash(
    labelled: Labelled, tmp_path: Path
) -> None:
    truth = tmp_path / "benign-only.jsonl"
    truth.write_bytes(
        b"\n".join(line for line in labelled.truth.read_bytes().splitlines() if b'"benign"' in line)
    )
    result = evaluate(operator_settings(tmp_path), labelled.events, truth, tmp_path / "out")
    assert result.roc.auc is None and result.roc.tpr_at_fpr == {"0.001": None, "0.01": None}
    assert result.kinds == [] and result.attackers_detected_share is None
    assert result.unlabelled_clients == 3
    assert (tmp_path / "out" / "roc.png").read_bytes().startswith(PNG_MAGIC)
    assert "No ROC" in result.report.read_text()


def test_tpr_at_fpr_is_the_best_tpr_without_exceeding_the_fpr() -> None:
    result = roc([True, True, False, False, False], [0.9, 0.4, 0.5, 0.1, 0.2])
    assert result.auc == pytest.approx(5 / 6)
    assert result.tpr_at_fpr == {"0.001": 0.5, "0.01": 0.5}
    assert roc([True], [1.0]).auc is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"client_id": "a", "role": "attacker", "population": "p", "kind": null}', "needs a kind"),
        (b'{"client_id": "a", "role": "bystander", "population": "p"}', "role"),
        (b'{"client_id": "a", "role": "benign"}', "not a truth record"),
        (
            b'{"client_id": "a", "role": "attacker", "population": "p", "kind": "k", "attack_start": "soon"}',
            ":1:",
        ),
        (b"[not json", ":1:"),
    ],
)
def test_a_malformed_truth_file_names_the_line(tmp_path: Path, line: bytes, message: str) -> None:
    truth = tmp_path / "truth.jsonl"
    truth.write_bytes(line + b"\n")
    with pytest.raises(TruthError, match=message):
        read_truth(truth)


def test_a_client_listed_twice_in_the_truth_is_refused(tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    line = b'{"client_id": "a", "role": "benign", "population": "p", "kind": null}\n'
    truth.write_bytes(line + b"\n" + line)
    with pytest.raises(TruthError, match=":3: client a is listed twice"):
        read_truth(truth)


def test_cli_evaluate_prints_the_table_and_writes_the_report(labelled: Labelled, tmp_path: Path) -> None:
    operator_db = tmp_path / "operator.db"
    env = cli_env(MIA_DATABASE_URL=f"sqlite:///{operator_db}")
    out = tmp_path / "report"
    result = mia(
        "evaluate",
        "--events",
        str(labelled.events),
        "--truth",
        str(labelled.truth),
        "--out",
        str(out),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "augmentation_probing" in result.stdout and "boundary_probing" in result.stdout
    assert "benign clients falsely alerted: 0/6 (0.0%)" in result.stdout
    assert "ROC AUC 1.000" in result.stdout and "TPR 100.0% at FPR 0.1%" in result.stdout
    assert f"report written to {out / 'report.md'}" in result.stderr
    assert (out / "report.md").is_file() and not operator_db.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["evaluate", "--events", "no-such.jsonl", "--truth", "no-such.jsonl"], "no-such.jsonl"),
        (["evaluate", "--events", "{events}", "--truth", "{bad}"], "--truth"),
    ],
)
def test_cli_evaluate_bad_arguments_give_one_line_and_exit_code_2(
    labelled: Labelled, tmp_path: Path, args: list[str], expected: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"[not json\n")
    paths = {"events": labelled.events, "truth": labelled.truth, "bad": bad}
    result = mia(*(arg.format(**paths) for arg in args), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mia-detector: error:") and expected in lines[0]


@pytest.mark.slow
def test_the_smoke_scenario_gets_a_complete_report(tmp_path: Path) -> None:
    from detector.simulate import AttackKind, simulate

    simulated = simulate("smoke", 3, tmp_path / "smoke")
    result = evaluate(
        operator_settings(tmp_path),
        simulated.out / "events.jsonl",
        simulated.out / "truth.jsonl",
        tmp_path / "out",
    )
    assert result.scenario is not None and result.scenario["scenario"] == "smoke"
    assert result.records == simulated.records
    assert {kind.kind for kind in result.kinds} == {kind.value for kind in AttackKind}
    assert (
        result.attackers == simulated.attackers
        and result.benign_clients == simulated.clients - simulated.attackers
    )
    assert result.roc.auc is not None and 0.0 <= result.roc.auc <= 1.0
    assert 3000 < result.span_seconds <= 3600

    report = result.report.read_text()
    for heading in (
        "Scenario **smoke**",
        "## Attacks by kind",
        "## False alerts on benign clients",
        "## Alert kinds raised",
        "## Separation of attackers from benign clients",
        "## What the figures mean",
        "![ROC curve](roc.png)",
    ):
        assert heading in report
    for kind in AttackKind:
        assert f"| {kind.value} | " in report
    summary = orjson.loads((tmp_path / "out" / SUMMARY_FILE).read_bytes())
    assert len(summary["clients"]) == simulated.clients
    assert {"kinds", "populations", "alert_kinds", "roc", "benign_alerted_per_day"} <= set(summary)
    for name in ("roc.png", "scores.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC)
