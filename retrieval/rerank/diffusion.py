"""Diffusion re-ranking on the database's kNN graph (Iscen et al., CVPR 2017, "Efficient Diffusion on
Region Manifolds"), split into an offline and an online stage as Landmark2019 ran it (Yang et al.,
AAAI 2019, "Efficient Image Retrieval via Decoupling Diffusion into Online and Offline Processing";
github fyang93/diffusion, truncation 1000).

- `affinity`: W from the kNN graph, mutual (reciprocal) edges among each row's ``kd`` nearest other
  rows, weights max(s, 0)^γ, zero diagonal, symmetric.
- `laplacian`: L = I − α D^-1/2 W D^-1/2 (α = 0.99): diffusion solves L f = y.
- `truncation_sets`: each item and its ``truncation`` nearest other items (the graph's columns when it
  is that wide, else a blocked BLAS search: exact below 20k items, within nearby k-means cells above).
- `offline_diffusion`: for every database item i, L restricted to its truncation set solved for
  y = e_i with scipy's conjugate gradient (maxiter 20, tol 1e-6): an N × N CSR matrix with one row
  of ≤ truncation + 1 entries per item. Items are solved in fixed batches of ~65k unknowns, each one
  block-diagonal system and one `cg` call (its step lengths are shared by the blocks, so a solve
  stopped at maxiter differs slightly from item-by-item `cg`; the batches do not depend on the worker
  count, nor do the results), optionally in forked worker processes; memory O(N · truncation).
- `online_diffusion`: a query's top ``kq`` neighbours seed y_j = max(s_j, 0)^γ; f = Σ_j y_j offline[j];
  the items f reaches (f ≠ 0: in a seed's truncation set and connected to the seed inside it) are
  ranked by f, the rest follow in the query's kNN order with scores below every f, so each row is a
  prefix of a permutation of the database.
- `spectral_offline` / `spectral_online`: Fast Spectral Ranking (Iscen et al., CVPR 2018): the
  ``spectral_rank`` smallest eigenpairs of L (= largest of S) by `eigsh`, f = U diag((1−α)/(1−αλ)) Uᵀ y
  over the whole database (no truncation).
- `diffusion_database` (the offline stage, kept by a caller that searches the same database again)
  and `diffusion_query` (the online stage); `diffusion_rerank`: all of it from arrays;
  `diffusion_dense`: the textbook dense reference (N × N matrices, exact `np.linalg.solve` of each
  truncated system) for tests and benchmarks.

The kNN graph is `retrieval.search.knn_graph`'s: self excluded, so ``kd`` counts other items
(fyang93 searches ``kd`` including the item itself, i.e. kd − 1 others).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg, eigsh

from retrieval.processes import die_with_parent
from retrieval.search import as_matrix, knn, knn_graph

EXACT_BELOW = 20_000  # truncation search: exact below this many items, in k-means cells from here on
CELL_PROBES = 32  # cells (of about truncation / 8 items) a truncation search scans: ~4 × truncation candidates
SEARCH_BLOCK = 1 << 25  # similarities per block of the truncation search (128 MiB)
BLOCK_SLOTS = 1 << 16  # unknowns per block-diagonal CG system
ONLINE_BLOCK = 1 << 24  # entries of the padded (queries, f support) block the online stage ranks at once


def _check_graph(graph: tuple[np.ndarray, np.ndarray], n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = (np.asarray(a) for a in graph)
    if scores.shape != ids.shape or scores.ndim != 2 or len(ids) != n:
        raise ValueError(f"graph must be (scores, ids), both (N, K) with N = {n}; got {scores.shape} and {ids.shape}")
    if ids.shape[1] < width:
        raise ValueError(f"graph has {ids.shape[1]} neighbours per row, {width} are needed")
    return scores, ids


def affinity(scores: np.ndarray, ids: np.ndarray, kd: int = 50, gamma: float = 3.0) -> sp.csr_matrix:
    """W: mutual kNN edges among each row's first ``kd`` graph columns, weight max(s, 0)^γ; (N, N) CSR float32."""
    n = len(ids)
    kd = min(int(kd), ids.shape[1])
    scores, ids = np.asarray(scores)[:, :kd], np.asarray(ids)[:, :kd]
    valid = (ids >= 0) & (ids != np.arange(n)[:, None])
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[valid]
    weights = np.maximum(scores[valid], 0).astype(np.float32) ** np.float32(gamma)
    directed = sp.csr_matrix((weights, (rows, ids[valid])), shape=(n, n), dtype=np.float32)
    # min with the transpose keeps an edge only when both ends list each other (weights are ≥ 0).
    w = directed.minimum(directed.T).tocsr()
    w.eliminate_zeros()
    return w


def laplacian(w: sp.csr_matrix, alpha: float = 0.99) -> sp.csr_matrix:
    """L = I − α D^-1/2 W D^-1/2, (N, N) CSR float32 (the 1e-12 keeps isolated items finite, as fyang93)."""
    d = np.asarray(w.sum(axis=1)).ravel() + 1e-12
    inv_sqrt = sp.diags((d ** -0.5).astype(np.float32))
    s = inv_sqrt @ w @ inv_sqrt
    return (sp.identity(w.shape[0], np.float32, format="csr") - np.float32(alpha) * s).tocsr()


def _hnsw(dim: int) -> faiss.Index:
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 64
    return index


def _cells(db: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's cell and each cell's probe list (itself first): one cell below `EXACT_BELOW` items,
    else spherical k-means cells of about (t + 1) / 8 items (coarser ones lose neighbours at their
    borders), each probing its CELL_PROBES nearest cells: about 4 · t candidates per item."""
    n, dim = db.shape
    if n < EXACT_BELOW:
        return np.zeros(n, np.int64), np.zeros((1, 1), np.int64)
    n_cells = max(2, min(n // 4, 8 * n // (t + 1)))
    clustering = faiss.Clustering(dim, n_cells)
    clustering.niter, clustering.seed, clustering.spherical = 10, 0, True
    clustering.max_points_per_centroid = 32  # a 32-per-cell sample: 8 loses a fifth of the neighbours
    # k-means assigns through an HNSW graph over the centroids: there are thousands at 1M items.
    clustering.train(db, _hnsw(dim))
    centroids = faiss.vector_to_array(clustering.centroids).reshape(n_cells, dim)
    assign = _hnsw(dim)
    assign.add(centroids)
    _, labels = assign.search(db, 1)
    probes = min(CELL_PROBES, n_cells)
    flat = faiss.IndexFlatIP(dim)
    flat.add(centroids)
    _, near = flat.search(centroids, probes + 1)
    own = np.arange(n_cells)[:, None]
    # The cell itself first, then its nearest others (a duplicate centroid may outrank it).
    others = np.take_along_axis(near, np.argsort(near == own, axis=1, kind="stable"), 1)[:, :probes - 1]
    return labels[:, 0], np.hstack([own, others])


def truncation_sets(db: np.ndarray, truncation: int = 1000, *,
                    graph: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Each item followed by its ``truncation`` nearest other items: (N, min(truncation, N−1) + 1) int32, −1 padded.

    Taken from ``graph``'s columns when it has enough, else searched by blocked matrix products:
    exact below `EXACT_BELOW` items; above, within the CELL_PROBES k-means cells (of about
    truncation / 8 items) nearest to the item's own cell: ~4 × truncation candidates per item,
    scanned as one BLAS product per cell (FAISS's IVF-Flat scans each query alone, memory-bound:
    2-3× slower here at 100k items).
    """
    db = as_matrix(db, "db")
    n = len(db)
    t = min(int(truncation), n - 1)
    sets = np.full((n, t + 1), -1, np.int32)
    sets[:, 0] = np.arange(n)
    if graph is not None and np.shape(graph[1])[1] >= t:
        sets[:, 1:] = np.asarray(graph[1])[:, :t]
        return sets
    if t == 0:
        return sets
    labels, probes = _cells(db, t)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(probes) + 1))
    for c in range(len(probes)):
        members = order[bounds[c]:bounds[c + 1]]
        cand = np.concatenate([order[bounds[p]:bounds[p + 1]] for p in probes[c]])  # own members first
        width = min(t, len(cand) - 1)
        if width < 1:
            continue
        x_cand = db[cand]
        rows = max(1, SEARCH_BLOCK // len(cand))
        for s in range(0, len(members), rows):
            chunk = members[s:s + rows]
            sim = db[chunk] @ x_cand.T
            sim[np.arange(len(chunk)), s + np.arange(len(chunk))] = -np.inf  # the item itself
            top = np.argpartition(-sim, width - 1, axis=1)[:, :width]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, 1), axis=1, kind="stable"), 1)
            sets[chunk, 1:width + 1] = cand[top]
    return sets


def _padded_rows(lap: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """L's rows as (N + 1, max degree) column / value arrays; column N (never a member) pads short rows
    and fills row N, the row that a set's padding −1 reads."""
    n = lap.shape[0]
    counts = np.diff(lap.indptr)
    width = int(counts.max(initial=1))
    cols = np.full((n + 1, width), n, np.int32)
    vals = np.zeros((n + 1, width), np.float32)
    rows = np.repeat(np.arange(n), counts)
    slot = np.arange(lap.nnz) - np.repeat(lap.indptr[:-1], counts)
    cols[rows, slot] = lap.indices
    vals[rows, slot] = lap.data
    return cols, vals


def _solve_rows(cols: np.ndarray, vals: np.ndarray, sets: np.ndarray, out: np.ndarray, start: int, stop: int,
                maxiter: int, tol: float) -> None:
    """Fill ``out[start:stop]``: each item's truncated system solved, a batch of items per `cg` call
    (batches of BLOCK_SLOTS // set size items, counted from ``start``)."""
    n, m = sets.shape
    per = max(1, BLOCK_SLOTS // m)
    # pos[b·(n+1) + v]: v's row in the block-diagonal system of the batch's b-th set, −1 when v is not in
    # that set (v = n is the padding column).
    pos = np.full(per * (n + 1), -1, np.int32)
    slots = np.arange(per * m, dtype=np.int32).reshape(per, m)
    base = (np.arange(per, dtype=np.int32) * (n + 1))[:, None]
    for s in range(start, stop, per):
        nodes = sets[s:min(s + per, stop)]
        b = len(nodes)
        member = nodes >= 0
        at = (nodes + base[:b])[member]
        pos[at] = slots[:b][member]
        safe = np.where(member, nodes, n)
        flat = cols[safe]
        flat += base[:b, :, None]
        loc = pos[flat].ravel()
        pos[at] = -1
        keep = np.flatnonzero(loc >= 0)  # positions then take: much faster than a boolean mask here
        width = cols.shape[1]
        indptr = np.searchsorted(keep, np.arange(0, b * m * width + 1, width)).astype(np.int32)
        a = sp.csr_matrix((vals[safe].ravel().take(keep), loc.take(keep), indptr), shape=(b * m, b * m))
        rhs = np.zeros(b * m, np.float32)
        rhs[::m] = 1  # y = e_item: the item is its set's first member
        x, _ = cg(a, rhs, rtol=tol, maxiter=maxiter)
        out[s:s + b] = x.reshape(b, m)


def _solve_in_child(*args) -> None:
    die_with_parent()
    try:
        _solve_rows(*args)
    except BaseException:
        os._exit(1)
    os._exit(0)


def offline_diffusion(lap: sp.csr_matrix, sets: np.ndarray, *, maxiter: int = 20, tol: float = 1e-6,
                      workers: int = 1) -> sp.csr_matrix:
    """Row i = the solution of L[T_i, T_i] f = e_i over item i's truncation set T_i = ``sets[i]``: (N, N) CSR float32.

    ``sets``: `truncation_sets`' (N, T+1) array (item first, −1 padding); it becomes the CSR's column
    indices without a copy when it is int32 and unpadded. ``workers`` > 1 forks that many processes
    (Linux), each writing its share of rows into shared memory.
    """
    n, m = sets.shape
    if lap.shape != (n, n):
        raise ValueError(f"laplacian is {lap.shape}, truncation sets are for {n} items")
    if n and not np.array_equal(sets[:, 0], np.arange(n)):
        raise ValueError("truncation sets must start with the item itself (column 0 = row index)")
    cols, vals = _padded_rows(lap.tocsr())
    per = max(1, BLOCK_SLOTS // m)
    batches = -(-n // per)
    workers = max(1, min(int(workers), batches))
    if workers == 1:
        data = np.empty((n, m), np.float32)
        _solve_rows(cols, vals, sets, data, 0, n, maxiter, tol)
    else:
        # An anonymous shared mapping: forked children write their rows where the parent reads them.
        buffer = mmap.mmap(-1, max(1, n * m * 4))
        data = np.frombuffer(buffer, np.float32, n * m).reshape(n, m)
        # Whole batches per worker: the same blocks share a cg call (and its step lengths) at any worker count.
        bounds = np.minimum(np.linspace(0, batches, workers + 1).astype(int) * per, n)
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_solve_in_child, args=(cols, vals, sets, data, a, b, maxiter, tol))
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"offline diffusion worker failed (exit codes {[p.exitcode for p in procs]})")
    member = sets >= 0
    if member.all():
        # int32 indptr while nnz fits, or scipy would copy the indices up to int64 to match it.
        indptr = np.arange(0, n * m + 1, m, dtype=np.int32 if n * m < 2 ** 31 else np.int64)
        return sp.csr_matrix((data.reshape(-1), sets.reshape(-1), indptr), shape=(n, n), copy=False)
    return sp.csr_matrix((data[member], sets[member].astype(np.int32),
                          np.concatenate([[0], np.cumsum(member.sum(axis=1))])), shape=(n, n))


def _seeds(scores: np.ndarray, ids: np.ndarray, n: int, kq: int, gamma: float) -> sp.csr_matrix:
    """y: each query's top ``kq`` database neighbours with weight max(s, 0)^γ, (Q, N) CSR (zero weights dropped)."""
    s, i = np.asarray(scores)[:, :kq], np.asarray(ids)[:, :kq]
    w = np.maximum(np.nan_to_num(s, neginf=0.0), 0).astype(np.float32) ** np.float32(gamma)
    keep = (i >= 0) & (w > 0)
    rows = np.broadcast_to(np.arange(len(i))[:, None], i.shape)[keep]
    return sp.csr_matrix((w[keep], (rows, i[keep])), shape=(len(i), n), dtype=np.float32)


def _check_knn(scores: np.ndarray, ids: np.ndarray, width: int) -> None:
    if np.shape(scores) != np.shape(ids) or np.ndim(ids) != 2:
        raise ValueError(f"the queries' kNN must be (scores, ids), both (Q, K); got {np.shape(scores)}, "
                         f"{np.shape(ids)}")
    if np.shape(ids)[1] < width:
        raise ValueError(f"the queries' kNN has {np.shape(ids)[1]} columns, {width} are needed")


def online_diffusion(offline: sp.csr_matrix, scores: np.ndarray, ids: np.ndarray, k: int, *, kq: int = 10,
                     gamma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Rank each query by f = Σ_j y_j offline[j] over its kNN seeds; ``(scores, ids)`` (Q, min(k, N)).

    ``scores, ids``: the queries' kNN in the database, best first, ≥ max(kq, min(k, N)) columns.
    Items f does not reach follow in that kNN order, scored (below every f) by s − 3 + min(f, 0).
    """
    n = offline.shape[0]
    kk = min(int(k), n)
    _check_knn(scores, ids, max(min(kq, n), kk))
    ids, scores = np.asarray(ids), np.asarray(scores, np.float32)
    q = len(ids)
    f = (_seeds(scores, ids, n, kq, gamma) @ offline).tocsr()
    f.sum_duplicates()  # canonical: sorted, unique columns per row, for the membership test below
    f.eliminate_zeros()  # reached = f ≠ 0, as in the dense reference
    counts = np.diff(f.indptr)
    width = max(int(counts.max(initial=0)), 1)
    out_ids = np.full((q, kk), -1, np.int64)
    out_scores = np.full((q, kk), -np.inf, np.float32)
    step = max(1, ONLINE_BLOCK // width)
    for s in range(0, q, step):
        e = min(s + step, q)
        a, b = f.indptr[s], f.indptr[e]
        row = np.repeat(np.arange(e - s), counts[s:e])
        slot = np.arange(b - a) - (f.indptr[s:e] - a)[row]
        vals = np.full((e - s, width), -np.inf, np.float32)
        cols = np.full((e - s, width), n, np.int64)
        vals[row, slot], cols[row, slot] = f.data[a:b], f.indices[a:b]
        t = min(kk, width)
        part = np.argpartition(-vals, t - 1, axis=1)[:, :t] if t < width else np.broadcast_to(np.arange(t), vals.shape)
        top, top_cols = np.take_along_axis(vals, part, 1), np.take_along_axis(cols, part, 1)
        order = np.lexsort((top_cols, -top), axis=1)  # f descending, ties by database index
        top, top_cols = np.take_along_axis(top, order, 1), np.take_along_axis(top_cols, order, 1)
        hit = np.isfinite(top)
        out_scores[s:e, :t], out_ids[s:e, :t] = top, np.where(hit, top_cols, -1)
        floor = np.minimum(np.where(hit, top, 0).min(axis=1), 0) - 3
        # Fill with kNN items outside f's support: a sorted (row, column) key lookup.
        key = row * np.int64(n) + f.indices[a:b]
        want = np.arange(e - s)[:, None] * np.int64(n) + np.maximum(ids[s:e], 0)
        at = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))
        reached = (key[at] == want) if len(key) else np.zeros(want.shape, bool)
        missing = ~reached & (ids[s:e] >= 0)
        place = np.minimum(counts[s:e], kk)[:, None] + np.cumsum(missing, axis=1) - 1
        put = missing & (place < kk)
        rows_put = np.broadcast_to(np.arange(s, e)[:, None], put.shape)[put]
        out_ids[rows_put, place[put]] = ids[s:e][put]
        out_scores[rows_put, place[put]] = (scores[s:e] + floor[:, None])[put]
    return out_scores, out_ids


def spectral_offline(lap: sp.csr_matrix, rank: int, alpha: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """FSR's offline stage: U (N, rank) float32, the eigenvectors of L's ``rank`` smallest eigenvalues μ
    (= S's largest, μ = 1 − αλ), and the filter h = (1 − α)/μ (rank,)."""
    n = lap.shape[0]
    if not 0 < rank < n - 1:
        raise ValueError(f"spectral_rank must be in [1, N-2] = [1, {n - 2}] (eigsh on a sparse matrix), got {rank}")
    mu, u = eigsh(lap.astype(np.float64), k=int(rank), which="SA", v0=np.ones(n))
    return u.astype(np.float32), ((1 - alpha) / mu).astype(np.float32)


def spectral_online(u: np.ndarray, h: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int, *, kq: int = 10,
                    gamma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """FSR's online stage: f = U diag(h) Uᵀ y over the whole database, top min(k, N): ``(scores, ids)``."""
    n = len(u)
    kk = min(int(k), n)
    _check_knn(scores, ids, min(kq, n))
    coef = (_seeds(scores, ids, n, kq, gamma) @ u) * h  # (Q, rank)
    out_ids = np.empty((len(coef), kk), np.int64)
    out_scores = np.empty((len(coef), kk), np.float32)
    step = max(1, (1 << 26) // max(n, 1))  # queries per dense (batch, N) block: ≤ 256 MiB
    for s in range(0, len(coef), step):
        f = coef[s:s + step] @ u.T
        part = np.argpartition(-f, kk - 1, axis=1)[:, :kk] if kk < n else np.broadcast_to(np.arange(n), f.shape)
        top = np.take_along_axis(f, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        out_ids[s:s + step] = np.take_along_axis(part, order, axis=1)
        out_scores[s:s + step] = np.take_along_axis(top, order, axis=1)
    return out_scores, out_ids


def _check_params(n: int, k: int, kd: int, kq: int, gamma: float, alpha: float, truncation: int, maxiter: int,
                  tol: float, spectral_rank: int) -> None:
    if n == 0:
        raise ValueError("diffusion: the database is empty")
    for name, value in (("k", k), ("kd", kd), ("kq", kq), ("truncation", truncation), ("maxiter", maxiter)):
        if int(value) != value or value < 1:
            raise ValueError(f"diffusion: {name} must be a positive integer, got {value!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"diffusion: alpha must be in (0, 1), got {alpha}")
    if not gamma > 0 or not tol > 0:
        raise ValueError(f"diffusion: gamma and tol must be > 0, got gamma={gamma}, tol={tol}")
    if spectral_rank and not 0 < spectral_rank < n - 1:
        raise ValueError(f"diffusion: spectral_rank must be 0 (off) or in [1, N-2] = [1, {n - 2}] (eigsh), "
                         f"got {spectral_rank}")


@dataclass
class DiffusionDatabase:
    """The offline stage of one database, reusable for any number of query batches (the search
    service keeps it): the truncated diffusion rows, or FSR's eigenpairs."""

    n: int
    offline: sp.csr_matrix | None = None
    spectral: tuple[np.ndarray, np.ndarray] | None = None


def diffusion_database(db: np.ndarray, *, graph: tuple[np.ndarray, np.ndarray] | None = None, kd: int = 50,
                       gamma: float = 3.0, alpha: float = 0.99, truncation: int = 1000, maxiter: int = 20,
                       tol: float = 1e-6, spectral_rank: int = 0) -> DiffusionDatabase:
    """The offline stage of `diffusion_rerank` for ``db`` (``graph`` as there)."""
    db = as_matrix(db, "db")
    n = len(db)
    _check_params(n, 1, kd, 1, gamma, alpha, truncation, maxiter, tol, spectral_rank)
    if graph is None:
        graph = knn_graph(db, min(kd, max(n - 1, 1)), index="flat" if n < 100_000 else "ivf")
    scores, ids = _check_graph(graph, n, min(kd, n - 1))
    lap = laplacian(affinity(scores, ids, kd, gamma), alpha)
    if spectral_rank:
        return DiffusionDatabase(n, spectral=spectral_offline(lap, spectral_rank, alpha))
    sets = truncation_sets(db, truncation, graph=(scores, ids))
    return DiffusionDatabase(n, offline=offline_diffusion(lap, sets, maxiter=maxiter, tol=tol,
                                                          workers=len(os.sched_getaffinity(0))))


def diffusion_query(database: DiffusionDatabase, scores: np.ndarray, ids: np.ndarray, k: int, *, kq: int = 10,
                    gamma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """The online stage: queries given by their kNN in the database (≥ max(kq, min(k, N)) columns)."""
    if database.spectral is not None:
        u, h = database.spectral
        return spectral_online(u, h, scores, ids, k, kq=kq, gamma=gamma)
    return online_diffusion(database.offline, scores, ids, k, kq=kq, gamma=gamma)


def diffusion_rerank(queries: np.ndarray, db: np.ndarray, k: int, *, graph: tuple[np.ndarray, np.ndarray] | None = None,
                     kd: int = 50, kq: int = 10, gamma: float = 3.0, alpha: float = 0.99, truncation: int = 1000,
                     maxiter: int = 20, tol: float = 1e-6, spectral_rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion re-ranking of ``queries`` against ``db``: ``(scores, ids)`` (Q, min(k, N)), higher = better.

    ``graph``: `retrieval.search.knn_graph(db, K)` with K ≥ min(kd, N−1) (None: computed, IVF from
    100k items). Truncation sets come from its columns when K ≥ truncation, else from a blocked
    search (`truncation_sets`). ``spectral_rank`` > 0: Fast Spectral Ranking instead.
    """
    db = as_matrix(db, "db")
    queries = as_matrix(queries, "queries", db.shape[1])
    n = len(db)
    _check_params(n, k, kd, kq, gamma, alpha, truncation, maxiter, tol, spectral_rank)
    database = diffusion_database(db, graph=graph, kd=kd, gamma=gamma, alpha=alpha, truncation=truncation,
                                  maxiter=maxiter, tol=tol, spectral_rank=spectral_rank)
    q_scores, q_ids = knn(queries, db, max(min(k, n), min(kq, n)))
    return diffusion_query(database, q_scores, q_ids, k, kq=kq, gamma=gamma)


def diffusion_dense(queries: np.ndarray, db: np.ndarray, k: int, *, kd: int = 50, kq: int = 10, gamma: float = 3.0,
                    alpha: float = 0.99, truncation: int = 1000,
                    spectral_rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The textbook reference of `diffusion_rerank` with dense (N, N) float64 matrices (at most three
    live at once) and exact solves, of the truncated systems of the items that seed some query."""
    x = np.asarray(db, np.float64)
    qx = np.asarray(queries, np.float64)
    n = len(x)
    _check_params(n, k, kd, kq, gamma, alpha, truncation, 1, 1.0, spectral_rank)
    kk, kd, t = min(k, n), min(kd, n - 1), min(truncation, n - 1)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :max(kd, t)].copy()
    a = np.zeros((n, n))
    rows = np.arange(n)[:, None]
    a[rows, order[:, :kd]] = np.maximum(sims[rows, order[:, :kd]], 0) ** gamma
    del sims
    w = np.minimum(a, a.T)  # mutual neighbours only
    del a
    d = w.sum(axis=1) + 1e-12
    s = w / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
    del w
    q_sims = qx @ x.T
    q_order = np.argsort(-q_sims, axis=1, kind="stable")
    y = np.zeros((len(qx), n))
    qrows = np.arange(len(qx))[:, None]
    seeds = q_order[:, :min(kq, n)]
    y[qrows, seeds] = np.maximum(q_sims[qrows, seeds], 0) ** gamma
    if spectral_rank:
        lam, u = np.linalg.eigh(s)
        lam, u = lam[::-1][:spectral_rank], u[:, ::-1][:, :spectral_rank]
        f = y @ u @ np.diag((1 - alpha) / (1 - alpha * lam)) @ u.T
        ids = np.argsort(-f, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(f, ids, axis=1).astype(np.float32), ids.astype(np.int64)
    lap = np.eye(n) - alpha * s
    del s
    offline = np.zeros((n, n))
    for i in np.flatnonzero((y > 0).any(axis=0)):  # rows no query seeds meet y_j = 0 in f
        members = np.concatenate([[i], order[i, :t]])
        e = np.zeros(len(members))
        e[0] = 1
        offline[i, members] = np.linalg.solve(lap[np.ix_(members, members)], e)
    f = y @ offline
    reached = f != 0  # items outside every seed's set, or cut off from it inside the set, are not reached
    out_scores = np.empty((len(qx), kk), np.float32)
    out_ids = np.empty((len(qx), kk), np.int64)
    for j in range(len(qx)):
        hit = np.flatnonzero(reached[j])
        hit = hit[np.argsort(-f[j, hit], kind="stable")]
        floor = min(f[j, hit[:kk]].min(initial=0), 0) - 3
        rest = q_order[j][~reached[j, q_order[j]]]
        out_ids[j] = np.concatenate([hit, rest])[:kk]
        out_scores[j] = np.concatenate([f[j, hit], q_sims[j, rest] + floor])[:kk]
    return out_scores, out_ids
