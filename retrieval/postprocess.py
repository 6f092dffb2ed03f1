"""Post-processing of descriptors: PCA-whitening, ensembles of several nets, float16 storage.

- **PCA-whitening** (Jégou & Chum, ECCV 2012): learned on a separate set X (rows x, mean μ,
  covariance Σ = U Λ Uᵀ, eigenvalues descending), applied as x̂ = P(x − μ) / ‖P(x − μ)‖ with
  P = Λ_d^{−s/2} U_dᵀ: the top ``dim`` components (dimensionality reduction) and the power
  shrinkage s of the GLDv2 / Landmark2019 code (``pcawhitenlearn_shrinkage``): s = 1 is full
  whitening, s = 0 a plain PCA rotation, values between damp the small components less.
  Σ is accumulated block by block in float64, so the learning set may be larger than RAM.
  A `Whitening` is saved as a small HDF5 file (``schema="retrieval.whitening"``: ``mean``,
  ``projection``, ``eigenvalues``, ``shrinkage``, ``source``) and applied by name at
  evaluation (param ``whiten``) or written into a new features file (`whiten_features`,
  whose ``whitening_file`` attribute names it).
- **Ensembles** (`ensemble_features`): several features files of the same ids combined row by
  row, ``concat`` (Landmark2019's 6-model concatenation with weights [0.5, 1, 1, 0.5, 1, 1]:
  each member's block scaled by its weight, the row L2-normalised) or ``mean`` (GUIE's
  224 + 280 px pair: the weighted average, L2-normalised). Files whose id sets differ are
  refused with one line naming both; the same ids in another order are aligned by id.
- **float16** (`convert_features`): half the disk and page cache; rows are read back as float32.

Every output goes through `FeatureWriter` (``<name>.tmp``, committed block by block, renamed
when complete), so a killed run resumes and memory stays at one block per input.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from retrieval.features import (
    BOOKKEEPING_ATTRS,
    FeaturesReader,
    FeatureWriter,
    check_schema,
    file_stamp,
    tmp_path,
)

logger = logging.getLogger(__name__)

WHITEN_SCHEMA = "retrieval.whitening"
WHITEN_SCHEMA_VERSION = 1
ENSEMBLE_MODES = ("concat", "mean")
FEATURE_DTYPES = ("float32", "float16")


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- PCA-whitening

@dataclass
class Whitening:
    """x ↦ normalise((x − mean) · projectionᵀ); ``projection`` is ``(dim_out, dim_in)``."""

    mean: np.ndarray
    projection: np.ndarray
    eigenvalues: np.ndarray
    shrinkage: float = 1.0
    source: str = ""
    n_rows: int = 0
    name: str = ""

    @property
    def dim_in(self) -> int:
        return int(self.projection.shape[1])

    @property
    def dim_out(self) -> int:
        return int(self.projection.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"whitening {self.name or ''}: expects (N, {self.dim_in}) rows, got {x.shape}")
        p = self.projection.astype(np.float32, copy=False)
        return _normalise((x - self.mean.astype(np.float32)) @ p.T).astype(np.float32, copy=False)


def _row_blocks(features: str | os.PathLike | np.ndarray, block_rows: int) -> Iterator[np.ndarray]:
    if isinstance(features, np.ndarray):
        for s in range(0, len(features), block_rows):
            yield np.asarray(features[s:s + block_rows], dtype=np.float64)
        return
    with FeaturesReader(features) as reader:
        for _, block in reader.blocks(block_rows):
            yield block.astype(np.float64)


def learn_whitening(features: str | os.PathLike | np.ndarray, dim: int | None = None, shrinkage: float = 1.0, *,
                    block_rows: int = 65536, eps: float = 1e-9, name: str = "") -> Whitening:
    """PCA-whitening learned on the rows of a features file (or array): mean, covariance, eigenvectors.

    ``dim``: components kept (default all; at most rows − 1, the rank of the covariance);
    ``shrinkage`` s in [0, 1]: P = Λ^{−s/2} Uᵀ. Eigenvalues below ``eps`` · the largest are
    floored there, so near-empty directions are not blown up.
    """
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"whitening: shrinkage must be in [0, 1], got {shrinkage}")
    n, total, outer = 0, None, None
    for block in _row_blocks(features, block_rows):
        if total is None:
            total, outer = np.zeros(block.shape[1]), np.zeros((block.shape[1], block.shape[1]))
        n += len(block)
        total += block.sum(0)
        outer += block.T @ block
    source = "array" if isinstance(features, np.ndarray) else str(features)
    if total is None or n < 2:
        raise ValueError(f"whitening: {source} has {n} rows; learning needs at least 2")
    d_in = len(total)
    dim = int(dim or min(d_in, n - 1))
    if not 1 <= dim <= min(d_in, n - 1):
        raise ValueError(f"whitening: dim {dim} must be in 1..{min(d_in, n - 1)} ({source}: {n} rows of "
                         f"dimension {d_in}; a covariance of n rows has rank n - 1)")
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    floor = max(float(eigenvalues[0]), 1e-30) * eps
    scale = np.maximum(eigenvalues[:dim], floor) ** (-float(shrinkage) / 2)
    projection = scale[:, None] * eigenvectors[:, :dim].T
    return Whitening(mean, projection, eigenvalues, float(shrinkage), source, n, name)


def save_whitening(path: str | os.PathLike, whitening: Whitening) -> Path:
    """Write a whitening file (to ``.tmp``, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("mean", data=whitening.mean)
        f.create_dataset("projection", data=whitening.projection)
        f.create_dataset("eigenvalues", data=whitening.eigenvalues)
        f.attrs.update({"schema": WHITEN_SCHEMA, "schema_version": WHITEN_SCHEMA_VERSION,
                        "shrinkage": whitening.shrinkage, "source": whitening.source, "n_rows": whitening.n_rows,
                        "dim_in": whitening.dim_in, "dim": whitening.dim_out, "name": whitening.name or path.stem})
    os.replace(tmp, path)
    return path


def load_whitening(path: str | os.PathLike) -> Whitening:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"whitening file not found: {path}")
    with h5py.File(path, "r") as f:
        check_schema(f, path, WHITEN_SCHEMA, WHITEN_SCHEMA_VERSION)
        a = f.attrs
        return Whitening(f["mean"][()], f["projection"][()], f["eigenvalues"][()], float(a["shrinkage"]),
                         str(a["source"]), int(a["n_rows"]), str(a.get("name", path.stem)))


# ---------------------------------------------------------------- writing derived features files

def _signature(sources: Sequence[Path], settings: Any) -> str:
    parts = [file_stamp(p) for p in sources]
    return hashlib.sha1(repr((parts, settings)).encode()).hexdigest()


def _write_rows(path: Path, ids: Sequence[str], dim: int, blocks: Callable[[int], Iterator[np.ndarray]],
                signature: str, dtype: str, attrs: dict[str, Any]) -> Path:
    """Write ``blocks(start)`` (rows from ``start`` on) as a features file, resuming a killed run."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"{path}: dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
    writer = FeatureWriter(path, len(ids), dim, signature, dtype, attrs)
    try:
        start = writer.cursor
        for block in blocks(start):
            writer.append(start + len(block), ids[start:start + len(block)], block)
            start += len(block)
        return writer.finish()
    finally:
        writer.close()


def _kept_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in BOOKKEEPING_ATTRS}


def whiten_features(features: str | os.PathLike, whitening: Whitening | str | os.PathLike,
                    path: str | os.PathLike, *, dtype: str = "float32", block_rows: int = 65536) -> Path:
    """A features file of whitened rows; its attributes name the whitening (``whitening``, ``whitening_file``)."""
    whitening_file = None if isinstance(whitening, Whitening) else str(whitening)
    w = whitening if isinstance(whitening, Whitening) else load_whitening(whitening)
    features = Path(features)
    with FeaturesReader(features) as reader:
        if reader.dim != w.dim_in:
            raise ValueError(f"{features}: {reader.dim}-d rows but the whitening {w.name} takes {w.dim_in}-d")
        ids = reader.ids
        attrs = {**_kept_attrs(reader.attrs), "whitening": w.name, "whitening_file": whitening_file,
                 "source_features": str(features)}

        def blocks(start: int) -> Iterator[np.ndarray]:
            for _, block in reader.blocks(block_rows, start=start):
                yield w(block)

        sources = [features] + ([Path(whitening_file)] if whitening_file else [])
        signature = _signature(sources, ("whiten", w.name, w.dim_out, float(w.projection.sum()), dtype))
        return _write_rows(Path(path), ids, w.dim_out, blocks, signature, dtype, attrs)


def convert_features(features: str | os.PathLike, path: str | os.PathLike, dtype: str = "float16",
                     block_rows: int = 65536) -> Path:
    """A copy of a features file with rows stored as ``dtype`` (float16 halves it; read back as float32)."""
    features = Path(features)
    with FeaturesReader(features) as reader:
        def blocks(start: int) -> Iterator[np.ndarray]:
            for _, block in reader.blocks(block_rows, start=start):
                yield block

        return _write_rows(Path(path), reader.ids, reader.dim, blocks, _signature([features], ("convert", dtype)),
                           dtype, {**_kept_attrs(reader.attrs), "source_features": str(features)})


# ---------------------------------------------------------------- ensembles

def _alignment(first: FeaturesReader, other: FeaturesReader) -> np.ndarray | None:
    """Rows of ``other`` in ``first``'s id order (None when already in it); differing id sets are an error."""
    if first.ids == other.ids:
        return None
    row_of = {image_id: r for r, image_id in enumerate(other.ids)}
    only_first = [i for i in first.ids if i not in row_of]
    only_other = set(other.ids) - set(first.ids)
    if only_first or only_other or len(first.ids) != len(other.ids):
        example = (only_first or sorted(only_other) or ["(repeated ids)"])[0]
        raise ValueError(f"{first.path} and {other.path}: id lists differ ({len(only_first)} ids only in the first, "
                         f"{len(only_other)} only in the second, e.g. {example!r}); an ensemble needs the same images")
    logger.info("%s: same ids as %s in another order; aligned by id", other.path, first.path)
    return np.asarray([row_of[i] for i in first.ids], dtype=np.int64)


def ensemble_features(members: Sequence[str | os.PathLike], path: str | os.PathLike,
                      weights: Sequence[float] | None = None, mode: str = "concat", *, dtype: str = "float32",
                      block_rows: int = 65536) -> Path:
    """Combine the features files ``members`` (same ids) row by row into ``path``.

    ``concat``: row = normalise([w₁x₁, …, w_mx_m]) (dimension Σ D_i); ``mean``: row =
    normalise(Σ w_i x_i) (all D_i equal). Each member row is L2-normalised first; weights
    default to 1. The output's ``ensemble`` attribute lists the members and their weights.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble mode must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}")
    paths = [Path(m) for m in members]
    if not paths:
        raise ValueError("an ensemble needs at least one features file")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"ensemble: {len(weights)} weights for {len(paths)} features files")
    if not any(weights):
        raise ValueError("ensemble: every weight is 0")
    readers = [FeaturesReader(p) for p in paths]
    try:
        orders = [None] + [_alignment(readers[0], r) for r in readers[1:]]
        dims = [r.dim for r in readers]
        if mode == "mean" and len(set(dims)) > 1:
            listed = ", ".join(f"{p}: {d}" for p, d in zip(paths, dims, strict=True))
            raise ValueError(f"ensemble mean: dimensions differ ({listed}); use concat")
        n, dim = len(readers[0]), (sum(dims) if mode == "concat" else dims[0])

        def blocks(start: int) -> Iterator[np.ndarray]:
            for s in range(start, n, block_rows):
                e = min(s + block_rows, n)
                parts = [w * _normalise(r.feats[s:e].astype(np.float32) if order is None else r.rows(order[s:e]))
                         for r, order, w in zip(readers, orders, weights, strict=True)]
                yield _normalise(np.concatenate(parts, 1) if mode == "concat" else np.sum(parts, 0))

        record = [{"features": str(p), "weight": w, "checkpoint": r.attrs.get("checkpoint"), "dim": r.dim}
                  for p, w, r in zip(paths, weights, readers, strict=True)]
        attrs = {"ensemble": record, "ensemble_mode": mode}
        return _write_rows(Path(path), readers[0].ids, dim, blocks, _signature(paths, (mode, weights, dtype)), dtype,
                           attrs)
    finally:
        for r in readers:
            r.close()


__all__ = ["ENSEMBLE_MODES", "Whitening", "convert_features", "ensemble_features", "learn_whitening",
           "load_whitening", "save_whitening", "whiten_features"]
