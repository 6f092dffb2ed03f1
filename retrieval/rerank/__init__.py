"""Re-ranking: query expansion and database augmentation on top of kNN search.

`rerank_search(method, queries, db, k)` runs a named pipeline and returns ``(scores, ids)``
like `retrieval.search.knn`:

- ``none``: plain kNN;
- ``qe``: average query expansion (AQE);
- ``aqe``: αQE;
- ``adba``: αDBA on the database, then kNN;
- ``adba+aqe``: αDBA, then αQE against the augmented database.
"""

from __future__ import annotations

import numpy as np

from retrieval.rerank.qe import alpha_database_augmentation, alpha_query_expansion, average_query_expansion
from retrieval.search import knn

RERANKERS = ("none", "qe", "aqe", "adba", "adba+aqe")

__all__ = ["RERANKERS", "alpha_database_augmentation", "alpha_query_expansion", "average_query_expansion",
           "rerank_search"]


def rerank_search(method: str, queries: np.ndarray, db: np.ndarray, k: int, *, qe_n: int = 2,
                  dba_n: int = 2, alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Search ``db`` for ``queries`` with the re-ranking pipeline ``method`` (see module docstring)."""
    if method not in RERANKERS:
        raise ValueError(f"unknown re-ranking {method!r}; choose from {', '.join(RERANKERS)}")
    if "adba" in method:
        db = alpha_database_augmentation(db, dba_n, alpha)
    if method in ("none", "adba") or qe_n <= 0:
        return knn(queries, db, k)
    _, ranks = knn(queries, db, max(qe_n, 1))
    if method == "qe":
        expanded = average_query_expansion(queries, db, ranks, qe_n)
    else:
        expanded = alpha_query_expansion(queries, db, ranks, qe_n, alpha)
    return knn(expanded, db, k)
