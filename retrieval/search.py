"""k-nearest-neighbour search by inner product (= cosine on L2-normalised rows), and the ranks file.

Arrays in, arrays out, faiss's way: ``knn(queries, db, k) -> (scores, ids)``, both ``(Q, k)``,
best first. FAISS runs on the GPU when faiss was built with GPU support and a GPU is
visible, else on the CPU.

`knn_blocked` / `knn_file` are the same exact search over a database given block by block
(a features file larger than RAM is read from the HDF5 in blocks); each block's top-k is
merged into FAISS's own result heaps (``faiss.ResultHeap``, as faiss.contrib.exhaustive_search
does), so memory is one block plus the ``(Q, k)`` heaps and the neighbours equal one-shot
`knn`'s.

`knn_graph(x, k)` is the database × database kNN graph the re-rankers (diffusion,
k-reciprocal, αDBA) and the scale tools share: each row's k nearest *other* rows, searched
in batches (memory O(N·k) besides the index), exact with ``IndexFlatIP``, approximate with
an ``IndexIVFFlat`` or any index already holding ``x`` (`retrieval.index`) for millions of
vectors. `build_knn_graph_file` does the same from a features file into the graph file
(HDF5: ``ids``, ``neighbours`` (N, k) int64 rows of ``ids`` (-1 = none), ``similarities``
(N, k) float32, ``schema`` = "retrieval.knn_graph"), batch by batch and resumable.

The ranks file (HDF5): ``query_ids`` (Q,), ``db_ids`` (N,) strings, ``ranks`` (Q, k) int64
indices into ``db_ids`` (-1 where fewer than k results), ``scores`` (Q, k) float32,
attributes ``schema`` = "retrieval.ranks", ``schema_version``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import faiss
import h5py
import numpy as np

from retrieval.features import STR_DTYPE, FeaturesReader, check_schema, file_stamp, read_strings, tmp_path

logger = logging.getLogger(__name__)

RANKS_SCHEMA = "retrieval.ranks"
RANKS_SCHEMA_VERSION = 1
GRAPH_SCHEMA = "retrieval.knn_graph"
GRAPH_SCHEMA_VERSION = 1


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
    index = _empty_flat(db.shape[1], use_gpu)
    index.add(db)
    return index


def _empty_flat(dim: int, use_gpu: bool | None = None) -> faiss.Index:
    index = faiss.IndexFlatIP(dim)
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def knn_blocked(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int, *, use_gpu: bool | None = None,
                transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over a database given as consecutive ``blocks``: ``(scores, ids)``, ``(Q, k)``.

    Ids count rows across the blocks. Each block is searched exactly and its results pushed into
    ``faiss.ResultHeap`` (keep-max heaps), so the answer equals `knn` on the concatenated blocks;
    when all blocks hold fewer than ``k`` rows the tail is id -1 / score -inf. ``transform``
    maps each block first (e.g. a whitening).
    """
    queries = as_matrix(queries, "queries")
    k = int(k)
    if k < 1:
        raise ValueError(f"knn_blocked: k must be >= 1, got {k}")
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    index = _empty_flat(queries.shape[1], use_gpu)
    start = 0
    for block in blocks:
        block = as_matrix(transform(block) if transform is not None else block, "database block", queries.shape[1])
        if len(block) == 0:
            continue
        index.add(block)
        scores, ids = index.search(queries, min(k, len(block)))
        index.reset()
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
        start += len(block)
    heap.finalize()
    ids = heap.I
    return np.where(ids >= 0, heap.D, -np.inf).astype(np.float32), ids


def knn_file(queries: np.ndarray, features: str | os.PathLike | FeaturesReader, k: int, *,
             block_rows: int = 65536, transform: Callable[[np.ndarray], np.ndarray] | None = None,
             use_gpu: bool | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`knn_blocked` over a features file read ``block_rows`` rows at a time; k is capped at its rows."""
    reader = features if isinstance(features, FeaturesReader) else FeaturesReader(features)
    try:
        k = min(int(k), len(reader))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        blocks: Iterable = (b for _, b in reader.blocks(block_rows))
        if progress:
            from tqdm import tqdm
            blocks = tqdm(blocks, total=-(-len(reader) // block_rows), desc=f"search {reader.path.name}",
                          unit="block")
        return knn_blocked(queries, blocks, k, use_gpu=use_gpu, transform=transform)
    finally:
        if reader is not features:
            reader.close()


def _ivf_index(x: np.ndarray, nlist: int, nprobe: int, seed: int) -> faiss.Index:
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(len(x), 64 * nlist)  # faiss warns below 39 points per centroid
    index.train(x[np.sort(rng.choice(len(x), n_train, replace=False))])
    index.add(x)
    index.nprobe = nprobe
    return index


def knn_graph(x: np.ndarray, k: int, *, index: str | faiss.Index = "flat", nlist: int | None = None,
              nprobe: int = 16, batch: int = 16384, seed: int = 0, use_gpu: bool | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows of ``x``: ``(scores, ids)``, both ``(N, k)``, best first.

    The row itself is dropped wherever it appears (ties can move it from column 0); rows with
    fewer than k neighbours are padded with id -1 / score -inf. ``index``: ``flat`` (exact),
    ``ivf`` (IVF-Flat, ``nlist`` cells, default ≈ 4·√N, ``nprobe`` of them searched), or a
    FAISS index that already holds the rows of ``x`` in order (e.g. `retrieval.index.build_index`).
    """
    x = as_matrix(x, "x")
    n = len(x)
    k = int(k)
    if k < 1:
        raise ValueError(f"knn_graph: k must be >= 1, got {k}")
    if isinstance(index, faiss.Index):
        if index.ntotal != n:
            raise ValueError(f"knn_graph: the index holds {index.ntotal} vectors, x has {n} rows")
        search_index = index
    elif index == "flat":
        search_index = faiss.IndexFlatIP(x.shape[1])
        search_index.add(x)
    elif index == "ivf":
        search_index = _ivf_index(x, int(nlist or max(1, min(n // 39, round(4 * np.sqrt(n))))), nprobe, seed)
    else:
        raise ValueError(f"knn_graph: unknown index {index!r}; expected 'flat', 'ivf' or a faiss.Index")
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu and not isinstance(index, faiss.Index):
        search_index = faiss.index_cpu_to_all_gpus(search_index)
    scores = np.full((n, k), -np.inf, np.float32)
    ids = np.full((n, k), -1, np.int64)
    starts = range(0, n, batch)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="knn graph", unit="batch")
    for s in starts:
        sc, nb = search_index.search(x[s:s + batch], min(k + 1, n))
        scores[s:s + len(nb)], ids[s:s + len(nb)] = _drop_self(sc, nb, s, k)
    return scores, ids


def _drop_self(scores: np.ndarray, ids: np.ndarray, first_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``first_row…`` of a graph searched with themselves in the database: the first ``k``
    entries that are neither the row itself nor missing (-1), padded with -1 / -inf."""
    drop = (ids == np.arange(first_row, first_row + len(ids))[:, None]) | (ids < 0)
    # a stable sort moves self / -1 to the end and keeps the order of the rest
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    scores, ids, drop = (np.take_along_axis(a, order, axis=1) for a in (scores, ids, drop))
    out_scores = np.full((len(ids), k), -np.inf, np.float32)
    out_ids = np.full((len(ids), k), -1, np.int64)
    width = ids.shape[1]
    out_ids[:, :width] = np.where(drop, -1, ids)
    out_scores[:, :width] = np.where(drop, -np.inf, scores)
    return out_scores, out_ids


def build_knn_graph_file(features: str | os.PathLike, path: str | os.PathLike, k: int, *,
                         index: faiss.Index | None = None, index_name: str = "Flat", batch: int = 16384,
                         block_rows: int = 65536, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                         use_gpu: bool | None = None, progress: bool = False) -> Path:
    """The kNN graph of a features file's rows (each row's ``k`` nearest other rows) into ``path``.

    Exact by default, the database read in blocks (`knn_file`, memory: one block + one batch's
    heaps); with ``index`` (holding the file's rows in order, e.g. an IVF-PQ index that fits in
    RAM where the vectors do not; ``index_name`` says what it is) each batch is searched in it.
    Rows are committed batch by batch under ``<path>.tmp`` with a ``cursor``; a killed run of
    the same job resumes there; the file is renamed when complete. ``transform`` maps rows as they
    are read (a whitening; an ``index`` must hold the rows mapped the same way).
    """
    path, tmp = Path(path), tmp_path(path)
    k = int(k)
    if k < 1:
        raise ValueError(f"build_knn_graph_file: k must be >= 1, got {k}")
    with FeaturesReader(features) as reader:
        n = len(reader)
        if index is not None and index.ntotal != n:
            raise ValueError(f"{features}: {n} rows but the index holds {index.ntotal} vectors")
        job = f"{file_stamp(reader.path)}|{k}|{index_name}|{getattr(transform, 'name', '')}"
        signature = hashlib.sha1(job.encode()).hexdigest()
        f = _open_graph_tmp(tmp, signature, n, k)
        try:
            if "ids" not in f:
                f.create_dataset("ids", data=np.asarray(reader.ids, dtype=object), dtype=STR_DTYPE)
            starts = range(int(f.attrs["cursor"]), n, batch)
            if progress:
                from tqdm import tqdm
                starts = tqdm(starts, desc=f"knn graph {path.name}", unit="batch")
            for s in starts:
                queries = reader.feats[s:s + batch].astype(np.float32, copy=False)
                if transform is not None:
                    queries = transform(queries)
                if index is None:
                    sc, nb = knn_file(queries, reader, k + 1, block_rows=block_rows, transform=transform,
                                      use_gpu=use_gpu)
                else:
                    sc, nb = index.search(queries, min(k + 1, n))
                sc, nb = _drop_self(sc, nb, s, k)
                f["neighbours"][s:s + len(nb)] = nb
                f["similarities"][s:s + len(nb)] = sc
                f.flush()  # rows first, then the cursor that makes them count
                f.attrs["cursor"] = s + len(nb)
                f.flush()
            f.attrs.update({"complete": True, "features": str(reader.path), "index": index_name})
        finally:
            f.close()
    os.replace(tmp, path)
    return path


def _open_graph_tmp(tmp: Path, signature: str, n: int, k: int) -> h5py.File:
    if tmp.exists():
        try:
            f = h5py.File(tmp, "a")
        except OSError:
            tmp.unlink()
        else:
            if f.attrs.get("signature") == signature:
                logger.info("%s: resuming at row %d of %d", tmp, int(f.attrs["cursor"]), n)
                return f
            f.close()
            tmp.unlink()
    tmp.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(tmp, "w")
    rows = max(1, min(n, 2**20 // max(1, 12 * k)))
    f.create_dataset("neighbours", shape=(n, k), dtype=np.int64, chunks=(rows, k), fillvalue=-1)
    f.create_dataset("similarities", shape=(n, k), dtype=np.float32, chunks=(rows, k), fillvalue=-np.inf)
    f.attrs.update({"schema": GRAPH_SCHEMA, "schema_version": GRAPH_SCHEMA_VERSION, "k": k, "cursor": 0,
                    "complete": False, "signature": signature})
    return f


def read_knn_graph(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, similarities, neighbours)`` of a graph file (`build_knn_graph_file`): ``knn_graph``'s arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kNN graph file not found: {path}")
    with h5py.File(path, "r") as f:
        check_schema(f, path, GRAPH_SCHEMA, GRAPH_SCHEMA_VERSION)
        return read_strings(f["ids"]), f["similarities"][()], f["neighbours"][()]


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
