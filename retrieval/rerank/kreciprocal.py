"""k-reciprocal re-ranking (Zhong et al., CVPR 2017, "Re-ranking Person Re-identification with
k-reciprocal Encoding"; k1 = 20, k2 = 6, λ = 0.3), sparse over kNN lists.

As in the published code, queries and database form one set of M = Q + N items (queries first),
each with its k1 nearest other items of that union: queries can be each other's neighbours, and a
query's ranking depends on the other queries of the call (the method is transductive).

- R(p, k): the items of p's top-(k+1) list (p itself included) whose own top-(k+1) list holds p;
- R*(p): R(p, k1) plus R(c, round(k1/2)) of each c ∈ R(p, k1) with |R(p, k1) ∩ R(c, round(k1/2))| >
  2/3 |R(c, round(k1/2))|;
- V(p): weights exp(−d(p, x)) over R*(p), normalised to sum 1, where d = ‖p − x‖² = 2 − 2s on
  L2-normalised vectors (the published code divides by each row's largest distance, which a kNN
  list does not know);
- local query expansion: V(p) ← the mean of V over p's top k2 (p included);
- Jaccard distance 1 − Σmin(V_p, V_x) / Σmax(V_p, V_x) = 1 − m / (2 − m), m = Σmin (rows sum to 1);
- final distance (1 − λ)·Jaccard + λ·d, database items ranked by it.

V is a sparse (M, M) matrix (memory O(M · k1 · k2)); Σmin is summed only over the database items
that share support with the query (an inverted index: V's transpose restricted to the columns the
queries touch, times the expansion's averaging matrix), every other item has Jaccard 1 and so
keeps its kNN order; no (M, M) dense matrix is ever built. `k_reciprocal_dense` is the published
algorithm with dense matrices and the same distance, for tests and benchmarks.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from retrieval.search import as_matrix, knn, knn_graph

ROW_BLOCK = 8192  # rows per vectorised block of the reciprocity tests
PAIR_BLOCK = 1 << 18  # min(V_q[u], V_x[u]) terms per block of queries
DOT_BLOCK = 1 << 16  # (row, column) pairs per block of dot products: two (block, D) gathers


def _check_params(n: int, k: int, k1: int, k2: int, lambda_value: float) -> None:
    if n == 0:
        raise ValueError("k-reciprocal: the database is empty")
    for name, value in (("k", k), ("k1", k1), ("k2", k2)):
        if int(value) != value or value < 1:
            raise ValueError(f"k-reciprocal: {name} must be a positive integer, got {value!r}")
    if k2 > k1 + 1:
        raise ValueError(f"k-reciprocal: k2 = {k2} must be ≤ k1 + 1 = {k1 + 1} (it expands over the k1-NN lists)")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"k-reciprocal: lambda_value must be in [0, 1], got {lambda_value}")


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """The ids of each row's k best scores (stable on ties), −1 where a row has fewer."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(ids, order, axis=1)
    top[~np.isfinite(np.take_along_axis(scores, order, axis=1))] = -1
    if top.shape[1] < k:
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-1)
    return top


def union_lists(queries: np.ndarray, db: np.ndarray, graph: tuple[np.ndarray, np.ndarray], k1: int,
                query_knn: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Each item of queries ∪ db (queries first) followed by its k1 nearest others there: (Q + N, k1 + 1) int32.

    ``graph``: the database's `knn_graph` (≥ min(k1, N−1) columns); ``query_knn``: the queries' kNN
    in db (≥ min(k1, N) columns), searched when None; the query-to-query and db-to-query sides are
    searched here.
    """
    q, n = len(queries), len(db)
    g_scores, g_ids = (np.asarray(a) for a in graph)
    k1 = int(k1)
    g_scores = np.where(g_ids[:, :k1] >= 0, g_scores[:, :k1], -np.inf)
    g_ids = g_ids[:, :k1] + q
    dq_scores, dq_ids = knn(db, queries, min(k1, q))  # the queries nearest to each database item
    qd_scores, qd_ids = query_knn if query_knn is not None else knn(queries, db, min(k1, n))
    qd_scores, qd_ids = np.asarray(qd_scores)[:, :k1], np.asarray(qd_ids)[:, :k1]
    qq_scores, qq_ids = knn_graph(queries, min(k1, max(q - 1, 1)))
    lists = np.empty((q + n, k1 + 1), np.int32)
    lists[:, 0] = np.arange(q + n)
    lists[q:, 1:] = _top(np.hstack([g_scores, dq_scores]), np.hstack([g_ids, dq_ids]), k1)
    lists[:q, 1:] = _top(np.hstack([qd_scores, qq_scores]), np.hstack([qd_ids + q, qq_ids]), k1)
    return lists


def reciprocal_sets(lists: np.ndarray, k: int) -> np.ndarray:
    """R(p, k): the entries x of p's first k + 1 list entries whose own first k + 1 hold p; −1 elsewhere."""
    top = lists[:, :k + 1]
    out = np.full(top.shape, -1, np.int32)
    for s in range(0, len(top), ROW_BLOCK):
        rows = top[s:s + ROW_BLOCK]
        back = top[np.maximum(rows, 0)]  # (b, k+1, k+1): each listed item's own list
        me = np.arange(s, s + len(rows))[:, None, None]
        mutual = (back == me).any(axis=2) & (rows >= 0)
        out[s:s + len(rows)] = np.where(mutual, rows, -1)
    return out


def expanded_sets(lists: np.ndarray, k1: int) -> sp.csr_matrix:
    """R*(p) as the sparsity pattern of an (M, M) CSR matrix (sorted columns, data = 1)."""
    m = len(lists)
    r_full = reciprocal_sets(lists, k1)
    r_half = reciprocal_sets(lists, int(np.around(k1 / 2)))
    indptr = np.zeros(m + 1, np.int64)
    chunks = []
    for s in range(0, m, ROW_BLOCK):
        r = r_full[s:s + ROW_BLOCK]
        cand = r_half[np.maximum(r, 0)]  # (b, k1+1, kh+1): R(c, kh) of each c ∈ R(p, k1)
        cand = np.where((r >= 0)[:, :, None] & (cand >= 0), cand, -2)  # padding −2 never meets r's −1
        shared = (cand[..., None] == r[:, None, None, :]).any(axis=3).sum(axis=2)
        size = (cand >= 0).sum(axis=2)
        accept = (shared > 2 / 3 * size) & (r >= 0)
        members = np.concatenate([r, np.where(accept[..., None], cand, -1).reshape(len(r), -1)], axis=1)
        members = np.sort(np.where(members >= 0, members, m), axis=1)
        keep = (members < m) & np.concatenate([np.ones((len(r), 1), bool), members[:, 1:] != members[:, :-1]], 1)
        indptr[s + 1:s + len(r) + 1] = keep.sum(axis=1)
        chunks.append(members[keep].astype(np.int32))
    np.cumsum(indptr, out=indptr)
    indices = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(m, m))


def _vectors(queries: np.ndarray, db: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of queries ∪ db (queries first) by union id."""
    q = len(queries)
    out = db[np.maximum(ids - q, 0)]
    is_query = ids < q
    out[is_query] = queries[ids[is_query]]
    return out


def _distances(queries: np.ndarray, db: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """d = 2 − 2·s between union items, pair by pair, in blocks."""
    d = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), DOT_BLOCK):
        a = _vectors(queries, db, rows[s:s + DOT_BLOCK])
        b = _vectors(queries, db, cols[s:s + DOT_BLOCK])
        d[s:s + DOT_BLOCK] = 2 - 2 * np.einsum("ij,ij->i", a, b)
    return d


def encoding(queries: np.ndarray, db: np.ndarray, lists: np.ndarray, k1: int) -> sp.csr_matrix:
    """V: row p = exp(−d(p, x)) over x ∈ R*(p), normalised to sum 1; (M, M) CSR float32."""
    v = expanded_sets(lists, k1)
    rows = np.repeat(np.arange(v.shape[0], dtype=np.int32), np.diff(v.indptr))
    w = np.exp(-_distances(queries, db, rows, v.indices))
    v.data = w / np.bincount(rows, weights=w, minlength=v.shape[0])[rows].astype(np.float32)
    return v


def expansion_matrix(lists: np.ndarray, k2: int) -> sp.csr_matrix:
    """The local query expansion as a matrix: row p averages over p's first k2 list entries; (M, M) CSR."""
    top = lists[:, :k2]
    valid = top >= 0
    rows = np.broadcast_to(np.arange(len(top))[:, None], top.shape)[valid]
    weights = (1 / valid.sum(axis=1))[rows].astype(np.float32)
    return sp.csr_matrix((weights, (rows, top[valid])), shape=(len(top), len(top)))


def jaccard_minsum(v_queries: sp.csr_matrix, inverted: sp.csr_matrix) -> sp.csr_matrix:
    """m[q, x] = Σ_u min(V_q[u], V_x[u]) over the support q and x share: (Q, N) CSR float32.

    ``inverted``: row u = the database items x with V_x[u] ≠ 0 (their values), for every column u
    that ``v_queries`` uses; built in blocks of whole queries of about PAIR_BLOCK terms each.
    """
    lens = np.diff(inverted.indptr)[v_queries.indices]
    per_query = np.add.reduceat(lens, v_queries.indptr[:-1]) if len(lens) else np.zeros(v_queries.shape[0], int)
    per_query[np.diff(v_queries.indptr) == 0] = 0  # reduceat repeats the next value on empty rows
    blocks = []
    start = 0
    while start < v_queries.shape[0]:
        total = np.cumsum(per_query[start:])
        stop = start + max(1, int(np.searchsorted(total, PAIR_BLOCK, "right")))
        a, b = v_queries.indptr[start], v_queries.indptr[stop]
        cnt = lens[a:b]
        rows = np.repeat(np.arange(stop - start), np.diff(v_queries.indptr[start:stop + 1]))
        # Positions of every inverted-index entry the block's nonzeros point to.
        first = np.repeat(inverted.indptr[v_queries.indices[a:b]] - np.cumsum(cnt) + cnt, cnt) + np.arange(cnt.sum())
        terms = np.minimum(np.repeat(v_queries.data[a:b], cnt), inverted.data[first])
        blocks.append(sp.csr_matrix((terms, (np.repeat(rows, cnt), inverted.indices[first])),
                                    shape=(stop - start, inverted.shape[1]), dtype=np.float32))
        start = stop
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, inverted.shape[1]), dtype=np.float32)


def k_reciprocal_rerank(queries: np.ndarray, db: np.ndarray, k: int, *,
                        graph: tuple[np.ndarray, np.ndarray] | None = None, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking: ``(scores, ids)`` (Q, min(k, N)), scores = −final distance (higher = better).

    ``graph``: `retrieval.search.knn_graph(db, K)` with K ≥ min(k1, N−1); None = computed (exact).
    """
    db = as_matrix(db, "db")
    queries = as_matrix(queries, "queries", db.shape[1])
    q, n = len(queries), len(db)
    _check_params(n, k, k1, k2, lambda_value)
    kk = min(int(k), n)
    if graph is None:
        graph = knn_graph(db, min(k1, max(n - 1, 1)))
    g_scores, g_ids = (np.asarray(a) for a in graph)
    if g_ids.shape != g_scores.shape or g_ids.ndim != 2 or len(g_ids) != n:
        raise ValueError(f"graph must be (scores, ids), both (N, K) with N = {n}; got {g_scores.shape}, {g_ids.shape}")
    if g_ids.shape[1] < min(k1, n - 1):
        raise ValueError(f"graph has {g_ids.shape[1]} neighbours per row, k1 = {min(k1, n - 1)} are needed")
    if q == 0:
        return np.zeros((0, kk), np.float32), np.zeros((0, kk), np.int64)
    knn_scores, knn_ids = knn(queries, db, max(kk, min(k1, n)))
    lists = union_lists(queries, db, (g_scores, g_ids), k1, (knn_scores, knn_ids))
    knn_scores, knn_ids = knn_scores[:, :kk], knn_ids[:, :kk]
    v = encoding(queries, db, lists, k1)
    expand = expansion_matrix(lists, k2)
    v_queries = (expand[:q] @ v).tocsr()
    # The inverted index, only over the columns the queries use: row i lists V_qe[x, touched[i]] ≠ 0.
    touched, compact = np.unique(v_queries.indices, return_inverse=True)
    v_queries = sp.csr_matrix((v_queries.data, compact.astype(np.int32), v_queries.indptr), shape=(q, len(touched)))
    minsum = jaccard_minsum(v_queries, (v.T.tocsr()[touched] @ expand[q:].T).tocsr())
    minsum.sort_indices()  # for the searchsorted below
    out_scores = np.empty((q, kk), np.float32)
    out_ids = np.empty((q, kk), np.int64)
    for i in range(q):
        row = slice(minsum.indptr[i], minsum.indptr[i + 1])
        cand, jac = minsum.indices[row], 1 - minsum.data[row] / (2 - minsum.data[row])
        ids, dist = knn_ids[i], 2 - 2 * knn_scores[i]
        # The kNN list's own final distances (Jaccard 1 unless a candidate) bound what can enter.
        at = np.minimum(np.searchsorted(cand, ids), max(len(cand) - 1, 0))
        listed = (cand[at] == ids) if len(cand) else np.zeros(kk, bool)
        final = (1 - lambda_value) * np.where(listed, jac[at] if len(cand) else 1, 1) + lambda_value * dist
        # A candidate off the list is at least as far as its last entry: skip those that cannot beat the list.
        other = ~np.isin(cand, ids) & ((1 - lambda_value) * jac + lambda_value * dist[-1] <= final.max())
        more = cand[other]
        more_dist = 2 - 2 * np.einsum("ij,j->i", db[more], queries[i])  # no BLAS: its threads crawl when cores are busy
        ids = np.concatenate([ids, more])
        dist = np.concatenate([dist, more_dist])
        final = np.concatenate([final, (1 - lambda_value) * jac[other] + lambda_value * more_dist])
        order = np.lexsort((ids, dist, final))[:kk]  # ties: by distance, then database index
        out_ids[i], out_scores[i] = ids[order], -final[order]
    return out_scores, out_ids


def k_reciprocal_dense(queries: np.ndarray, db: np.ndarray, k: int, *, k1: int = 20, k2: int = 6,
                       lambda_value: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The published algorithm with dense (M, M) matrices (M = Q + N) and d = 2 − 2s: the reference."""
    queries, db = np.asarray(queries, np.float32), np.asarray(db, np.float32)
    q, n = len(queries), len(db)
    _check_params(n, k, k1, k2, lambda_value)
    x = np.vstack([queries, db])
    m = len(x)
    dist = 2 - 2 * x @ x.T
    ranking = dist.copy()
    np.fill_diagonal(ranking, -np.inf)  # each item first in its own list, as d(p, p) = 0 is meant to be
    initial_rank = np.argsort(ranking, axis=1, kind="stable").astype(np.int32)
    del ranking

    def reciprocal(i: int, kk: int) -> np.ndarray:
        forward = initial_rank[i, :kk + 1]
        backward = initial_rank[forward, :kk + 1]
        return forward[np.where(backward == i)[0]]

    v = np.zeros((m, m), np.float32)
    half = int(np.around(k1 / 2))
    for i in range(m):
        r = reciprocal(i, k1)
        expansion = r
        for c in r:
            rc = reciprocal(c, half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion = np.append(expansion, rc)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[initial_rank[i, :k2]].mean(axis=0) for i in range(m)])
    inv_index = [np.flatnonzero(col) for col in v.T]
    final = np.empty((q, n), np.float32)
    for i in range(q):
        temp_min = np.zeros(m, np.float32)
        support = np.flatnonzero(v[i])
        for u in support:
            temp_min[inv_index[u]] += np.minimum(v[i, u], v[inv_index[u], u])
        jaccard = 1 - temp_min / (2 - temp_min)
        final[i] = ((1 - lambda_value) * jaccard + lambda_value * dist[i])[q:]
    ids = np.lexsort((dist[:q, q:], final), axis=1)[:, :min(k, n)]  # ties: by distance, then index
    return -np.take_along_axis(final, ids, axis=1), ids.astype(np.int64)
