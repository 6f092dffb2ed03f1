"""The features HDF5 schema: read, write, and the resumable writer extraction uses.

A features file holds

- ``ids``   (N,) UTF-8 strings, unique;
- ``feats`` (N, D) float32 (or float16), L2-normalised rows, row i belongs to ``ids[i]``;
- attributes ``schema`` = "retrieval.features", ``schema_version``, ``complete`` and the
  extraction settings (``checkpoint``, ``architecture``, ``scales``, ``image_size``, ``dim``, ...);
- ``skipped_index`` / ``skipped_reason``: inputs that could not be read (row of the input list).

Files are written under ``<name>.tmp`` and renamed when complete, so a file with the final
name is always whole. `FeatureWriter` commits rows batch by batch and records how many
inputs are done (``cursor``) only after their rows are flushed, so a killed run resumes
with no row lost or repeated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

logger = logging.getLogger(__name__)

SCHEMA = "retrieval.features"
SCHEMA_VERSION = 1
STR_DTYPE = h5py.string_dtype("utf-8")
# attributes that describe a file's own writing, not its contents: not copied into files derived from it
BOOKKEEPING_ATTRS = ("schema", "schema_version", "complete", "cursor", "rows", "n_skipped", "n_inputs", "signature",
                     "dim")


class SchemaError(ValueError):
    """A file that is not (or no longer) in the schema this code reads."""


def tmp_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def file_stamp(path: str | os.PathLike) -> str:
    """``<absolute path>|<size>|<mtime ns>``: what a job derived from a file hashes, so a rewritten
    source makes its resumable outputs start over."""
    path = Path(path)
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def read_strings(dataset: h5py.Dataset) -> list[str]:
    """A UTF-8 string dataset as a list of ``str``."""
    return dataset.asstr()[()].tolist()


def _attr(value: Any) -> Any:
    """HDF5 attributes take numbers, strings and arrays; everything else goes in as JSON."""
    if value is None:
        return "null"
    if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value, dtype=np.float64)
    return json.dumps(value)


def _decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, (np.bool_, np.integer, np.floating)):
            v = v.item()
        elif isinstance(v, bytes):
            v = v.decode()
        if v == "null":
            v = None
        out[k] = v
    return out


def check_schema(f: h5py.File, path: Path, schema: str = SCHEMA, version: int = SCHEMA_VERSION) -> None:
    found, found_version = f.attrs.get("schema"), f.attrs.get("schema_version")
    if isinstance(found, bytes):
        found = found.decode()
    if found != schema:
        raise SchemaError(f"{path}: not a {schema} file (schema attribute is {found!r})")
    if found_version is None or int(found_version) != version:
        raise SchemaError(f"{path}: {schema} schema version {found_version}, this code reads version {version}")


def write_features(path: str | os.PathLike, ids: Sequence[str], feats: np.ndarray,
                   skipped: Sequence[tuple[int, str]] = (), **attrs: Any) -> Path:
    """Write a complete features file in one go (to ``.tmp``, then rename); ``skipped``: (input, reason)."""
    path = Path(path)
    feats = np.asarray(feats)
    if feats.ndim != 2 or len(feats) != len(ids):
        raise ValueError(f"{path}: feats must be (N, D) with N = len(ids) = {len(ids)}, got {feats.shape}")
    if feats.dtype not in (np.float32, np.float16):
        raise TypeError(f"{path}: feats must be float32 or float16, got {feats.dtype}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids are not unique")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=STR_DTYPE)
        f.create_dataset("feats", data=feats)
        f.create_dataset("skipped_index", data=np.asarray([i for i, _ in skipped], dtype=np.int64))
        f.create_dataset("skipped_reason", data=np.asarray([r for _, r in skipped], dtype=object), dtype=STR_DTYPE)
        for k, v in {"dim": feats.shape[1], **attrs}.items():
            f.attrs[k] = _attr(v)
        f.attrs["schema"], f.attrs["schema_version"], f.attrs["complete"] = SCHEMA, SCHEMA_VERSION, True
    os.replace(tmp, path)
    return path


def _open_complete(path: Path) -> h5py.File:
    """A complete features file opened for reading; a missing, foreign or partial file is a one-line error."""
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SchemaError(f"{path}: not a readable HDF5 file ({err})") from None
    try:
        check_schema(f, path)
        if not f.attrs.get("complete", False):
            raise SchemaError(f"{path}: incomplete features file (complete=False)")
    except SchemaError:
        f.close()
        raise
    return f


def read_features(path: str | os.PathLike, dtype: np.dtype | None = np.float32) -> tuple[list[str], np.ndarray, dict]:
    """``(ids, feats, attrs)`` of a complete features file; a wrong schema is a one-line `SchemaError`."""
    path = Path(path)
    with _open_complete(path) as f:
        ids = read_strings(f["ids"])
        feats = f["feats"][()]
        attrs = _decode_attrs(f.attrs)
    if dtype is not None:
        feats = feats.astype(dtype, copy=False)
    return ids, feats, attrs


class FeaturesReader:
    """A complete features file read in pieces: its ids, attributes, blocks of rows, chosen rows.

    Memory is what the caller asks for (one block, the rows it names), so a database larger
    than RAM is searched block by block. Rows come back as float32 whatever the stored dtype
    (float16 files included). Use as a context manager, or call `close`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = _open_complete(self.path)
        self.feats: h5py.Dataset = self.file["feats"]
        self.attrs = _decode_attrs(self.file.attrs)
        self._ids: list[str] | None = None

    def __enter__(self) -> FeaturesReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = read_strings(self.file["ids"])
        return self._ids

    def blocks(self, block_rows: int = 65536, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 rows)`` of consecutive blocks of at most ``block_rows`` rows."""
        stop = len(self) if stop is None else min(stop, len(self))
        for s in range(start, stop, max(1, int(block_rows))):
            yield s, self.feats[s:min(s + block_rows, stop)].astype(np.float32, copy=False)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The float32 rows ``index`` (any order, repeats allowed), in that order."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size == 0:
            return np.zeros((0, self.dim), np.float32)
        if index.min() < 0 or index.max() >= len(self):
            raise IndexError(f"{self.path}: row index out of range 0..{len(self) - 1}")
        unique, inverse = np.unique(index, return_inverse=True)  # h5py reads increasing indices
        return self.feats[unique].astype(np.float32, copy=False)[inverse]


class FeatureWriter:
    """Appends rows to ``<path>.tmp``; `finish` marks it complete and renames it to ``path``.

    ``signature`` identifies the job (input list + settings). A temporary file with the same
    signature is resumed from its ``cursor``; one with another signature is started over.
    """

    def __init__(self, path: str | os.PathLike, n_inputs: int, dim: int, signature: str,
                 dtype: str = "float32", attrs: dict | None = None) -> None:
        self.path, self.tmp = Path(path), tmp_path(path)
        self.n_inputs, self.dim, self.signature = n_inputs, dim, signature
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._open_or_create(np.dtype(dtype), attrs or {})

    def _open_or_create(self, dtype: np.dtype, attrs: dict) -> h5py.File:
        if self.tmp.exists():
            try:
                f = h5py.File(self.tmp, "a")
            except OSError as err:
                logger.warning("%s: unreadable partial file (%s); starting over", self.tmp, err)
            else:
                if f.attrs.get("signature") == self.signature:
                    self._truncate_to_cursor(f)
                    logger.info("%s: resuming at input %d of %d", self.tmp, int(f.attrs["cursor"]), self.n_inputs)
                    return f
                f.close()
                logger.info("%s: partial file is from another job; starting over", self.tmp)
            self.tmp.unlink()
        f = h5py.File(self.tmp, "w")
        chunk = max(1, min(1024, 2**20 // max(1, self.dim * dtype.itemsize)))
        f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(4096,))
        f.create_dataset("feats", shape=(0, self.dim), maxshape=(None, self.dim), dtype=dtype,
                         chunks=(chunk, self.dim))
        f.create_dataset("skipped_index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        f.create_dataset("skipped_reason", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(1024,))
        for k, v in attrs.items():
            f.attrs[k] = _attr(v)
        f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": False, "cursor": 0,
                        "rows": 0, "n_skipped": 0, "n_inputs": self.n_inputs, "dim": self.dim,
                        "signature": self.signature})
        f.flush()
        return f

    @staticmethod
    def _truncate_to_cursor(f: h5py.File) -> None:
        # Rows written after the last committed cursor belong to a batch that was cut short.
        rows, n_skipped = int(f.attrs["rows"]), int(f.attrs["n_skipped"])
        for name, n in (("ids", rows), ("feats", rows), ("skipped_index", n_skipped), ("skipped_reason", n_skipped)):
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)

    @property
    def cursor(self) -> int:
        """Number of inputs already done (written or skipped)."""
        return int(self.file.attrs["cursor"])

    def append(self, cursor: int, ids: Sequence[str], feats: np.ndarray,
               skipped: Sequence[tuple[int, str]] = ()) -> None:
        """Commit one batch: its rows, its skipped inputs, then the new ``cursor``."""
        f = self.file
        rows, n_skipped = int(f.attrs["rows"]), int(f.attrs["n_skipped"])
        if len(ids):
            f["ids"].resize(rows + len(ids), axis=0)
            f["ids"][rows:] = np.asarray(list(ids), dtype=object)
            f["feats"].resize(rows + len(ids), axis=0)
            f["feats"][rows:] = np.asarray(feats, dtype=f["feats"].dtype)
        if len(skipped):
            f["skipped_index"].resize(n_skipped + len(skipped), axis=0)
            f["skipped_index"][n_skipped:] = [i for i, _ in skipped]
            f["skipped_reason"].resize(n_skipped + len(skipped), axis=0)
            f["skipped_reason"][n_skipped:] = np.asarray([r for _, r in skipped], dtype=object)
        f.flush()  # data first, then the counters that make it count
        f.attrs.update({"rows": rows + len(ids), "n_skipped": n_skipped + len(skipped), "cursor": cursor})
        f.flush()

    def skipped(self) -> list[tuple[int, str]]:
        f = self.file
        return list(zip(f["skipped_index"][()].tolist(), read_strings(f["skipped_reason"]), strict=True))

    def finish(self, **attrs: Any) -> Path:
        """Mark complete, close, and rename to the final path."""
        if self.cursor != self.n_inputs:
            raise RuntimeError(f"{self.tmp}: finish() at input {self.cursor} of {self.n_inputs}")
        for k, v in attrs.items():
            self.file.attrs[k] = _attr(v)
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def read_skipped(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``(input index, reason)`` of the inputs a complete features file could not describe."""
    with h5py.File(path, "r") as f:
        if "skipped_index" not in f:
            return []
        return list(zip(f["skipped_index"][()].tolist(), read_strings(f["skipped_reason"]), strict=True))


MERGE_BLOCK = 65536  # rows a merge copies at a time


def merge_features(shards: Sequence[str | os.PathLike], path: str | os.PathLike, offsets: Sequence[int],
                   **attrs: Any) -> Path:
    """Concatenate complete shard files (shard ``s`` described inputs from ``offsets[s]``) into ``path``.

    Ids must be unique across shards (Landmark2019's merge-by-id check); skipped inputs are
    renumbered into the whole input list. Rows are copied ``MERGE_BLOCK`` at a time through a
    `FeatureWriter` whose cursor counts inputs, so memory holds the ids but never the whole
    matrix, and a killed merge resumes. ``attrs`` may set the whole job's ``signature`` and ``n_inputs``.
    """
    heads = []
    ids: list[str] = []
    for shard in shards:
        with _open_complete(Path(shard)) as f:
            shard_ids = read_strings(f["ids"])
            skipped = f["skipped_index"][()] if "skipped_index" in f else np.zeros(0, np.int64)
            heads.append((Path(shard), len(shard_ids), int(f.attrs.get("n_inputs", len(shard_ids) + len(skipped))),
                          skipped, f["feats"].dtype, int(f["feats"].shape[1]), _decode_attrs(f.attrs)))
        ids += shard_ids
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: shards {list(map(str, shards))} share ids; they must be disjoint")
    if len(offsets) != len(heads):
        raise ValueError(f"{path}: {len(heads)} shards but {len(offsets)} offsets")
    base = heads[0][6] if heads else {}
    keep = {k: v for k, v in base.items() if k not in BOOKKEEPING_ATTRS}
    n_inputs = int(attrs.pop("n_inputs", sum(h[2] for h in heads)))
    signature = str(attrs.pop("signature", ""))
    dim = heads[0][5] if heads else int(base.get("dim", 0))
    writer = FeatureWriter(path, n_inputs, dim, signature, dtype=str(heads[0][4]) if heads else "float32",
                           attrs={**keep, "shards": len(shards), **attrs})
    try:
        row0 = 0
        for (shard, n_rows, n_in, skipped, _, _, _), offset in zip(heads, offsets, strict=True):
            shard_ids, row0 = ids[row0:row0 + n_rows], row0 + n_rows
            if offset + n_in <= writer.cursor:
                continue  # merged before a kill
            reasons = read_skipped(shard)
            described = np.setdiff1d(np.arange(n_in), skipped)  # row r of the shard is input described[r]
            done = max(0, writer.cursor - offset)  # inputs of this shard already merged
            first = int(np.searchsorted(described, done))
            with h5py.File(shard, "r") as f:
                for a in range(first, max(n_rows, first + 1), MERGE_BLOCK):
                    b = min(n_rows, a + MERGE_BLOCK)
                    upto = n_in if b == n_rows else int(described[b - 1]) + 1  # inputs covered after this block
                    block_skipped = [(offset + i, r) for i, r in reasons if done <= i < upto]
                    writer.append(offset + upto, shard_ids[a:b], f["feats"][a:b], block_skipped)
                    done = upto
        return writer.finish(shards=len(shards), **attrs)
    finally:
        writer.close()
