"""Evaluation: search + re-rank + metrics on features, and the files a finished evaluation leaves.

`rank_dataset` is the one path from in-memory query / database descriptors to dataset-indexed
rankings (the trainer's per-epoch validation, and the chains that need the whole database);
`evaluate_features` (the runner's ``evaluate`` verb) searches ``none`` / ``qe`` / ``aqe`` streamed,
exactly and with the same neighbours, so a validation mAP is the number ``evaluate`` prints.

Memory at scale: a method whose steps only need the database's top-k (``none``, ``qe``, ``aqe``)
is searched without loading the database: exactly, reading the features file in blocks
(`retrieval.search.knn_file`; memory: one block + the ``(Q, topk)`` results), or in a saved
FAISS index (param ``index``, built by the ``index`` verb). αQE reads only the rows of the
queries' top-n back from the file. Chains with ``adba``, ``diffusion``, ``kreciprocal``,
``l2019`` or ``sv`` need the whole database in memory (4·D bytes a row) and its kNN graph,
so they load it as before. ``topk`` (default: the whole database when Q·N ≤ 10⁸, the
revisitop protocol; 100 for GLDv2's mAP@100) bounds every ranking. A whitening (param
``whiten``) is applied to queries, database blocks and label-set rows as they are read.

Beside the revisitop mAP / mP@k, every evaluation scores GUIE's mP@5 (`guie_metrics`; positives
= the Medium protocol's, junk ignored), per domain when the dataset has domains.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.dataset import RetrievalDataset
from retrieval.features import FeaturesReader, read_features
from retrieval.index import SavedIndex, check_ids
from retrieval.metrics import guie_mp_at_k, map_at_k, revisitop_map
from retrieval.postprocess import Whitening
from retrieval.report import append_results_csv, summary_row, write_json, write_ranked_html
from retrieval.rerank import RerankContext, alpha_query_expansion, average_query_expansion, parse_method, rerank_search
from retrieval.search import knn_file, write_ranks

logger = logging.getLogger(__name__)

GUIE_K = 5  # the Google Universal Image Embedding challenge's k (mP@5)
# evaluation settings an experiment may set (never part of a training setting's name)
SEARCH_PARAMS = ("topk", "index", "nprobe", "efsearch", "k_factor", "whiten", "search_block", "search_batch")
FULL_RANKING_MAX = 10**8  # Q·N ranks kept by default (1.2 GB of ranks + scores); beyond, the top TRUNCATED_TOPK
TRUNCATED_TOPK = 1000
GLDV2_K = 100  # GLDv2's mAP@100
STREAMED_STEPS = {"qe", "aqe"}  # steps that need only the database's top-k rows


def align_features(ids: Sequence[str], wanted: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a features file for ``wanted`` ids: ``(rows, present)``; ids without features are absent."""
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    unknown = set(ids) - set(wanted)
    if unknown:
        raise ValueError(f"features hold {len(unknown)} ids not in the dataset, e.g. {sorted(unknown)[:3]}")
    rows = np.array([row_of.get(w, -1) for w in wanted], dtype=np.int64)
    return rows, rows >= 0


def rank_dataset(q_feats: np.ndarray, q_ok: np.ndarray, db_feats: np.ndarray, db_ok: np.ndarray,
                 method: str = "none", k: int | None = None, *, qe_n: int = 2, dba_n: int = 2,
                 alpha: float = 3.0, context: RerankContext | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank the database for every query: ``(ranks, scores)`` indexed by dataset query / db rows.

    ``q_feats`` / ``db_feats`` hold the rows of the present images only (``q_ok`` / ``db_ok``
    mark which dataset rows they are), and so do the image lists of ``context``. Queries without
    features rank nothing (-1, AP 0).
    """
    if not db_ok.any():
        raise ValueError("no database image has features")
    db_index = np.flatnonzero(db_ok)  # dataset db row of each searchable row
    k = int(k or len(db_index))
    scores_q, ranks_q = rerank_search(method, q_feats, db_feats, k, qe_n=qe_n, dba_n=dba_n, alpha=alpha,
                                      context=context)
    ranks = np.full((len(q_ok), ranks_q.shape[1]), -1, dtype=np.int64)
    scores = np.full(ranks.shape, np.nan, dtype=np.float32)
    ranks[q_ok] = np.where(ranks_q >= 0, db_index[ranks_q], -1)
    scores[q_ok] = scores_q
    return ranks, scores


@dataclass
class FeaturePair:
    """A dataset's query and database descriptors as searched: present rows only, and the context."""

    q_feats: np.ndarray
    q_ok: np.ndarray  # (n_queries,) which dataset queries have features
    db_feats: np.ndarray
    db_ok: np.ndarray
    context: RerankContext

    def rank(self, method: str, params: dict[str, Any], k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`rank_dataset` with the search params of an experiment (``topk``, ``qe_n``, ``dba_n``, ``alpha``)."""
        return rank_dataset(self.q_feats, self.q_ok, self.db_feats, self.db_ok, method, k or params.get("topk"),
                            qe_n=int(params.get("qe_n", 2)), dba_n=int(params.get("dba_n", 2)),
                            alpha=float(params.get("alpha", 3.0)), context=self.context)


def load_pair(ds: RetrievalDataset, query_features: str | os.PathLike, db_features: str | os.PathLike,
              context: RerankContext, whitening: Whitening | None = None) -> FeaturePair:
    """Read a features pair and align it with ``ds``; the context gets the image lists of the present rows."""
    q_ids, q_feats, _ = read_features(query_features)
    db_ids, db_feats, _ = read_features(db_features)
    q_rows, q_ok = align_features(q_ids, ds.queries.ids)
    db_rows, db_ok = align_features(db_ids, ds.db.ids)
    q_present, db_present = np.flatnonzero(q_ok), np.flatnonzero(db_ok)
    context = replace(context, query_ids=[ds.queries.ids[i] for i in q_present],
                      query_paths=[ds.queries.paths[i] for i in q_present],
                      query_bbxs=[ds.queries.bbx(i) for i in q_present],
                      db_ids=[ds.db.ids[i] for i in db_present], db_paths=[ds.db.paths[i] for i in db_present])
    q_feats, db_feats = q_feats[q_rows[q_ok]], db_feats[db_rows[db_ok]]
    if whitening is not None:
        q_feats, db_feats = whitening(q_feats), whitening(db_feats)
        if context.train_features is not None:
            context = replace(context, train_features=whitening(context.train_features))
    return FeaturePair(q_feats, q_ok, db_feats, db_ok, context)


def default_topk(ds: RetrievalDataset, n_db: int, topk: int | None = None) -> int:
    """Results kept per query: ``topk`` when set; GLDv2: 100; else the whole database when Q·N ≤ 10⁸."""
    if topk:
        return max(1, min(int(topk), n_db))
    if ds.protocol == "gldv2":
        return min(GLDV2_K, n_db)
    if len(ds.queries) * n_db <= FULL_RANKING_MAX:
        return n_db
    logger.warning("%s: %d queries × %d images is too many to rank in full; keeping the top %d (set topk)",
                   ds.name, len(ds.queries), n_db, TRUNCATED_TOPK)
    return min(TRUNCATED_TOPK, n_db)


def streams(method: str) -> bool:
    """Whether ``method`` runs on the database's top-k only (no whole-database state)."""
    vector, ranking = parse_method(method)
    return not ranking and set(vector) <= STREAMED_STEPS


@dataclass
class StreamedDatabase:
    """A database features file searched without loading it: in blocks (exact) or in a saved index.

    Result ids are rows of the file; ``whitening`` maps rows as they are read (a saved index
    holds rows already whitened the same way).
    """

    reader: FeaturesReader
    index: SavedIndex | None = None
    whitening: Whitening | None = None
    block_rows: int = 65536
    batch: int = 16384

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            return self.index.search(queries, k, self.batch)
        return knn_file(queries, self.reader, k, block_rows=self.block_rows, transform=self.whitening)

    def rows(self, index: np.ndarray) -> np.ndarray:
        x = self.reader.rows(index)
        return self.whitening(x) if self.whitening is not None else x

    def describe(self) -> str:
        if self.index is not None:
            return f"index {self.index.describe()}"
        return f"exact, {self.block_rows} rows per block"


def rank_streamed(method: str, queries: np.ndarray, database: StreamedDatabase, k: int, *, qe_n: int = 2,
                  alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """``none`` / ``qe`` / ``aqe`` on a `StreamedDatabase`: ``(scores, file rows)``, ``(Q, k)``.

    Query expansion as in `rerank_search`: the top ``qe_n`` rows of each query are read back
    (only those) and expand it, then the expanded queries are searched.
    """
    vector, _ = parse_method(method)
    if vector and qe_n > 0:
        _, first = database.search(queries, qe_n)
        if (first < 0).any():
            raise ValueError(f"{method}: an index returned fewer than {qe_n} neighbours for some query; raise nprobe")
        rows, local = np.unique(first, return_inverse=True)
        neighbours = database.rows(rows)
        local = local.reshape(first.shape)
        queries = (average_query_expansion(queries, neighbours, local, qe_n) if "qe" in vector
                   else alpha_query_expansion(queries, neighbours, local, qe_n, alpha))
    return database.search(queries, k)


def score_rankings(ds: RetrievalDataset, ranks: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, per-query AP)`` of dataset-indexed ranks by the dataset's protocol."""
    if ds.protocol == "gldv2":
        m = map_at_k(ranks, [list(g["easy"]) + list(g.get("hard", [])) for g in ds.gnd], GLDV2_K)
        return {"gldv2": {f"map@{GLDV2_K}": m[f"map@{GLDV2_K}"]}}, {"gldv2": m["aps"]}
    metrics = revisitop_map(ranks, ds.gnd)
    return ({proto: {k_: v for k_, v in m.items() if k_ != "aps"} for proto, m in metrics.items()},
            {proto: m["aps"] for proto, m in metrics.items()})


def guie_metrics(ranks: np.ndarray, gnd: Sequence[dict], query_ids: Sequence[str] = (),
                 domains: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"mp@5": ..., ["domains": {domain: {"n_queries", "mp@5", "map": {easy, medium, hard}}}]}``.

    Positives are a query's easy + hard images, its junk (the query itself in leave-one-out sets)
    is left out of the ranking; ``domains`` (image id → domain) splits the queries by domain.
    """
    positives = [[*g["easy"], *g.get("hard", ())] for g in gnd]
    junk = [list(g.get("junk", ())) for g in gnd]
    out: dict[str, Any] = {"mp@5": guie_mp_at_k(ranks, positives, GUIE_K, ignore=junk)}
    query_domains = [domains.get(q) for q in query_ids] if domains else []
    names = sorted({d for d in query_domains if d is not None})
    if names:
        out["domains"] = {}
        for name in names:
            rows = [i for i, d in enumerate(query_domains) if d == name]
            maps = revisitop_map(ranks[rows], [gnd[i] for i in rows])
            out["domains"][name] = {
                "n_queries": len(rows),
                "mp@5": guie_mp_at_k(ranks[rows], [positives[i] for i in rows], GUIE_K, ignore=[junk[i] for i in rows]),
                "map": {proto: float(m["map"]) for proto, m in maps.items()}}
    return out


def validation_map(ds: RetrievalDataset, q_rows: np.ndarray, q_feats: np.ndarray, db_rows: np.ndarray,
                   db_feats: np.ndarray, method: str = "none") -> dict[str, float]:
    """mAP per revisitop protocol and GUIE ``mp@5`` of in-memory descriptors (rows = dataset rows described)."""
    q_ok = np.zeros(len(ds.queries), bool)
    q_ok[q_rows] = True
    db_ok = np.zeros(len(ds.db), bool)
    db_ok[db_rows] = True
    q_order, db_order = np.argsort(q_rows), np.argsort(db_rows)
    ranks, _ = rank_dataset(q_feats[q_order], q_ok, db_feats[db_order], db_ok, method)
    out = {proto: float(m["map"]) for proto, m in revisitop_map(ranks, ds.gnd).items()}
    out["mp@5"] = float(guie_metrics(ranks, ds.gnd)["mp@5"])
    return out


def evaluate_features(ds: RetrievalDataset, query_features: str | os.PathLike, db_features: str | os.PathLike,
                      methods: Sequence[str], out_root: str | os.PathLike, *, feature_kind: str,
                      experiment: str, setting: str, results_csv: str | os.PathLike,
                      params: dict[str, Any] | None = None, checkpoint: str | None = None,
                      html_queries: int = 10, context: RerankContext | None = None,
                      index: SavedIndex | None = None, whitening: Whitening | None = None) -> list[dict[str, Any]]:
    """Evaluate one features pair with each re-ranking method.

    For each method writes ``<out_root>/<dataset>_<feature_kind>_<method>/{ranks.h5, results.json,
    ranked.html}`` and appends a row to ``results_csv``; returns the results dicts. ``context``
    carries what ranking steps need beyond the vectors (train labels, a cache folder); the
    image lists of the searched rows are filled in here. ``index`` (a saved index of the
    database file's rows) serves the streamed methods; ``whitening`` maps every descriptor.
    """
    params = params or {}
    context = context or RerankContext(params=params)
    q_ids, q_all, _ = read_features(query_features)
    q_rows, q_ok = align_features(q_ids, ds.queries.ids)
    queries = q_all[q_rows[q_ok]]
    del q_all
    if whitening is not None:
        queries = whitening(queries)
    qe_n, alpha = int(params.get("qe_n", 2)), float(params.get("alpha", 3.0))
    pair: FeaturePair | None = None
    with FeaturesReader(db_features) as reader:
        file_rows, db_ok = align_features(reader.ids, ds.db.ids)
        dataset_row = np.full(len(reader), -1, np.int64)  # dataset db row of each file row
        dataset_row[file_rows[db_ok]] = np.flatnonzero(db_ok)
        if not db_ok.any():
            raise ValueError(f"{db_features}: no database image has features")
        if index is not None:
            check_ids(index, reader.ids, db_features)
        database = StreamedDatabase(reader, index, whitening, int(params.get("search_block") or 65536),
                                    int(params.get("search_batch") or 16384))
        k = default_topk(ds, int(db_ok.sum()), params.get("topk"))
        results = []
        for method in methods:
            t0 = time.perf_counter()
            if streams(method):
                searched = database.describe()
                scores_q, rows_q = rank_streamed(method, queries, database, k, qe_n=qe_n, alpha=alpha)
                ranks = np.full((len(ds.queries), rows_q.shape[1]), -1, np.int64)
                scores = np.full(ranks.shape, np.nan, np.float32)
                ranks[q_ok] = np.where(rows_q >= 0, dataset_row[np.maximum(rows_q, 0)], -1)
                scores[q_ok] = scores_q
            else:
                if pair is None:  # the chain needs the whole database (αDBA, graphs, labels, images)
                    logger.info("%s needs the whole database in memory: reading %s (%d × %d)", method, db_features,
                                len(reader), reader.dim)
                    pair = load_pair(ds, query_features, db_features, context, whitening)
                searched = "exact, whole database in memory"
                ranks, scores = pair.rank(method, params, k)
            seconds = time.perf_counter() - t0
            out_dir = Path(out_root) / f"{ds.name}_{feature_kind}_{method}"
            write_ranks(out_dir / "ranks.h5", ds.queries.ids, ds.db.ids, ranks, scores)
            res: dict[str, Any] = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "experiment": experiment, "setting": setting,
                "dataset": ds.name, "features": feature_kind, "rerank": method, "n_queries": len(ds.queries),
                "n_db": len(ds.db), "n_queries_missing": int((~q_ok).sum()),
                "n_db_missing": int((~db_ok).sum()), "topk": int(ranks.shape[1]), "search": searched,
                "whiten": whitening.name if whitening is not None else None,
                "search_seconds": round(seconds, 4),
                "seconds_per_query": round(seconds / max(int(q_ok.sum()), 1), 6), "checkpoint": checkpoint,
                "params": params,
            }
            if ds.gnd:
                res["metrics"], res["per_query_ap"] = score_rankings(ds, ranks)
                res.update(guie_metrics(ranks, ds.gnd, ds.queries.ids, ds.domains))
            write_json(out_dir / "results.json", res)
            if html_queries > 0 and not ds.features:  # a features-only benchmark has no images to show
                write_ranked_html(out_dir / "ranked.html", ds, ranks, scores, n_queries=html_queries,
                                  title=f"{experiment}/{setting}: {ds.name}, {feature_kind}, {method}")
            append_results_csv(results_csv, summary_row(res))
            logger.info("%s: %s, mP@5 %s", out_dir, {p_: round(m.get("map", m.get(f"map@{GLDV2_K}", np.nan)), 4)
                                           for p_, m in res.get("metrics", {}).items()}, res.get("mp@5"))
            results.append(res)
    return results
