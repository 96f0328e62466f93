"""Idle clients leave memory once their features are stored, and come back from storage with their history."""

from __future__ import annotations

from pathlib import Path

from detector.simulate.sample import START
from tests.pipeline.test_faults import pipeline_on, raw, record, settings_for

HOUR = 3600.0


def test_an_idle_client_leaves_memory_at_a_commit_and_comes_back_with_its_history(tmp_path: Path) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'mia.db'}")
    with pipeline_on(settings) as (pipeline, _):
        tracker = pipeline.detect.tracker
        early = [raw(record(f"a{n}", START + n, "client-a"), n) for n in range(20)]
        pipeline.submit(early)
        pipeline.commit()
        assert len(tracker) == 1  # the stream's event time is client-a's own: not idle

        # Three hours later another client's queries move event time past client-a's session gap.
        later = [raw(record(f"b{n}", START + 3 * HOUR + n, "client-b"), 20 + n) for n in range(5)]
        pipeline.submit(later)
        pipeline.commit()
        assert tracker.get(("credit-risk", "client-a")) is None
        assert tracker.get(("credit-risk", "client-b")) is not None
        assert tracker.released == 1
        assert pipeline.metrics.registry.get_sample_value("mia_detector_clients_released_total") == 1

        back = [raw(record(f"a{n}", START + 3 * HOUR + n, "client-a"), 25 + n) for n in range(20, 23)]
        pipeline.submit(back)
        client = tracker.get(("credit-risk", "client-a"))
        assert client is not None and client.queries == 23  # its 20 stored queries, then 3 more
        assert client.first_seen == START


def test_without_a_store_no_client_is_let_go(tmp_path: Path) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'mia.db'}")
    with pipeline_on(settings) as (pipeline, _):
        pipeline.detect.stored = None  # features in memory only: nothing to come back from
        pipeline.submit([raw(record("a0", START, "client-a"), 0)])
        pipeline.submit([raw(record("b0", START + 3 * HOUR, "client-b"), 1)])
        pipeline.commit()
        assert len(pipeline.detect.tracker) == 2
