"""Detection quality under the two ways a deployment is trained, on one simulated scenario.

- **same population**: trained on the attack-free baseline hours of the very clients it then judges (the
  realistic way: the owner's jobs, batch scorers and every regular key are in the baseline);
- **other population**: trained on the baseline of another population of clients of the same models, then
  judged on the scenario (a detector set up on traffic it will not see again).

Either way the model is trained as an operator would (`train_as_operator`): on the baseline, with the
allow-list `train` suggests accepted as though reviewed. Each protocol's evaluation is a full `evaluate` run
in a directory of its own; `protocols.md` and `protocols.json` set the two side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import orjson

from detector.evaluate import Evaluation, evaluate, format_share
from detector.service import train
from detector.service.training import SUGGESTED_ALLOWLIST_FILE
from detector.settings import Settings
from detector.simulate import simulate
from detector.simulate.simulator import BASELINE, EVENTS, TRUTH
from detector.trainingset import TrainingSetIndex, load_training_rows

log = logging.getLogger(__name__)

TARGET_FPR = 0.001
SAME_POPULATION = "same-population"
OTHER_POPULATION = "other-population"
REPORT_FILE = "protocols.md"
SUMMARY_FILE = "protocols.json"


@dataclass(frozen=True)
class ProtocolResult:
    """One protocol's evaluation, and how many allow-list suggestions its training accepted."""

    name: str
    baseline: Path
    accepted_suggestions: int
    evaluation: Evaluation


def index_training_sets(simulation: Path, out: Path) -> Path:
    """One training-set index per simulated model (`training-<model>.npy` → `<model>.npz`); returns `out`."""
    for rows_file in sorted(simulation.glob("training-*.npy")):
        model = rows_file.stem.removeprefix("training-")
        TrainingSetIndex.build(load_training_rows(rows_file)).save(out / f"{model}.npz")
    return out


def train_as_operator(settings: Settings, baseline: Path, model_dir: Path) -> tuple[Settings, int]:
    """Train on `baseline` into `model_dir`, then accept the allow-list `train` suggested, as an operator
    does once it is reviewed (the owner's re-scoring jobs, batch scorers). Returns `settings` with the model
    and that allow-list loaded, and how many (client, rule) pairs were suggested."""
    calibration = train(settings, [str(baseline)], TARGET_FPR, model_dir)
    suggested = model_dir / SUGGESTED_ALLOWLIST_FILE
    detection = settings.detection.model_validate(
        {**settings.detection.model_dump(), "allowlist_file": suggested}
    )
    log.info(
        "accepting the allow-list train suggested (%s, %d baseline client and rule pairs), as an operator "
        "would once reviewed",
        suggested,
        len(calibration.crossings),
    )
    return settings.model_copy(update={"model_path": model_dir, "detection": detection}), len(
        calibration.crossings
    )


def evaluate_protocols(
    settings: Settings, scenario: str, seed: int, out: Path, baseline_hours: float | None = None
) -> list[ProtocolResult]:
    """Simulate `scenario` with `seed` (and `baseline_hours` of baseline) into `out`, and another population
    of the same models; evaluate the scenario under both protocols (see the module docstring); write
    `REPORT_FILE` and `SUMMARY_FILE` into `out`. Raises `ValueError` for an unknown scenario, a negative
    seed or a baseline that is not positive."""
    traffic = simulate(scenario, seed, out / "traffic", baseline_hours=baseline_hours)
    other = simulate(
        scenario, seed, out / "other-population-traffic", baseline_hours=baseline_hours, population=seed + 1
    )
    indexes = index_training_sets(traffic.out, out / "indexes")
    indexed = settings.model_copy(update={"training_index": indexes})
    results = []
    for name, baseline in (
        (SAME_POPULATION, traffic.out / BASELINE),
        (OTHER_POPULATION, other.out / BASELINE),
    ):
        log.info("protocol %s: training on %s", name, baseline)
        trained, accepted = train_as_operator(indexed, baseline, out / name / "model")
        evaluation = evaluate(trained, traffic.out / EVENTS, traffic.out / TRUTH, out / name)
        results.append(ProtocolResult(name, baseline, accepted, evaluation))
    (out / REPORT_FILE).write_text(_report(scenario, seed, results), encoding="utf-8")
    (out / SUMMARY_FILE).write_bytes(
        orjson.dumps([_summary(result) for result in results], option=orjson.OPT_INDENT_2) + b"\n"
    )
    return results


def _summary(result: ProtocolResult) -> dict[str, object]:
    e = result.evaluation
    return {
        "protocol": result.name,
        "baseline": str(result.baseline),
        "accepted_suggestions": result.accepted_suggestions,
        "attackers": e.attackers,
        "attackers_detected": e.attackers_detected,
        "benign_clients": e.benign_clients,
        "benign_alerted": e.benign_alerted,
        "benign_exposed": e.benign_exposed,
        "kinds": {
            kind.kind: {
                "attackers": kind.attackers,
                "detected": kind.detected,
                "queries_median": kind.queries_median,
            }
            for kind in e.kinds
        },
        "benign_by_population": {
            population.population: {"clients": population.clients, "paged": population.alerted}
            for population in e.populations
        },
        "report": str(e.report),
    }


def _report(scenario: str, seed: int, results: list[ProtocolResult]) -> str:
    lines = [
        f"# Detection quality by training protocol: {scenario}, seed {seed}",
        "",
        "Each protocol trains on a baseline, accepts the allow-list `train` suggests, and judges the same "
        "traffic. Alerts are pages (at `MIA_ALERTS_MIN_SEVERITY` or above, or escalated to it).",
        "",
        "| protocol | attackers caught | benign clients paged | benign with exposure only | suggestions "
        "accepted | report |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        e = result.evaluation
        lines.append(
            f"| {result.name} | {e.attackers_detected}/{e.attackers} "
            f"({format_share(e.attackers_detected_share)}) | {e.benign_alerted}/{e.benign_clients} "
            f"({format_share(e.benign_alerted_share)}) | {e.benign_exposed} | {result.accepted_suggestions} "
            f"| {result.name}/{e.report.name} |"
        )
    lines += [
        "",
        "| protocol | attack kind | caught | median attack queries to `detected_at` |",
        "|---|---|---:|---:|",
    ]
    for result in results:
        for kind in result.evaluation.kinds:
            median = "n/a" if kind.queries_median is None else f"{kind.queries_median:g}"
            lines.append(f"| {result.name} | {kind.kind} | {kind.detected}/{kind.attackers} | {median} |")
    lines += ["", "| protocol | benign behaviour | clients | paged |", "|---|---|---:|---:|"]
    for result in results:
        for population in result.evaluation.populations:
            lines.append(
                f"| {result.name} | {population.population} | {population.clients} | {population.alerted} |"
            )
    return "\n".join(lines) + "\n"
