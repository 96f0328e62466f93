"""How `evaluate` and `demo` print an evaluation: a module of its own, so that listing commands, which share
`output`, never load the evaluation (and scikit-learn and matplotlib with it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from detector.cli.output import stderr, stdout
from detector.text import terminal_text

if TYPE_CHECKING:
    from detector.evaluate import Evaluation


def print_evaluation(result: Evaluation) -> None:
    """The evaluation's per-kind table, false alerts, ROC figures and where the report is."""
    from rich.table import Table

    from detector.evaluate import format_duration, format_share

    table = Table(title="detection by attack kind")
    for column in ("attack kind", "attackers", "detected", "as its kind", "median queries", "median time"):
        table.add_column(column, justify="left" if column == "attack kind" else "right")
    for kind in result.kinds:
        table.add_row(
            terminal_text(kind.kind),
            str(kind.attackers),
            format_share(kind.detected_share),
            format_share(kind.matched_share),
            "n/a" if kind.queries_median is None else f"{kind.queries_median:g}",
            format_duration(kind.seconds_median),
        )
    stdout.print(table)
    roc = result.roc
    tpr = ", ".join(f"TPR {format_share(rate)} at FPR {float(x):.1%}" for x, rate in roc.tpr_at_fpr.items())
    stdout.print(
        f"benign clients falsely alerted: {result.benign_alerted}/{result.benign_clients} "
        f"({format_share(result.benign_alerted_share)}), {result.benign_exposed} more with exposure only; "
        f"clients ranked by their suspicion score at the end (not by their alerts; see the report): "
        f"ROC AUC {'n/a' if roc.auc is None else f'{roc.auc:.3f}'}, {tpr}",
        highlight=False,
    )
    stderr.print(f"report written to {result.report}", highlight=False, soft_wrap=True)
