"""A detection canary's traffic: valid records of one client on the model named, stamped from the moment
given, and an attack the rules catch well before it ends."""

from __future__ import annotations

from pathlib import Path

from detector.domain import CANARY_MODEL, Alert, Origin, RawRecord
from detector.ingest.decode import RecordDecoder
from detector.scoring.rules import load_rules
from detector.service import replay
from detector.settings import IngestSettings
from detector.simulate.canary import CANARY_KIND, canary_records
from detector.storage import open_store
from tests.support import make_settings

START = 1_700_000_000.0


def test_the_records_are_one_clients_queries_on_the_model_named_from_the_moment_given() -> None:
    decoder = RecordDecoder(IngestSettings())
    records = canary_records("mia-canary-x", "mia-canary", START, seed=1)

    queries = [
        query
        for line, value in enumerate(records, 1)
        for query in decoder.decode(RawRecord(value, None, Origin("file", "-", 0, line), START))
    ]

    assert len(queries) == len(records) == 264
    assert {(query.model, query.client_id) for query in queries} == {("mia-canary", "mia-canary-x")}
    times = [query.timestamp for query in queries]
    assert times[0] == START and times == sorted(times) and times[-1] - START < 3.0
    assert len({query.event_id for query in queries}) == len(queries)
    assert canary_records("mia-canary-x", "mia-canary", START, seed=1) == records


def replayed_canary_alert(directory: Path, seed: int | None = None) -> Alert:
    """The one alert of the canary's kind that replaying a canary (of draw `seed`) into a fresh database in
    `directory` raises."""
    path = directory / "canary.jsonl"
    path.write_bytes(b"\n".join(canary_records("mia-canary-x", CANARY_MODEL, START, seed=seed)))
    settings = make_settings(f"sqlite:///{directory / 'mia.db'}")
    replay(settings, [str(path)])
    with open_store(settings) as store:
        [alert] = store.alerts.list_alerts(kind=CANARY_KIND)
    return alert


def test_the_rules_catch_the_attack_in_its_first_half(tmp_path: Path) -> None:
    alert = replayed_canary_alert(tmp_path)

    assert alert.client_id == "mia-canary-x" and alert.detected_after_queries < 264 / 2


def test_every_draw_is_caught_at_its_sixth_burst_whatever_its_records(tmp_path: Path) -> None:
    # 24 records, each sent then copied 10 times: a record's burst completes at its third query. The
    # canary's model is scaled by its dataset, not by the draw's own records (which made the page come
    # after 55 to 157 queries over 400 draws), so every draw is paged at MIA-002's floor of bursts.
    (floor,) = [rule.floor for rule in load_rules() if rule.id == "MIA-002"]
    per_record = 264 // 24
    paged_at = []
    for seed in range(8):
        (tmp_path / str(seed)).mkdir()
        paged_at.append(replayed_canary_alert(tmp_path / str(seed), seed).detected_after_queries)
    assert paged_at == [(floor - 1) * per_record + 3] * 8
