"""Coverage-guided fuzzing of the decoder (atheris, on libFuzzer): bytes in, queries or `InvalidRecord` out.

    .venv/bin/python tests/fuzz/decode_fuzz.py [libFuzzer options] CORPUS_DIR
    .venv/bin/python tests/fuzz/decode_fuzz.py -max_total_time=3600 -dict=tests/fuzz/json.dict var/fuzz

An empty corpus directory is first seeded with the valid records of `detector.schemas.EXAMPLE_RECORDS` and
`detector.simulate.sample` (and a few malformed ones). Any exception other than `InvalidRecord`, a rejection
whose detail is not one printable line, decoded queries that break the invariants of `tests/hostile.py`, or
a record the strict reading (msgspec) takes but the published contract reads otherwise, is a crash:
libFuzzer writes the input to `crash-<sha1>` and exits non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` is a package there

with atheris.instrument_imports(include=["detector"]):
    from detector.domain import InvalidRecord
    from detector.ingest.decode import RecordDecoder
    from tests.hostile import LIMITS, SEEDS, check_queries, check_rejection, check_strict_reading, raw

DECODER = RecordDecoder(LIMITS)


def test_one_input(data: bytes) -> None:
    """Decode `data` as one record; raise (a crash) unless the outcome is one the pipeline can handle."""
    record = raw(data)
    check_strict_reading(data)
    try:
        queries = DECODER.decode(record)
    except InvalidRecord as error:
        check_rejection(error)
        return
    check_queries(queries, record)


def seed(corpus: Path) -> None:
    """Write the seed records into `corpus` when it holds nothing yet."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for index, value in enumerate(SEEDS):
            (corpus / f"seed-{index:03d}.json").write_bytes(value)


def main(argv: list[str]) -> None:
    for argument in argv[1:]:
        if not argument.startswith("-"):
            seed(Path(argument))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
