"""Re-ranking chains: ``adba+aqe+diffusion+sv`` parsed, validated and run on arrays.

A method is one name or several joined by ``+``, run left to right:

- vector steps change the descriptors before the kNN search: ``adba`` (αDBA on the
  database), then ``qe`` (AQE) or ``aqe`` (αQE) on the queries;
- ranking steps re-order the ranking the search (or the step before) returned:
  ``diffusion``, ``kreciprocal``, ``l2019`` (label sort/insert) and ``sv`` (spatial
  verification), each reading its own ``<step>_*`` params (see `STEP_PARAMS`).

``none`` is plain kNN. Vector steps come first; a step appears at most once. Ranking steps
that search the database's own neighbours share one kNN graph per call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.rerank.qe import alpha_database_augmentation, alpha_query_expansion, average_query_expansion
from retrieval.search import as_matrix, flat_index, knn_graph

VECTOR_STEPS = ("adba", "qe", "aqe")
RANKING_STEPS = ("diffusion", "kreciprocal", "l2019", "sv")

# experiment param -> keyword of the step's function (its defaults live in that function's signature)
STEP_PARAMS: dict[str, dict[str, str]] = {
    "diffusion": {"diffusion_kd": "kd", "diffusion_kq": "kq", "diffusion_gamma": "gamma",
                  "diffusion_alpha": "alpha", "diffusion_truncation": "truncation",
                  "diffusion_maxiter": "maxiter", "diffusion_spectral_rank": "spectral_rank"},
    "kreciprocal": {"kr_k1": "k1", "kr_k2": "k2", "kr_lambda": "lambda_value"},
    "l2019": {"l2019_top": "top"},
    "sv": {"sv_top": "top", "sv_features": "features", "sv_max_keypoints": "max_keypoints",
           "sv_resize": "resize", "sv_matcher": "matcher", "sv_ransac": "ransac", "sv_threshold": "threshold",
           "sv_min_inliers": "min_inliers", "sv_workers": "workers"},
}

# every param a re-ranking reads: evaluation settings, not training ones
RERANK_PARAMS = ("topk", "qe_n", "dba_n", "alpha", "l2019_k", "label_data", "sv_device",
                 *(key for keys in STEP_PARAMS.values() for key in keys))


@dataclass
class RerankContext:
    """What some ranking steps need besides the vectors; rows align with the arrays searched.

    ``l2019`` needs a labelled train set's descriptors (``train_features``, ``train_labels``);
    ``sv`` needs the images (``query_ids/paths``, ``db_ids/paths``) and a ``cache_dir`` for
    local features and verified pairs.
    """

    params: Mapping[str, Any] = field(default_factory=dict)
    train_features: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    query_ids: Sequence[str] | None = None
    query_paths: Sequence[Path] | None = None
    query_bbxs: Sequence[Any] | None = None  # revisitop query boxes: sv matches inside them
    db_ids: Sequence[str] | None = None
    db_paths: Sequence[Path] | None = None
    cache_dir: Path | None = None
    device: str = "cpu"

    def step_kwargs(self, step: str) -> dict[str, Any]:
        return {kw: self.params[key] for key, kw in STEP_PARAMS.get(step, {}).items() if key in self.params}


def parse_method(method: str) -> tuple[list[str], list[str]]:
    """``(vector_steps, ranking_steps)`` of a method name; ValueError naming what is wrong."""
    steps = [s.strip() for s in str(method).split("+")]
    if steps == ["none"]:
        return [], []
    known = (*VECTOR_STEPS, *RANKING_STEPS)
    for s in steps:
        if s not in known:
            raise ValueError(f"re-ranking {method!r}: unknown step {s!r}; steps are {', '.join(known)} "
                             "(joined by +), or none")
    if len(set(steps)) != len(steps):
        raise ValueError(f"re-ranking {method!r}: a step appears twice")
    if "qe" in steps and "aqe" in steps:
        raise ValueError(f"re-ranking {method!r}: choose one of qe and aqe")
    n_vector = sum(s in VECTOR_STEPS for s in steps)
    if any(s in RANKING_STEPS for s in steps[:n_vector]):
        raise ValueError(f"re-ranking {method!r}: vector steps ({', '.join(VECTOR_STEPS)}) come before "
                         f"ranking steps ({', '.join(RANKING_STEPS)})")
    vector = steps[:n_vector]
    if vector == ["aqe", "adba"] or vector == ["qe", "adba"]:
        raise ValueError(f"re-ranking {method!r}: adba comes before query expansion")
    return vector, steps[n_vector:]


def needs_labels(method: str) -> bool:
    return "l2019" in parse_method(method)[1]


def needs_images(method: str) -> bool:
    return "sv" in parse_method(method)[1]


@dataclass
class _Database:
    """A database state (as given, or αDBA-augmented): its vectors, exact index and kNN graph, built on demand."""

    x: np.ndarray
    index: Any = None
    graphs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # a step's own database-side state (diffusion's offline stage)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), len(self.x))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self.index is None:
            self.index = flat_index(self.x)
        scores, ids = self.index.search(as_matrix(queries, "queries", self.x.shape[1]), k)
        return scores, ids.astype(np.int64, copy=False)

    def graph(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The kNN graph with at least ``width`` columns (built once, for the widest asked)."""
        have = max(self.graphs, default=0)
        if have < width:
            self.graphs = {width: knn_graph(self.x, min(width, max(len(self.x) - 1, 1)))}
            have = width
        return self.graphs[have]


@dataclass
class _Vectors:
    """The arrays a ranking step sees: searched (after vector steps) and as given."""

    queries: np.ndarray
    database: _Database
    raw_queries: np.ndarray
    raw_db: np.ndarray

    @property
    def db(self) -> np.ndarray:
        return self.database.x

    def graph(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        return self.database.graph(width)


def rerank_search(method: str, queries: np.ndarray, db: np.ndarray, k: int, *, qe_n: int = 2, dba_n: int = 2,
                  alpha: float = 3.0, context: RerankContext | None = None,
                  cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search ``db`` for ``queries`` with the chain ``method``: ``(scores, ids)``, ``(Q, min(k, N))``.

    Scores are higher-is-better in the last step's own units (cosine, diffusion mass, −distance, inliers).
    ``cache``: a dict kept by a caller that searches the same ``db`` again (the search service): the
    database's index, αDBA-augmented copy and kNN graphs are built once into it and reused.
    """
    vector, ranking = parse_method(method)
    ctx = context or RerankContext()
    db = as_matrix(db, "db")
    queries = as_matrix(queries, "queries", db.shape[1])
    cache = {} if cache is None else cache
    raw = cache.setdefault("raw", _Database(db))
    database = raw
    if "adba" in vector and dba_n > 0:
        key = ("adba", int(dba_n), float(alpha))
        if key not in cache:
            _, nb = raw.graph(dba_n)
            own = np.arange(len(db))[:, None]
            cache[key] = _Database(alpha_database_augmentation(db, dba_n, alpha,
                                                               ranks=np.concatenate([own, nb[:, :dba_n]], 1)))
        database = cache[key]
    vecs = _Vectors(queries, database, queries, db)
    k = min(int(k), len(db))
    if ("qe" in vector or "aqe" in vector) and qe_n > 0:
        _, first = database.search(vecs.queries, qe_n)
        vecs.queries = (average_query_expansion(vecs.queries, vecs.db, first, qe_n) if "qe" in vector
                        else alpha_query_expansion(vecs.queries, vecs.db, first, qe_n, alpha))
    scores, ids = database.search(vecs.queries, k)
    for step in ranking:
        scores, ids = _RANKING[step](ctx, vecs, scores, ids, k)
    return scores, ids


def _diffusion(ctx: RerankContext, vecs: _Vectors, scores: np.ndarray, ids: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    from retrieval.rerank.diffusion import diffusion_database, diffusion_query

    kwargs = ctx.step_kwargs("diffusion")
    kq, gamma = int(kwargs.pop("kq", 10)), float(kwargs.get("gamma", 3.0))
    key = ("diffusion", tuple(sorted(kwargs.items())))
    database = vecs.database
    if key not in database.extras:  # the offline stage, once per database state and settings
        database.extras[key] = diffusion_database(database.x, graph=vecs.graph(int(kwargs.get("kd", 50))),
                                                  **kwargs)
    n = len(database.x)
    q_scores, q_ids = database.search(vecs.queries, max(min(k, n), min(kq, n)))
    return diffusion_query(database.extras[key], q_scores, q_ids, k, kq=kq, gamma=gamma)


def _kreciprocal(ctx: RerankContext, vecs: _Vectors, scores: np.ndarray, ids: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    from retrieval.rerank.kreciprocal import k_reciprocal_rerank

    kwargs = ctx.step_kwargs("kreciprocal")
    return k_reciprocal_rerank(vecs.queries, vecs.db, k, graph=vecs.graph(int(kwargs.get("k1", 20)) + 1),
                               **kwargs)


def _l2019(ctx: RerankContext, vecs: _Vectors, scores: np.ndarray, ids: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    if ctx.train_features is None or ctx.train_labels is None:
        raise ValueError("l2019 re-ranking needs a labelled train set's features (label_data); none given")
    from retrieval.recognition import knn_vote
    from retrieval.rerank.l2019 import l2019_rerank

    vote_k = int(ctx.params.get("l2019_k", 3))
    # Votes compare like with like: the train descriptors are not expanded, so neither are these.
    q_labels, q_conf = knn_vote(vecs.raw_queries, ctx.train_features, ctx.train_labels, vote_k)
    db_labels, db_conf = knn_vote(vecs.raw_db, ctx.train_features, ctx.train_labels, vote_k)
    return l2019_rerank(scores, ids, q_labels, q_conf, db_labels, db_conf, **ctx.step_kwargs("l2019"))


def _sv(ctx: RerankContext, vecs: _Vectors, scores: np.ndarray, ids: np.ndarray,
        k: int) -> tuple[np.ndarray, np.ndarray]:
    if ctx.query_paths is None or ctx.db_paths is None or ctx.cache_dir is None:
        raise ValueError("sv re-ranking needs the query and database images and a cache folder; none given")
    from retrieval.rerank.sv import sv_rerank

    return sv_rerank(scores, ids, list(ctx.query_ids or []), list(ctx.query_paths), list(ctx.db_ids or []),
                     list(ctx.db_paths), cache_dir=Path(ctx.cache_dir), device=ctx.device,
                     query_bbxs=ctx.query_bbxs, **ctx.step_kwargs("sv"))


_RANKING = {"diffusion": _diffusion, "kreciprocal": _kreciprocal, "l2019": _l2019, "sv": _sv}
