"""Retrieval metrics for instance-level image retrieval benchmarks.

Sources of the formulas (each function reproduces the published reference):

- ``revisitop_map``: Radenovic et al., "Revisiting Oxford and Paris" (CVPR 2018), ``compute_map`` in
  github.com/filipradenovic/revisitop python/evaluate.py (same as cirtorch/utils/evaluate.py).
- ``gldv2_map_at_k``: Google Landmark Retrieval 2019/2020 (Kaggle) mAP@100, reference scorer
  ``MeanAveragePrecision`` in tensorflow/models research/delf/.../google_landmarks_dataset/metrics.py;
  ``map_at_k`` is the same number from a ranks array and per-query positives (what evaluation holds).
- ``guie_mp_at_k``: Google Universal Image Embedding challenge (Kaggle 2022) mP@5, reference scorer
  ``CalibratedPrecision`` in google-research/google-research universal_embedding_challenge/metrics.py.
- ``gap``: Google Landmark Recognition 2019/2020 (Kaggle) Global Average Precision (micro-AP, Perronnin et al.,
  CVPR 2009), reference scorer ``GlobalAveragePrecision`` in the same DELF metrics.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["revisitop_map", "gldv2_map_at_k", "map_at_k", "guie_mp_at_k", "gap"]

_PROTOCOLS = ("easy", "medium", "hard")


def _as_index_array(values: Any) -> np.ndarray:
    """Flatten a list/array of db indices into a 1-D int64 array (empty lists are fine)."""
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _validate_ranks(ranks: Any, n_queries: int) -> np.ndarray:
    arr = np.asarray(ranks)
    if arr.ndim != 2:
        raise ValueError(f"ranks must be a 2-D (n_queries, n) array, got ndim={arr.ndim}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"ranks must hold integer db indices, got dtype {arr.dtype}")
    if arr.shape[0] != n_queries:
        raise ValueError(
            f"ranks is query-major: expected {n_queries} rows (one per query), got shape {arr.shape}"
        )
    return arr


def _ap_and_precisions(
    pos_mask: np.ndarray, ign_mask: np.ndarray, n_positives: int, kappas: Sequence[int]
) -> tuple[float, np.ndarray]:
    """AP (trapezoidal, revisitop) and precision@kappas of one query's ranked list.

    ``pos_mask``/``ign_mask`` flag, per ranked position, positives and ignored images.
    """
    pos = np.flatnonzero(pos_mask)
    ign = np.flatnonzero(ign_mask)
    # Remove ignored images: each positive moves up by the number of ignored images strictly before it.
    if ign.size:
        pos = pos - np.searchsorted(ign, pos, side="left")
    if pos.size == 0:
        # Truncated list without any retrieved positive (revisitop would fail on max() of an empty array).
        return 0.0, np.zeros(len(kappas))
    j = np.arange(pos.size, dtype=np.float64)
    r = pos.astype(np.float64)
    precision_0 = np.divide(j, r, out=np.ones_like(r), where=r > 0)  # 1 at r == 0
    precision_1 = (j + 1.0) / (r + 1.0)
    ap = float(np.sum((precision_0 + precision_1) / 2.0) / n_positives)
    pos1 = pos + 1  # 1-based
    last = int(pos1[-1])  # positions are sorted, so this is max(pos)
    prs = np.empty(len(kappas))
    for t, kappa in enumerate(kappas):
        kq = min(last, kappa)
        prs[t] = np.count_nonzero(pos1 <= kq) / kq
    return ap, prs


def revisitop_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, Any]]:
    """Revisited Oxford/Paris mAP and mP@k for the Easy, Medium and Hard protocols.

    Args:
        ranks: (n_queries, n) integer array, QUERY-MAJOR (row i = query i's ranked db indices, best
            first; the transpose of revisitop's db x queries layout). ``n`` may be the whole database or
            a truncated top-n.
        gnd: one dict per query with ``easy``, ``hard`` and ``junk`` lists of db indices (``cfg["gnd"]``
            of revisitop's ``gnd_r{oxford5k,paris6k}.pkl``); a missing ``junk`` is treated as empty.
        kappas: cut-offs for mean precision at k.

    Returns:
        ``{"easy"|"medium"|"hard": {"map": float, "mp@<k>": float per kappa, "aps": ndarray}}``, all as
        fractions in [0, 1]. ``aps`` holds per-query AP with NaN for queries that have no positives in
        that protocol; those queries are left out of every mean (NaN means if no query is left).

    Protocols: Easy = easy positives, junk + hard ignored; Medium = easy + hard positives, junk ignored;
    Hard = hard positives, junk + easy ignored. Ignored images are removed from the ranking. AP uses
    revisitop's trapezoidal rule and divides by the number of positives in ``gnd`` (positives missing
    from a truncated list add nothing). mP@k reproduces revisitop exactly, including its normalisation
    by ``min(position of last retrieved positive, k)`` instead of ``k``. Deviation (undefined in
    revisitop, which crashes): a query with positives but none retrieved in a truncated list gets
    AP = 0 and P@k = 0.
    """
    if isinstance(gnd, Mapping):
        raise ValueError("gnd must be the per-query list (cfg['gnd']), not the whole revisitop cfg dict")
    n_queries = len(gnd)
    arr = _validate_ranks(ranks, n_queries)
    kappas = [int(k) for k in kappas]
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be positive integers, got {kappas}")

    aps = {p: np.full(n_queries, np.nan) for p in _PROTOCOLS}
    prs = {p: np.full((n_queries, len(kappas)), np.nan) for p in _PROTOCOLS}
    for i, g in enumerate(gnd):
        try:
            easy, hard = _as_index_array(g["easy"]), _as_index_array(g["hard"])
        except KeyError as exc:
            raise ValueError(f"gnd[{i}] lacks key {exc.args[0]!r} (needs 'easy', 'hard', 'junk')") from None
        junk = _as_index_array(g.get("junk", ()))
        row = arr[i]
        m_easy, m_hard, m_junk = np.isin(row, easy), np.isin(row, hard), np.isin(row, junk)
        setups = {
            "easy": (m_easy, m_junk | m_hard, easy.size),
            "medium": (m_easy | m_hard, m_junk, easy.size + hard.size),
            "hard": (m_hard, m_junk | m_easy, hard.size),
        }
        for proto, (pos_mask, ign_mask, n_pos) in setups.items():
            if n_pos == 0:
                continue  # no positives: skipped from the averages (NaN)
            aps[proto][i], prs[proto][i] = _ap_and_precisions(pos_mask, ign_mask, n_pos, kappas)

    out: dict[str, dict[str, Any]] = {}
    for proto in _PROTOCOLS:
        valid = ~np.isnan(aps[proto])
        n_valid = int(valid.sum())
        res: dict[str, Any] = {"map": float(aps[proto][valid].sum() / n_valid) if n_valid else float("nan")}
        for t, kappa in enumerate(kappas):
            res[f"mp@{kappa}"] = float(prs[proto][valid, t].sum() / n_valid) if n_valid else float("nan")
        res["aps"] = aps[proto]
        out[proto] = res
    return out


def gldv2_map_at_k(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Iterable[str]], k: int = 100
) -> float:
    """Google Landmark Retrieval 2019/2020 mAP@k (k=100 on Kaggle).

    mAP@k = 1/Q sum_q 1/min(m_q, k) sum_{i<=min(n_q, k)} P_q(i) rel_q(i).

    Q counts the queries of ``solution`` with at least one relevant id; solution queries with an empty
    relevant set, and prediction queries absent from ``solution``, are ignored (the DELF scorer raises on
    the latter instead). Solution queries absent from ``predictions`` score 0. A repeated predicted id
    keeps its rank position but only its first occurrence can be relevant (as in the DELF scorer).
    Returns NaN if no query has a relevant id.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    number: dict[str, int] = {}  # every id seen -> an index, so the ids become `map_at_k`'s arrays

    def indices(ids: Iterable[str]) -> list[int]:
        return [number.setdefault(i, len(number)) for i in ids]

    queries = list(solution)
    positives = [indices(set(solution[q])) for q in queries]
    predicted = [indices(list(predictions.get(q) or ())[:k]) for q in queries]
    ranks = np.full((len(queries), max([1, *map(len, predicted)])), -1, np.int64)  # -1: no prediction there
    for row, pred in zip(ranks, predicted, strict=True):
        row[:len(pred)] = pred
    return map_at_k(ranks, positives, k)[f"map@{k}"]


def map_at_k(ranks: np.ndarray, positives: Sequence[Iterable[int]], k: int = 100) -> dict[str, Any]:
    """Google Landmark Retrieval mAP@k on arrays (`gldv2_map_at_k` is its id-based front): ``ranks`` (Q, n)
    db indices, best first (-1 = none), ``positives[q]`` the relevant db indices of query q.

    AP@k(q) = 1/min(m_q, k) · Σ_{i ≤ k} P_q(i)·rel_q(i); a repeated index counts once (its first place).
    Returns ``{"map@<k>": mean over queries with m_q > 0 (NaN if none), "aps": per-query AP@k, NaN
    where the query has no positives}``.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    arr = _validate_ranks(ranks, len(positives))[:, :k]
    aps = np.full(len(positives), np.nan)
    for q, (row, pos) in enumerate(zip(arr, positives, strict=True)):
        pos_arr = np.unique(_as_index_array(list(pos)))
        if pos_arr.size == 0:
            continue
        first = np.zeros(len(row), bool)
        first[np.unique(row, return_index=True)[1]] = True  # later repeats are not relevant
        rel = np.isin(row, pos_arr) & first & (row >= 0)
        hits = np.flatnonzero(rel)
        aps[q] = float(np.sum(np.arange(1, hits.size + 1) / (hits + 1)) / min(pos_arr.size, k))
    valid = ~np.isnan(aps)
    return {f"map@{k}": float(aps[valid].mean()) if valid.any() else float("nan"), "aps": aps}


def guie_mp_at_k(ranks: np.ndarray, positives: Sequence[Iterable[int]], k: int = 5,
                 ignore: Sequence[Iterable[int]] | None = None) -> float:
    """Google Universal Image Embedding (Kaggle 2022) mP@k (k=5).

    mP@k = 1/Q sum_q 1/min(n_q, k) sum_{j<=min(n_q, k)} rel_q(j), i.e. precision at min(n_q, k), where
    n_q is the number of relevant db images of query q. As in Google's reference scorer
    (``CalibratedPrecision``), a query with n_q < k is judged on its top n_q results only.

    ``ranks`` is a (Q, n) integer array of db indices, query-major; rows shorter than min(n_q, k) count
    the missing results as misses, and a repeated index counts once. Queries with n_q = 0 are skipped
    (the reference raises); returns NaN if every query is skipped. ``ignore`` (per query, e.g. the
    revisitop ``junk`` lists: the query itself in a leave-one-out set) removes those db indices from the
    ranking first, as revisitop does for junk; GUIE's index never holds the query, so it had none.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    arr = _validate_ranks(ranks, len(positives))
    if ignore is not None and len(ignore) != len(positives):
        raise ValueError(f"ignore has {len(ignore)} entries for {len(positives)} queries")
    total = 0.0
    n_queries = 0
    for q, (row, pos) in enumerate(zip(arr, positives, strict=True)):
        pos_arr = np.unique(_as_index_array(list(pos)))
        if pos_arr.size == 0:
            continue
        n_queries += 1
        m = min(pos_arr.size, k)
        if ignore is not None:
            row = row[~np.isin(row, _as_index_array(list(ignore[q])))]
        total += np.intersect1d(row[:m], pos_arr).size / m
    return total / n_queries if n_queries else float("nan")


def _no_landmark(label: Any, non_landmark: Any) -> bool:
    """None, "", NaN or the ``non_landmark`` sentinel: no landmark (as a truth) or no prediction."""
    if label is None or (isinstance(label, str) and not label):
        return True
    if isinstance(label, (float, np.floating)) and np.isnan(label):
        return True
    return non_landmark is not None and label == non_landmark


def gap(pred_labels: Sequence[Any], confidences: Sequence[float], true_labels: Sequence[Any], *,
        non_landmark: Any = None) -> float:
    """Google Landmark Recognition Global Average Precision (micro-AP over all queries).

    GAP = 1/M sum_{i<=N} P(i) rel(i): the N predictions of all queries sorted by confidence,
    descending; P(i) = precision of the first i predictions; rel(i) = 1 when prediction i is the
    query's true landmark; M = number of queries whose true label is a landmark. Tied confidences
    keep input order (the reference breaks ties by test id: pass queries sorted by id to match it).

    A label that is None, "", NaN or equal to ``non_landmark`` means "no landmark": as a true label
    the query is left out of M, and any prediction for it counts as wrong in the ranking; as a
    predicted label it means no prediction (left out of the ranking, its confidence ignored).
    Returns NaN if no query has a landmark.
    """
    pred, true = list(pred_labels), list(true_labels)
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    if not len(pred) == len(conf) == len(true):
        raise ValueError(f"gap: {len(pred)} predictions, {len(conf)} confidences and {len(true)} true labels; "
                         "expected one of each per query")
    is_landmark = [not _no_landmark(t, non_landmark) for t in true]
    n_landmarks = sum(is_landmark)
    if n_landmarks == 0:
        return float("nan")
    predicted = np.array([not _no_landmark(p, non_landmark) for p in pred], dtype=bool)
    idx = np.flatnonzero(predicted)
    if np.isnan(conf[idx]).any():
        raise ValueError("gap: a prediction has a NaN confidence")
    order = idx[np.argsort(-conf[idx], kind="stable")]
    rel = np.array([is_landmark[i] and pred[i] == true[i] for i in order], dtype=np.float64)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float(np.sum(precision * rel) / n_landmarks)
