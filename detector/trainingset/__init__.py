"""The training-set index: which queries are (near-)copies of a model's training records, without holding
them. Built offline by `mia-detector index-training` from a training file (`readers`), saved and loaded as
an archive (`files`); the feature tracker only needs its `lookup` (`detector.features.client.TrainingLookup`).
"""

from detector.trainingset.files import IndexFileError
from detector.trainingset.index import KEY_ENVIRONMENT_VARIABLE, TrainingSetIndex
from detector.trainingset.readers import load_training_rows

__all__ = ["KEY_ENVIRONMENT_VARIABLE", "IndexFileError", "TrainingSetIndex", "load_training_rows"]
