"""The decoder under coverage-guided fuzzing (tests/fuzz/decode_fuzz.py) for a bounded time: any exception
other than `InvalidRecord`, queries breaking their invariants, or a strict reading (msgspec) that differs
from the contract's, fails the test with the input at fault."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# A minute in CI; MIA_FUZZ_SECONDS=3600 for a long local run.
SECONDS = int(os.environ.get("MIA_FUZZ_SECONDS", "60"))


@pytest.mark.slow
def test_the_decoder_survives_coverage_guided_fuzzing(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (a dev dependency) is not installed")
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    command = [
        sys.executable,
        str(HERE / "decode_fuzz.py"),
        f"-max_total_time={SECONDS}",
        "-timeout=10",  # one input decoding for longer is a failure too
        "-rss_limit_mb=2048",
        "-max_len=65536",
        f"-dict={HERE / 'json.dict'}",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 300, check=False)
    crashes = {path.name: path.read_bytes()[:2000] for path in artifacts.iterdir()}
    assert result.returncode == 0, (result.stderr[-6000:], crashes)
    assert not crashes
    done = re.search(r"Done (\d+) runs in (\d+) second", result.stderr)
    assert done is not None, result.stderr[-2000:]
    runs, seconds = int(done[1]), int(done[2])
    assert runs > 10_000, runs
    inputs = len(list(corpus.iterdir()))
    print(f"\nfuzzed the decoder: {runs} executions in {seconds} s, corpus of {inputs} inputs")
