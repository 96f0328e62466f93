"""Running the detector: wiring (`wiring`), the consumer loop (`consume`), the daemon (`daemon`), replays
(`replay`), training (`training`) and producing (`produce`), each a module of its own."""

from detector.service.consume import Pressure, Progress, consume
from detector.service.daemon import run_daemon
from detector.service.process import prepare_process
from detector.service.produce import client_key, produce_file
from detector.service.replay import replay
from detector.service.stop import Interrupted, StopFlag
from detector.service.training import decoded_batches, train
from detector.service.wiring import (
    DRAIN_SECONDS,
    build_detection,
    build_pipeline,
    load_scoring_model,
    load_training_indexes,
    persisting,
)

__all__ = [
    "DRAIN_SECONDS",
    "Interrupted",
    "Pressure",
    "Progress",
    "StopFlag",
    "build_detection",
    "build_pipeline",
    "client_key",
    "consume",
    "decoded_batches",
    "load_scoring_model",
    "load_training_indexes",
    "persisting",
    "prepare_process",
    "produce_file",
    "replay",
    "run_daemon",
    "train",
]
