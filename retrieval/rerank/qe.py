"""Query expansion and database-side augmentation (pure functions on arrays).

- AQE, average query expansion (Chum et al., ICCV 2007): q' = q + Σ_{i≤n} x_i.
- αQE (Radenović et al., TPAMI 2018): q' = q + Σ_{i≤n} (qᵀx_i)^α x_i.
- αDBA (same paper): every database vector is replaced by the same weighted sum over itself
  and its n nearest database neighbours, then queries are searched against it.
All outputs are L2-normalised. Negative similarities get weight 0.
"""

from __future__ import annotations

import numpy as np

from retrieval.search import as_matrix, knn


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _expand(vectors: np.ndarray, db: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    nb = db[neighbours]  # (Q, n, D)
    sims = np.einsum("qd,qnd->qn", vectors, nb)
    weights = np.clip(sims, 0.0, None) ** alpha
    return _normalise(vectors + np.einsum("qn,qnd->qd", weights, nb))


def alpha_query_expansion(queries: np.ndarray, db: np.ndarray, ranks: np.ndarray, n: int = 2,
                          alpha: float = 3.0) -> np.ndarray:
    """αQE: each query plus its top-``n`` database vectors (``ranks[:, :n]``) weighted by similarity^α."""
    db = as_matrix(db, "db")
    queries = as_matrix(queries, "queries", db.shape[1])
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or len(ranks) != len(queries):
        raise ValueError(f"ranks must be (Q, k) with Q = {len(queries)}, got {ranks.shape}")
    if n <= 0:
        return queries.copy()
    if ranks.shape[1] < n or (ranks[:, :n] < 0).any():
        raise ValueError(f"query expansion with n={n} needs at least {n} valid neighbours per query")
    return _expand(queries, db, ranks[:, :n], alpha)


def average_query_expansion(queries: np.ndarray, db: np.ndarray, ranks: np.ndarray, n: int = 2) -> np.ndarray:
    """AQE: αQE with α = 0 (all weights 1)."""
    return alpha_query_expansion(queries, db, ranks, n, alpha=0.0)


def alpha_database_augmentation(db: np.ndarray, n: int = 2, alpha: float = 3.0,
                                ranks: np.ndarray | None = None) -> np.ndarray:
    """αDBA: each database vector plus its ``n`` nearest other database vectors, weighted by similarity^α.

    ``ranks``: the database's own kNN (``(N, ≥n+1)``, first column = itself); computed when None.
    """
    db = as_matrix(db, "db")
    if n <= 0:
        return db.copy()
    if ranks is None:
        _, ranks = knn(db, db, n + 1)
    ranks = np.asarray(ranks)
    # Drop each vector's own entry wherever it appears (ties can move it from column 0).
    own = ranks == np.arange(len(db))[:, None]
    neighbours = np.stack([row[~mask][:n] for row, mask in zip(ranks, own, strict=True)])
    if neighbours.shape[1] < n:
        raise ValueError(f"αDBA with n={n} needs {n + 1} neighbours per database vector")
    return _expand(db, db, neighbours, alpha)
