"""A small, deterministic stream of query-log records: the demo's sample traffic and the benchmarks' load.

It mixes the request shapes the decoder accepts (OIP v2 single rows and batches, KServe v1, text prompts,
label-only and probability requests) and, on request, a sprinkling of malformed records, so that every part
of the ingest path is exercised. It is not the attack simulator: no attack behaviour is modelled here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from detector.domain import rfc3339

START = datetime(2026, 11, 29, 8, 0, tzinfo=UTC).timestamp()


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def oip_record(
    event_id: str,
    timestamp: float,
    client_id: str,
    rows: np.ndarray,
    probabilities: np.ndarray,
    *,
    model: str = "credit-risk",
    want_probabilities: bool = True,
) -> dict[str, Any]:
    """One Open Inference Protocol v2 request/response record for `rows` (shape [B, D])."""
    batch, dim = rows.shape
    labels = probabilities.argmax(axis=1)
    outputs: list[dict[str, Any]] = [
        {"name": "predict", "shape": [batch], "datatype": "INT64", "data": labels.tolist()}
    ]
    if want_probabilities:
        outputs.append(
            {
                "name": "predict_proba",
                "shape": list(probabilities.shape),
                "datatype": "FP32",
                "data": np.round(probabilities, 6).ravel().tolist(),
            }
        )
    return {
        "event_id": event_id,
        "timestamp": rfc3339(timestamp),
        "model": {"name": model, "version": "3"},
        "client": {"id": client_id, "ip": "203.0.113.7", "user_agent": "python-requests/2.32"},
        "request": {
            "inputs": [
                {
                    "name": "features",
                    "shape": [batch, dim],
                    "datatype": "FP32",
                    "data": np.round(rows, 5).ravel().tolist(),
                }
            ],
            "outputs": [{"name": "predict_proba" if want_probabilities else "predict"}],
        },
        "response": {"model_name": model, "model_version": "3", "outputs": outputs},
        "latency_ms": 4.2,
    }


def _kserve_record(
    event_id: str, timestamp: float, client_id: str, rows: np.ndarray, probs: np.ndarray
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "timestamp": timestamp,
        "model": {"name": "credit-risk", "version": "3"},
        "client": {"id": client_id},
        "request": {"instances": np.round(rows, 5).tolist()},
        "response": {"predictions": np.round(probs, 6).tolist()},
    }


def _text_record(event_id: str, timestamp: float, client_id: str, prompt: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "timestamp": rfc3339(timestamp),
        "model": {"name": "support-llm"},
        "client": {"id": client_id, "user_agent": "openai-python/1.40"},
        "request": {
            "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [prompt]}],
            "parameters": {"logprobs": client_id.endswith("7"), "max_tokens": 64},
        },
        "response": {"outputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["..."]}]},
    }


MALFORMED: list[bytes] = [
    b'{"event_id": "bad-json", "timestamp": ',
    b'{"event_id": "bad-schema", "timestamp": "2026-11-29T08:00:00Z", "model": {}, "client": {"id": "x"}}',
    b'{"event_id": "bad-nan", "timestamp": 1764403200, "model": {"name": "m"}, "client": {"id": "x"},'
    b' "request": {"inputs": [{"name": "f", "shape": [1, 2], "datatype": "FP32", "data": [NaN, 1.0]}]}}',
    b'{"event_id": "bad-shape", "timestamp": 1764403200, "model": {"name": "m"}, "client": {"id": "x"},'
    b' "request": {"inputs": [{"name": "f", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}}',
    b'{"event_id": "bad-type", "timestamp": 1764403200, "model": {"name": "m"}, "client": {"id": "x"},'
    b' "request": {"inputs": [{"name": "f", "shape": [1, 1], "datatype": "COMPLEX64", "data": [1.0]}]}}',
]


def sample_records(
    *,
    clients: int = 50,
    events: int = 2_000,
    dim: int = 30,
    seed: int = 7,
    mixed_formats: bool = True,
    malformed_every: int = 0,
    start: float = START,
) -> Iterator[bytes]:
    """Yield `events` records (JSON bytes, no newline) from `clients` clients over a simulated hour.

    With `mixed_formats`, one record in ten is a KServe v1 batch, one in twenty a text prompt and one in ten
    an OIP v2 batch; otherwise every record is a single 30-feature OIP v2 row (the benchmark's load). With
    `malformed_every` = N > 0, every Nth record is malformed (cycling through the dead-letter reasons).
    """
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(dim, 3)).astype(np.float32)
    client_ids = [f"key_{index:04d}" for index in range(clients)]
    span = 3600.0
    for index in range(events):
        if malformed_every and index % malformed_every == malformed_every - 1:
            yield MALFORMED[(index // malformed_every) % len(MALFORMED)]
            continue
        client_id = client_ids[int(rng.integers(clients))]
        timestamp = start + span * index / events
        event_id = f"evt-{seed}-{index:08d}"
        kind = index % 20 if mixed_formats else -1
        batch = int(rng.integers(2, 9)) if kind in (3, 13) else 1
        rows = rng.normal(size=(batch, dim)).astype(np.float32)
        probs = _softmax(rows @ weights)
        if kind in (5, 15):
            record = _kserve_record(event_id, timestamp, client_id, rows, probs)
        elif kind == 9:
            record = _text_record(event_id, timestamp, client_id, f"What is the policy for case {index}?")
        else:
            wants = math.floor(index / 7) % 3 != 0 if mixed_formats else True
            record = oip_record(event_id, timestamp, client_id, rows, probs, want_probabilities=wants)
        yield orjson.dumps(record)


def write_sample(path: Path, **options: Any) -> int:
    """Write `sample_records(**options)` as JSON Lines to `path`; return the number of lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("wb") as out:
        for line in sample_records(**options):
            out.write(line + b"\n")
            count += 1
    return count
