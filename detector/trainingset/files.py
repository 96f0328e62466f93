"""The training-set index on disk: a `numpy.savez` archive of plain arrays, read back without pickle.

It holds the format name and version, the width, the number of rows, the sketch parameters, the per-feature
mean and standard deviation (aggregates only), the hyperplanes and offsets (random, independent of the
data), the sorted digests, and optionally the key. Without the key the digests reveal nothing but their
number. With it, anyone holding the file can test candidate rows for exact or near membership, so
deployments should keep the key out of the file (see `detector.trainingset.index`).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile

FORMAT_NAME = "mia-detector/training-set-index"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class IndexFile:
    """The fields of an index file, each of the type and shape the format fixes; `key` None when the file
    holds none."""

    width: int
    size: int
    tables: int
    min_tables: int
    mean: np.ndarray  # float64 [width]
    std: np.ndarray  # float64 [width]
    planes: np.ndarray  # float32 [width, tables * bits]
    offsets: np.ndarray  # float32 [tables * bits]
    exact: np.ndarray  # uint64, sorted
    bands: np.ndarray  # uint64, sorted
    key: bytes | None


def write_index(path: Path, fields: IndexFile) -> None:
    """Write `fields` to `path` (the key only when it is not None).

    The file is replaced atomically and missing parent directories are created.
    """
    arrays = {
        "format": np.array(FORMAT_NAME),
        "version": np.array(FORMAT_VERSION, dtype=np.int64),
        "width": np.array(fields.width, dtype=np.int64),
        "size": np.array(fields.size, dtype=np.int64),
        "tables": np.array(fields.tables, dtype=np.int64),
        "min_tables": np.array(fields.min_tables, dtype=np.int64),
        "mean": np.asarray(fields.mean, dtype=np.float64),
        "std": np.asarray(fields.std, dtype=np.float64),
        "planes": np.asarray(fields.planes, dtype=np.float32),
        "offsets": np.asarray(fields.offsets, dtype=np.float32),
        "exact": np.asarray(fields.exact, dtype=np.uint64),
        "bands": np.asarray(fields.bands, dtype=np.uint64),
    }
    if fields.key is not None:
        arrays["key"] = np.frombuffer(fields.key, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as handle:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(handle, allow_pickle=False, **arrays)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def read_index(path: Path) -> IndexFile:
    """The fields of the index file at `path`, never unpickled.

    Raises `ValueError` when the file is not an index, has another format version or a field of the wrong
    type or shape; `OSError` when it cannot be read.
    """
    arrays = _read_archive(path)
    if str(arrays.get("format", "")) != FORMAT_NAME:
        raise ValueError(f"{path}: not a training-set index")
    version = _integer(path, arrays, "version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: training-set index format version {version}, expected {FORMAT_VERSION}")
    fields = IndexFile(
        width=_integer(path, arrays, "width"),
        size=_integer(path, arrays, "size"),
        tables=_integer(path, arrays, "tables"),
        min_tables=_integer(path, arrays, "min_tables"),
        mean=_field(path, arrays, "mean", np.float64, 1),
        std=_field(path, arrays, "std", np.float64, 1),
        planes=_field(path, arrays, "planes", np.float32, 2),
        offsets=_field(path, arrays, "offsets", np.float32, 1),
        exact=_field(path, arrays, "exact", np.uint64, 1),
        bands=_field(path, arrays, "bands", np.uint64, 1),
        key=_field(path, arrays, "key", np.uint8, 1).tobytes() if "key" in arrays else None,
    )
    if fields.width != fields.mean.shape[0]:
        raise ValueError(f"{path}: malformed training-set index (width does not match the statistics)")
    return fields


def _read_archive(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the npz archive at `path`, loaded without pickle; `ValueError` if it is not one."""
    # Our own handle: np.load leaks the one it opens when the zip turns out to be broken.
    with path.open("rb") as handle:
        try:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, NpzFile):
                raise ValueError("a single array, not an archive")
            with loaded:
                return {name: loaded[name] for name in loaded.files}
        except (ValueError, EOFError, zipfile.BadZipFile) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ValueError(f"{path}: not a training-set index ({reason})") from exc


def _field(path: Path, arrays: dict[str, np.ndarray], name: str, dtype: type, ndim: int) -> np.ndarray:
    value = arrays.get(name)
    if value is None or value.dtype != np.dtype(dtype) or value.ndim != ndim:
        raise ValueError(f"{path}: malformed training-set index (field {name!r})")
    return value


def _integer(path: Path, arrays: dict[str, np.ndarray], name: str) -> int:
    return int(_field(path, arrays, name, np.int64, 0))
