"""Re-ranking on top of kNN search: query expansion, database augmentation, diffusion,
k-reciprocal, Landmark2019's label sort/insert and spatial verification.

`rerank_search(method, queries, db, k, context=...)` runs a chain such as ``adba+aqe+diffusion``
(`retrieval.rerank.pipeline`) and returns ``(scores, ids)`` like `retrieval.search.knn`. Each
method is a function on arrays in its own module: qe.py (AQE, αQE, αDBA), diffusion.py,
kreciprocal.py, l2019.py, sv.py (over `retrieval.verify`).
"""

from __future__ import annotations

from retrieval.rerank.pipeline import (
           RANKING_STEPS,
           STEP_PARAMS,
           VECTOR_STEPS,
           RerankContext,
           needs_images,
           needs_labels,
           parse_method,
           rerank_search,
)
from retrieval.rerank.qe import alpha_database_augmentation, alpha_query_expansion, average_query_expansion

__all__ = ["RANKING_STEPS", "STEP_PARAMS", "VECTOR_STEPS", "RerankContext",
           "alpha_database_augmentation", "alpha_query_expansion", "average_query_expansion", "needs_images",
           "needs_labels", "parse_method", "rerank_search"]
