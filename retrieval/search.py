"""k-nearest-neighbour search by inner product (= cosine on L2-normalised rows), and the ranks file.

Arrays in, arrays out, faiss's way: ``knn(queries, db, k) -> (scores, ids)``, both ``(Q, k)``,
best first. FAISS runs on the GPU when faiss was built with GPU support and a GPU is
visible, else on the CPU.

The ranks file (HDF5): ``query_ids`` (Q,), ``db_ids`` (N,) strings, ``ranks`` (Q, k) int64
indices into ``db_ids`` (-1 where fewer than k results), ``scores`` (Q, k) float32,
attributes ``schema`` = "retrieval.ranks", ``schema_version``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import h5py
import numpy as np

from retrieval.features import STR_DTYPE, check_schema, read_strings, tmp_path

logger = logging.getLogger(__name__)

RANKS_SCHEMA = "retrieval.ranks"
RANKS_SCHEMA_VERSION = 1


def as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Check an ``(N, D)`` float array and return it as contiguous float32."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise TypeError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, expected {dim}")
    return np.ascontiguousarray(x, dtype=np.float32)


def gpu_available() -> bool:
    """True when this faiss has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def knn(queries: np.ndarray, db: np.ndarray, k: int, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k``: ``(scores, ids)``, each ``(Q, k)``; k is capped at ``len(db)``."""
    db = as_matrix(db, "db")
    queries = as_matrix(queries, "queries", db.shape[1])
    k = min(int(k), len(db))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    index = faiss.IndexFlatIP(db.shape[1])
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(db)
    scores, ids = index.search(queries, k)
    return scores, ids.astype(np.int64, copy=False)


def knn_numpy(queries: np.ndarray, db: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The same search with a matrix product and ``argpartition`` (the baseline FAISS is benchmarked against)."""
    db = as_matrix(db, "db")
    queries = as_matrix(queries, "queries", db.shape[1])
    k = min(int(k), len(db))
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), block):
        sim = queries[s:s + block] @ db.T
        if k < len(db):
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(len(db)), sim.shape)
        top = np.take_along_axis(sim, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        ids[s:s + block] = np.take_along_axis(part, order, axis=1)
        scores[s:s + block] = np.take_along_axis(top, order, axis=1)
    return scores, ids


def write_ranks(path: str | os.PathLike, query_ids: Sequence[str], db_ids: Sequence[str], ranks: np.ndarray,
                scores: np.ndarray, **attrs) -> Path:
    """Write the ranks file (to ``.tmp``, then rename)."""
    path = Path(path)
    ranks, scores = np.asarray(ranks, np.int64), np.asarray(scores, np.float32)
    if ranks.shape != scores.shape or ranks.ndim != 2 or len(ranks) != len(query_ids):
        raise ValueError(f"{path}: ranks {ranks.shape} and scores {scores.shape} must be (Q, k), Q = {len(query_ids)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("query_ids", data=np.asarray(list(query_ids), dtype=object), dtype=STR_DTYPE)
        f.create_dataset("db_ids", data=np.asarray(list(db_ids), dtype=object), dtype=STR_DTYPE)
        f.create_dataset("ranks", data=ranks)
        f.create_dataset("scores", data=scores)
        f.attrs.update({"schema": RANKS_SCHEMA, "schema_version": RANKS_SCHEMA_VERSION, **attrs})
    os.replace(tmp, path)
    return path


def read_ranks(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``(query_ids, db_ids, ranks, scores)`` of a ranks file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranks file not found: {path}")
    with h5py.File(path, "r") as f:
        check_schema(f, path, RANKS_SCHEMA, RANKS_SCHEMA_VERSION)
        return read_strings(f["query_ids"]), read_strings(f["db_ids"]), f["ranks"][()], f["scores"][()]
