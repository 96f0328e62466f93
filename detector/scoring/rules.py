"""Detection rules as reviewed data (`rules.toml`), loaded and checked into typed `Rule` objects."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from detector.alerts.model import AlertKind, Severity

ATLAS_EXFILTRATION_VIA_INFERENCE_API = "AML.T0024"


@dataclass(frozen=True)
class Rule:
    """One explainable detection rule: which feature it scores, its guards, and what a responder needs."""

    id: str
    kind: AlertKind
    title: str
    severity: Severity
    score: str
    floor: float
    requires: dict[str, float]
    explain: tuple[str, ...]
    known_false_positives: tuple[str, ...]
    triage: str
    references: tuple[str, ...]
    atlas: str

    def applies(self, values: dict[str, float]) -> bool:
        """True when every `requires` minimum holds for the snapshot `values`."""
        return all(values.get(feature, 0.0) >= minimum for feature, minimum in self.requires.items())


def _rule(entry: dict[str, Any]) -> Rule:
    try:
        return Rule(
            id=entry["id"],
            kind=AlertKind(entry["kind"]),
            title=entry["title"],
            severity=Severity(entry["severity"]),
            score=entry["score"],
            floor=float(entry["floor"]),
            requires={str(k): float(v) for k, v in entry.get("requires", {}).items()},
            explain=tuple(entry["explain"]),
            known_false_positives=tuple(entry["known_false_positives"]),
            triage=" ".join(entry["triage"].split()),
            references=tuple(entry.get("references", ())),
            atlas=entry["atlas"],
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"rule {entry.get('id', '?')}: invalid or missing field: {exc}") from None


def load_rules(path: Path | None = None) -> list[Rule]:
    """The rules in `path`, or the packaged `rules.toml`; raises `ValueError` on a malformed rule."""
    text = (
        path.read_text() if path else resources.files("detector.scoring").joinpath("rules.toml").read_text()
    )
    rules = [_rule(entry) for entry in tomllib.loads(text).get("rules", [])]
    ids = [rule.id for rule in rules]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate rule ids in {path or 'rules.toml'}")
    return rules
