"""The training-set index on disk: a `numpy.savez` archive of plain arrays, read back without pickle.

It holds the format name and version, the width, the number of rows, the sketch parameters, the per-feature
mean and standard deviation (aggregates only), the hyperplanes and offsets (random, independent of the
data), the sorted digests, and optionally the key. Without the key the digests reveal nothing but their
number. With it, anyone holding the file can test candidate rows for exact or near membership, so
deployments should keep the key out of the file (see `detector.trainingset.index`).

Two integrity fields cover every other array (name, type, shape and bytes): `sha256`, checked when the file
is read, finds a damaged, truncated or edited file; `mac`, a BLAKE2b code keyed with the index key, checked
before the index is used, finds an edit by anyone who does not hold the key (when the key is kept out of the
file), and a key that is not the one the index was built with.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile

FORMAT_NAME = "mia-detector/training-set-index"
# 2: with the integrity fields `sha256` and `mac`.
FORMAT_VERSION = 2
INTEGRITY_FIELDS = ("sha256", "mac")
_DIGEST_BYTES = 32


class IndexFileError(ValueError):
    """A training-set index file that cannot be used: unreadable, not an index, of another format version,
    damaged or altered, or not made with the key given. The message is one line naming the file."""


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
    # The SHA-256 of the other arrays, as checked by `read_index`, and the keyed code of that digest (see
    # `integrity_code`); empty in fields about to be written, which `write_index` computes.
    digest: bytes = b""
    mac: bytes = b""


def content_digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The SHA-256 of `arrays` but the integrity fields: each array's name, type, shape and bytes, in name
    order, every part length-prefixed (no two different archives give the same input)."""
    digest = hashlib.sha256(FORMAT_NAME.encode() + b"\0")
    for name in sorted(arrays):
        if name in INTEGRITY_FIELDS:
            continue
        array = np.ascontiguousarray(arrays[name])
        header = f"{name}\0{array.dtype.str}\0{array.shape}".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(array.nbytes.to_bytes(8, "little"))
        digest.update(array.data)  # no copy of arrays that may be hundreds of megabytes
    return digest.digest()


def integrity_code(digest: bytes, key: bytes) -> bytes:
    """The keyed code of an index's content `digest` under the index `key` (BLAKE2b-256, its own
    personalisation: not a digest the index's look-ups make with the same key)."""
    return hashlib.blake2b(digest, key=key, digest_size=_DIGEST_BYTES, person=b"mia-index-mac").digest()


def matches(fields: IndexFile, key: bytes) -> bool:
    """Whether `fields` (as `read_index` returns them) carry the integrity code of `key`; constant time."""
    return hmac.compare_digest(integrity_code(fields.digest, key), fields.mac)


def write_index(path: Path, fields: IndexFile, key: bytes) -> None:
    """Write `fields` to `path` (the key itself only when `fields.key` is not None), with their SHA-256 and
    its integrity code under `key`, the index key.

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
    digest = content_digest(arrays)
    arrays["sha256"] = np.frombuffer(digest, dtype=np.uint8)
    arrays["mac"] = np.frombuffer(integrity_code(digest, key), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as handle:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(handle, allow_pickle=False, **arrays)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def read_index(path: Path) -> IndexFile:
    """The fields of the index file at `path`, never unpickled, once their SHA-256 matches (the keyed code
    is the caller's to check, with the key it uses: `matches`).

    Raises `IndexFileError` when the file cannot be read, is not an index, has another format version, is
    damaged or altered (its SHA-256 differs), or has a field of the wrong type or shape.
    """
    arrays = _read_archive(path)
    if str(arrays.get("format", "")) != FORMAT_NAME:
        raise IndexFileError(f"{path}: not a training-set index")
    version = _integer(path, arrays, "version")
    if version != FORMAT_VERSION:
        raise IndexFileError(
            f"{path}: training-set index format version {version}, expected {FORMAT_VERSION} (build it again "
            "with mia-detector index-training)"
        )
    digest = _field(path, arrays, "sha256", np.uint8, 1).tobytes()
    mac = _field(path, arrays, "mac", np.uint8, 1).tobytes()
    if not hmac.compare_digest(digest, content_digest(arrays)):
        raise IndexFileError(f"{path}: training-set index damaged or altered (its SHA-256 does not match)")
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
        digest=digest,
        mac=mac,
    )
    if fields.width != fields.mean.shape[0]:
        raise IndexFileError(f"{path}: malformed training-set index (width does not match the statistics)")
    return fields


def _read_archive(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the npz archive at `path`, loaded without pickle; `ValueError` if it is not one."""
    # Our own handle: np.load leaks the one it opens when the zip turns out to be broken.
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise IndexFileError(f"cannot read training-set index {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            # allow_pickle=False: an object array (a pickle) in the archive is refused, never unpickled.
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, NpzFile):
                raise ValueError("a single array, not an archive")
            with loaded:
                return {name: loaded[name] for name in loaded.files}
        except Exception as exc:  # zipfile and numpy raise many kinds of error on damaged archives
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise IndexFileError(f"{path}: not a training-set index ({reason})") from exc


def _field(path: Path, arrays: dict[str, np.ndarray], name: str, dtype: type, ndim: int) -> np.ndarray:
    value = arrays.get(name)
    if value is None or value.dtype != np.dtype(dtype) or value.ndim != ndim:
        raise IndexFileError(f"{path}: malformed training-set index (field {name!r})")
    return value


def _integer(path: Path, arrays: dict[str, np.ndarray], name: str) -> int:
    return int(_field(path, arrays, name, np.int64, 0))
