"""A detection canary's traffic: valid records of one client on the model named, stamped from the moment
given, and an attack the rules catch well before it ends."""

from __future__ import annotations

from pathlib import Path

from detector.domain import Origin, RawRecord
from detector.ingest.decode import RecordDecoder
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


def test_the_rules_catch_the_attack_in_its_first_half(tmp_path: Path) -> None:
    (tmp_path / "canary.jsonl").write_bytes(b"\n".join(canary_records("mia-canary-x", "mia-canary", START)))
    settings = make_settings(f"sqlite:///{tmp_path / 'mia.db'}")

    replay(settings, [str(tmp_path / "canary.jsonl")])

    with open_store(settings) as store:
        [alert] = store.alerts.list_alerts(kind=CANARY_KIND)
    assert alert.client_id == "mia-canary-x" and alert.detected_after_queries < 264 / 2
