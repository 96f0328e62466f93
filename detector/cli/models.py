"""Commands that make and measure models: `simulate`, `train`, `index-training` and `evaluate`."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click

from detector.cli.context import settings_of
from detector.cli.evaluation import print_evaluation
from detector.cli.output import progress, stderr
from detector.text import terminal_text

if TYPE_CHECKING:
    from detector.settings import Settings

# The simulator's scenarios, named here so that `--help` does not have to import scikit-learn.
SCENARIO_NAMES = ["smoke", "standard", "evasive"]
# Floor crossings `train` lists on the terminal; the suggested allow-list file holds them all.
SHOWN_CROSSINGS = 20


BASELINE_HOURS_OPTION = click.option(
    "--baseline-hours",
    type=click.FloatRange(min=0, min_open=True),
    help="Hours of attack-free traffic of the same clients before the main period (default: as long).",
)


@click.command("simulate")
@click.option(
    "--scenario",
    type=click.Choice(SCENARIO_NAMES),
    default="smoke",
    show_default=True,
    help="smoke: seconds; standard: a simulated day; evasive: a day of hiding attackers.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=1, show_default=True, help="Same seed, same bytes."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory."
)
@BASELINE_HOURS_OPTION
@click.option(
    "--population",
    type=click.IntRange(min=0),
    help="Seed of the clients and their traffic (default: --seed); the served models come from --seed.",
)
def simulate(
    scenario: str, seed: int, out: Path, baseline_hours: float | None, population: int | None
) -> None:
    """Write simulated traffic (benign populations and attacks on real models) with its ground truth."""
    from detector.simulate import simulate as run_simulation

    summary = run_simulation(scenario, seed, out, baseline_hours=baseline_hours, population=population)
    stderr.print(
        f"{summary.scenario} (seed {summary.seed}): {summary.records} records, {summary.queries} queries"
        f" from {summary.clients} clients ({summary.attackers} attacking) in {out}/events.jsonl; baseline "
        f"{summary.baseline_records} records in {out}/baseline.jsonl; truth in {out}/truth.jsonl "
        f"({summary.seconds:.1f} s)"
    )


@click.command("train")
@click.option(
    "--events",
    "events",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Baseline (benign) traffic, JSON Lines; repeatable.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model directory."
)
@click.option(
    "--target-fpr",
    type=click.FloatRange(min=1e-6, max=0.5),
    default=0.001,
    show_default=True,
    help="Share of baseline clients the thresholds may alert on.",
)
@click.pass_context
def train(ctx: click.Context, events: tuple[str, ...], out: Path, target_fpr: float) -> None:
    """Fit the anomaly model and calibrate every rule's threshold on baseline traffic."""
    from detector.service.training import SUGGESTED_ALLOWLIST_FILE
    from detector.service.training import train as train_model

    calibration = train_model(settings_of(ctx), events, target_fpr, out)
    model, at_floor = calibration.model, calibration.at_floor()
    thresholds = ", ".join(
        f"{rule} {value:g}{' (floor)' if rule in at_floor else ''}"
        for rule, value in sorted(model.rule_thresholds.items())
    )
    say = partial(stderr.print, highlight=False, soft_wrap=True)
    say(
        f"model {model.version} from {model.baseline_clients} baseline clients (profiles of "
        f"{len(model.profiles)} kept, allow-listed ones included) written to {out}; "
        f"thresholds in force at FPR {target_fpr:g}: {thresholds}; anomaly {model.forest_threshold:.4f}"
    )
    if calibration.thin_baseline():
        say(
            f"warning: {model.baseline_clients} baseline clients cannot measure a false-alert rate of "
            f"{target_fpr:g} (that needs {math.ceil(1 / target_fpr)}): thresholds are the largest baseline "
            "values raised by a margin; train on more clients, or raise --target-fpr"
        )
    for rule, reaching in sorted(calibration.common_at_floor.items()):
        say(
            f"note: {reaching} of {model.baseline_clients} baseline clients reach {rule}'s floor "
            f"({calibration.floors[rule]:g}): too many to leave out as outliers, so they set its threshold "
            f"({model.rule_thresholds[rule]:g}); allow-list the known jobs among them to bring it down"
        )
    crossings = calibration.crossings
    if not crossings:
        say(f"no baseline client left out of calibration; {out / SUGGESTED_ALLOWLIST_FILE} suggests nothing")
        return
    say(
        f"{len(crossings)} baseline (client, rule) pairs reach the rule's floor: left out of that rule's "
        f"calibration, alerted on live unless allow-listed (review {out / SUGGESTED_ALLOWLIST_FILE}, then "
        "MIA_DETECTION_ALLOWLIST_FILE):"
    )
    for crossing in crossings[:SHOWN_CROSSINGS]:
        say(
            terminal_text(
                f"  {crossing.rule} {crossing.value:g} (floor {crossing.floor:g}) {crossing.model} / "
                f"{crossing.client_id}, events {', '.join(crossing.evidence)}"
            )
        )
    if len(crossings) > SHOWN_CROSSINGS:
        say(f"  and {len(crossings) - SHOWN_CROSSINGS} more in {out / SUGGESTED_ALLOWLIST_FILE}")


@click.command("index-training")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Index file to write (a .npz archive of hashes and sketches, no training rows).",
)
@click.pass_context
def index_training(ctx: click.Context, file: Path, out: Path) -> None:
    """Index a model's training rows (.npy, .csv with a header, or .jsonl) for training-set look-ups.

    With MIA_TRAINING_INDEX_KEY set (hex), the index is keyed with it and the key stays out of the file;
    otherwise a random key is generated and stored in the file.
    """
    from detector.trainingset import KEY_ENVIRONMENT_VARIABLE, TrainingSetIndex, load_training_rows

    key = settings_of(ctx).index_key
    try:
        rows = load_training_rows(file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="FILE") from None
    try:
        index = TrainingSetIndex.build(rows, key=key)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    index.save(out, include_key=key is None)
    where = "stored in the file" if key is None else f"not stored (taken from {KEY_ENVIRONMENT_VARIABLE})"
    stderr.print(
        f"indexed {index.size} rows of width {index.width} into {out}; key {where}",
        highlight=False,
        soft_wrap=True,
    )


@click.command("evaluate")
@click.option(
    "--events",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Query logs to replay, JSON Lines (a simulator's events.jsonl).",
)
@click.option(
    "--truth",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ground truth, one JSON line per client (a simulator's truth.jsonl).",
)
@click.option(
    "--scenario",
    type=click.Choice(SCENARIO_NAMES),
    help="Instead of --events and --truth: simulate this scenario and evaluate both training protocols "
    "(trained on the baseline hours of the same population; trained on another population).",
)
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True, help="With --scenario.")
@BASELINE_HOURS_OPTION
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/evaluation"),
    show_default=True,
    help="Where report.md, roc.png, scores.png, summary.json (and the run's own database) go; with "
    "--scenario, the traffic and one such directory per protocol, beside protocols.md and protocols.json.",
)
@click.pass_context
def evaluate(
    ctx: click.Context,
    events: Path | None,
    truth: Path | None,
    scenario: str | None,
    seed: int,
    baseline_hours: float | None,
    out: Path,
) -> None:
    """Measure detection quality: replay labelled traffic through the detector and score its alerts."""
    settings = settings_of(ctx)
    if scenario is not None:
        if events is not None or truth is not None:
            raise click.UsageError("give either --scenario or --events with --truth, not both")
        _evaluate_protocols(settings, scenario, seed, baseline_hours, out)
        return
    if events is None or truth is None:
        raise click.UsageError("give --events with --truth (or --scenario)")
    if baseline_hours is not None:
        raise click.UsageError("--baseline-hours goes with --scenario")
    from detector.evaluate import TruthError
    from detector.evaluate import evaluate as evaluate_files
    from detector.ingest.jsonl import total_bytes

    with progress("evaluating", total_bytes([str(events)]), unit_bytes=True) as advance:
        try:
            result = evaluate_files(settings, events, truth, out, progress=advance)
        except TruthError as exc:
            raise click.BadParameter(str(exc), param_hint="--truth") from None
    print_evaluation(result)


def _evaluate_protocols(
    settings: Settings, scenario: str, seed: int, baseline_hours: float | None, out: Path
) -> None:
    from detector.protocols import REPORT_FILE, evaluate_protocols

    for result in evaluate_protocols(settings, scenario, seed, out, baseline_hours):
        stderr.print(
            f"protocol {result.name} (trained on {result.baseline}):", highlight=False, soft_wrap=True
        )
        print_evaluation(result.evaluation)
    stderr.print(f"both protocols side by side in {out / REPORT_FILE}", highlight=False, soft_wrap=True)


COMMANDS = [simulate, train, index_training, evaluate]
