"""k-nearest-neighbour search by inner product (= cosine on L2-normalised rows), and the ranks file.

Arrays in, arrays out, faiss's way: ``knn(queries, db, k) -> (scores, ids)``, both ``(Q, k)``,
best first. FAISS runs on the GPU when faiss was built with GPU support and a GPU is
visible, else on the CPU.

`knn_graph(x, k)` is the database × database kNN graph the re-rankers (diffusion,
k-reciprocal, αDBA) and the scale tools share: each row's k nearest *other* rows, searched
in batches (memory O(N·k) besides the index), exact with ``IndexFlatIP`` or approximate with
an ``IndexIVFFlat`` for millions of vectors.

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
    scores, ids = flat_index(db, use_gpu).search(queries, k)
    return scores, ids.astype(np.int64, copy=False)


def flat_index(db: np.ndarray, use_gpu: bool | None = None) -> faiss.Index:
    """An exact inner-product index holding ``db`` (on all GPUs when faiss has them)."""
    db = as_matrix(db, "db")
    index = faiss.IndexFlatIP(db.shape[1])
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(db)
    return index


def _ivf_index(x: np.ndarray, nlist: int, nprobe: int, seed: int) -> faiss.Index:
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(len(x), 64 * nlist)  # faiss warns below 39 points per centroid
    index.train(x[np.sort(rng.choice(len(x), n_train, replace=False))])
    index.add(x)
    index.nprobe = nprobe
    return index


def knn_graph(x: np.ndarray, k: int, *, index: str = "flat", nlist: int | None = None, nprobe: int = 16,
              batch: int = 16384, seed: int = 0, use_gpu: bool | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows of ``x``: ``(scores, ids)``, both ``(N, k)``, best first.

    The row itself is dropped wherever it appears (ties can move it from column 0); rows with
    fewer than k neighbours are padded with id -1 / score -inf. ``index``: ``flat`` (exact) or
    ``ivf`` (IVF-Flat, ``nlist`` cells, default ≈ 4·√N, ``nprobe`` of them searched).
    """
    x = as_matrix(x, "x")
    n = len(x)
    k = int(k)
    if k < 1:
        raise ValueError(f"knn_graph: k must be >= 1, got {k}")
    if index == "flat":
        search_index: faiss.Index = faiss.IndexFlatIP(x.shape[1])
        search_index.add(x)
    elif index == "ivf":
        search_index = _ivf_index(x, int(nlist or max(1, min(n // 39, round(4 * np.sqrt(n))))), nprobe, seed)
    else:
        raise ValueError(f"knn_graph: unknown index {index!r}; expected 'flat' or 'ivf'")
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        search_index = faiss.index_cpu_to_all_gpus(search_index)
    kk = min(k + 1, n)
    scores = np.full((n, k), -np.inf, np.float32)
    ids = np.full((n, k), -1, np.int64)
    starts = range(0, n, batch)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="knn graph", unit="batch")
    for s in starts:
        sc, nb = search_index.search(x[s:s + batch], kk)
        own = nb == np.arange(s, s + len(nb))[:, None]
        # Keep the first k non-self entries of each row: a stable sort moving self / -1 to the end.
        drop = own | (nb < 0)
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]
        sc, nb, drop = (np.take_along_axis(a, order, axis=1) for a in (sc, nb, drop))
        width = nb.shape[1]
        ids[s:s + len(nb), :width] = np.where(drop, -1, nb)
        scores[s:s + len(nb), :width] = np.where(drop, -np.inf, sc)
    return scores, ids


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
