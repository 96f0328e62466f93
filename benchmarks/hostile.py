"""What the costliest hostile records cost the decoder, beside a valid record of the same size (the baseline).

Each record is just under `MIA_INGEST_MAX_RECORD_BYTES` (8 MiB by default): a valid batch of 4,096 rows of
FP32 values (the baseline), a valid single prompt, and records built to be expensive: `[]` or `{}` as tensor
data, invalid shape dimensions, invalid tensors, KServe instances, brackets, each repeated up to the limit.
CPU time is the best of `--repeat` runs without tracing; peak memory is measured by tracemalloc (Python
objects and numpy arrays; the parser's own buffers are not seen) in a separate run.
Run: `python benchmarks/hostile.py [--repeat N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
import tracemalloc
from collections.abc import Callable

from detector.domain import InvalidRecord, Origin, RawRecord
from detector.ingest import RecordDecoder
from detector.schemas import EXAMPLE_RECORDS
from detector.settings import IngestSettings

LIMITS = IngestSettings()
SIZE = LIMITS.max_record_bytes - 4096  # room for the envelope
RECEIVED_AT = 1_795_942_800.0  # an hour after the example record's timestamp


def envelope(request: dict[str, object], marker: str, filler: str) -> bytes:
    """The OIP example record with `request`, the JSON string `"marker"` in it replaced by `filler`."""
    record = dict(EXAMPLE_RECORDS[0])
    record["request"] = request
    record.pop("response")
    return json.dumps(record).replace(f'"{marker}"', filler).encode()


def repeated(unit: str) -> str:
    return ",".join([unit] * (SIZE // (len(unit) + 1)))


def tensor(shape: list[object], data: list[object], datatype: str = "FP32") -> dict[str, object]:
    return {"name": "x", "shape": shape, "datatype": datatype, "data": data}


def records() -> dict[str, bytes]:
    rows = 4096
    width = SIZE // (rows * 9)  # each value is 9 bytes: the batch fills the limit
    values = ",".join(f"{(index % 997) / 997:.6f}" for index in range(rows * width))
    return {
        "valid: 4,096 rows of FP32 (baseline)": envelope(
            {"inputs": [tensor([rows, width], ["D"])]}, "D", values
        ),
        "valid: one prompt": envelope(
            {"inputs": [tensor([1], ["P"], "BYTES")]}, "P", json.dumps("a b c " * (SIZE // 6))
        ),
        "data: []": envelope({"inputs": [tensor([1, 1], ["D"])]}, "D", repeated("[]")),
        "data: {}": envelope({"inputs": [tensor([1, 1], ["D"])]}, "D", repeated("{}")),
        "shape: invalid dimensions": envelope({"inputs": [tensor(["S"], [1.0])]}, "S", repeated('"a"')),
        "inputs: invalid tensors": envelope({"inputs": ["T"]}, "T", repeated('{"data":1}')),
        "instances: {}": envelope({"instances": ["I"]}, "I", repeated("{}")),
        "brackets: [": b"[" * SIZE,
    }


def measure(decode: Callable[[], object], repeat: int) -> tuple[float, float, str]:
    """Best CPU seconds of `repeat` runs, peak MiB traced in one more, and what came out."""
    outcome = ""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        started = time.process_time()
        try:
            outcome = f"{len(decode())} queries"  # type: ignore[arg-type]
        except InvalidRecord as error:
            outcome = error.reason.value
        best = min(best, time.process_time() - started)
    gc.collect()
    tracemalloc.start()
    with contextlib.suppress(InvalidRecord):
        decode()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak / 2**20, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    decoder = RecordDecoder(LIMITS)
    baseline = None
    print(f"{'record':42} {'bytes':>9} {'CPU ms':>8} {'peak MiB':>9} {'/ baseline':>10}  outcome")
    for name, value in records().items():
        record = RawRecord(value, None, Origin("file", "bench", 0, 1), RECEIVED_AT)
        seconds, peak, outcome = measure(lambda record=record: decoder.decode(record), args.repeat)  # type: ignore[misc]
        baseline = baseline or seconds
        ratio = seconds / baseline
        print(f"{name:42} {len(value):>9,} {seconds * 1000:>8.1f} {peak:>9.1f} {ratio:>10.2f}  {outcome}")


if __name__ == "__main__":
    main()
