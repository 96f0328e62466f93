"""`evaluate --scenario`: one scenario judged under both training protocols, side by side."""

from __future__ import annotations

from pathlib import Path

import orjson

from detector.protocols import (
    OTHER_POPULATION,
    REPORT_FILE,
    SAME_POPULATION,
    SUMMARY_FILE,
    evaluate_protocols,
)
from detector.settings import load_settings
from tests.test_cli import cli_env, mia


def test_both_protocols_judge_the_same_traffic_each_trained_on_its_own_baseline(tmp_path: Path) -> None:
    settings = load_settings(None, database={"url": f"sqlite:///{tmp_path / 'operator.db'}"})

    results = evaluate_protocols(settings, "smoke", 7, tmp_path / "out", baseline_hours=2)

    assert [result.name for result in results] == [SAME_POPULATION, OTHER_POPULATION]
    same, other = results
    assert same.baseline == tmp_path / "out" / "traffic" / "baseline.jsonl"
    assert other.baseline == tmp_path / "out" / "other-population-traffic" / "baseline.jsonl"
    truth = tmp_path / "out" / "traffic" / "truth.jsonl"
    for result in results:
        evaluation = result.evaluation
        assert evaluation.truth == truth  # one judged traffic
        assert (evaluation.attackers, evaluation.benign_clients) == (4, 20)
        assert evaluation.attackers_detected == 4 and evaluation.benign_alerted == 0
        assert (tmp_path / "out" / result.name / "model" / "manifest.json").is_file()
        assert result.accepted_suggestions >= 2  # at least the owner's two re-scoring jobs
    # Trained on different baselines, so on different models.
    assert same.evaluation.model_version is not None
    summary = orjson.loads((tmp_path / "out" / SUMMARY_FILE).read_bytes())
    assert [entry["protocol"] for entry in summary] == [SAME_POPULATION, OTHER_POPULATION]
    assert summary[0]["kinds"]["boundary_probing"]["detected"] == 1
    report = (tmp_path / "out" / REPORT_FILE).read_text()
    assert f"| {OTHER_POPULATION} | 4/4 (100.0%) | 0/20 (0.0%) |" in report
    assert f"| {SAME_POPULATION} | nightly_rescore | 2 | 0 |" in report
    assert not (tmp_path / "operator.db").exists()


def test_the_command_runs_both_protocols_and_refuses_a_mix_of_modes(tmp_path: Path) -> None:
    env = cli_env(MIA_DATABASE_URL=f"sqlite:///{tmp_path / 'operator.db'}")
    out = tmp_path / "out"
    result = mia(
        "evaluate", "--scenario", "smoke", "--seed", "3", "--baseline-hours", "1", "--out", str(out), env=env
    )
    assert result.returncode == 0, result.stderr
    assert "protocol same-population" in result.stderr and "protocol other-population" in result.stderr
    assert (out / REPORT_FILE).is_file()

    for args, message in [
        (["--scenario", "smoke", "--events", str(out / "traffic" / "events.jsonl")], "not both"),
        (["--events", str(out / "traffic" / "events.jsonl")], "give --events with --truth"),
        (
            [
                "--events",
                str(out / "traffic" / "events.jsonl"),
                "--truth",
                str(out / "traffic" / "truth.jsonl"),
                "--baseline-hours",
                "2",
            ],
            "--baseline-hours goes with --scenario",
        ),
    ]:
        refused = mia("evaluate", *args, env=env)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
