"""Landmark2019 discriminative re-ranking: the sort step and the insert step.

Ozaki & Yokoo, arXiv 1906.04087 §4 (extended as the two-stage re-ranking of Yokoo et al., CVPRW
2020, arXiv 2003.11211), as the authors' ``retrieval_reranking.py`` does it:

1. predict the landmark of every query and every index image by soft kNN voting (k = 3) against
   a labelled train set (`retrieval.recognition.knn_vote`);
2. sort step: within the query's top-``top`` (100) results, the images predicted with the query's
   label move ahead, keeping their relative order; the others follow in their order;
3. insert step: index images predicted with the query's label but not in its top-``top`` go right
   after the moved ones, by their own vote confidence, highest first; the list is cut to ``top``.

The authors' code collects the inserted images in a Python ``set``, so their order there is
arbitrary; here they come surest first, which is deterministic (ties: lower index first).
To keep a ranking of the input's width ``k``, the entries of the original list not in the new
top follow it in their original order. Scores stay comparable within a row: with
``Δ = max - min + 1`` over the row's original scores, moved images score ``s + 2Δ``, inserted ones
``min + Δ`` and all others keep ``s``, so every row stays non-increasing.
"""

from __future__ import annotations

import numpy as np

from retrieval.recognition import no_label

__all__ = ["l2019_rerank"]

_BLOCK = 2048  # queries re-ranked at once: bounds the (block, top, top) membership test


def _encode(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vocabulary, codes)``: codes index the sorted distinct labels, -1 where `no_label`."""
    missing = no_label(labels)
    vocab, inverse = np.unique(labels[~missing], return_inverse=True)
    codes = np.full(len(labels), -1, np.int64)
    codes[~missing] = inverse.reshape(-1)
    return vocab, codes


def _lookup(vocab: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Codes of ``labels`` in ``vocab``; -1 for `no_label` and for labels no index image has."""
    missing = no_label(labels)
    codes = np.full(len(labels), -1, np.int64)
    if len(vocab) == 0 or missing.all():
        return codes
    present = labels[~missing]
    at = np.minimum(np.searchsorted(vocab, present), len(vocab) - 1)
    codes[~missing] = np.where(vocab[at] == present, at, -1)
    return codes


def _first_unique(ids: np.ndarray, scores: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first occurrences of its valid ids, in order, cut or padded (-1 / -inf) to ``width``."""
    order = np.argsort(ids, axis=1, kind="stable")  # stable: a repeated id's first occurrence sorts first
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    drop_sorted = sorted_ids < 0
    drop_sorted[:, 1:] |= sorted_ids[:, 1:] == sorted_ids[:, :-1]
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=1)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :width]
    out_ids, out_scores = np.take_along_axis(ids, keep, axis=1), np.take_along_axis(scores, keep, axis=1)
    gone = np.take_along_axis(drop, keep, axis=1)
    out_ids[gone], out_scores[gone] = -1, -np.inf
    return out_ids, out_scores


def _rerank_block(scores: np.ndarray, ids: np.ndarray, q_codes: np.ndarray, db_codes: np.ndarray,
                  by_label: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  top: int) -> tuple[np.ndarray, np.ndarray]:
    k = ids.shape[1]
    width = min(top, k)
    valid = ids >= 0
    win, win_valid, win_scores = ids[:, :width], valid[:, :width], scores[:, :width]
    labelled = q_codes >= 0
    win_codes = np.where(win_valid, db_codes[np.where(win_valid, win, 0)], -1)
    positive = win_valid & labelled[:, None] & (win_codes == q_codes[:, None])

    # Insert candidates: the first `width` of the label's list suffice, at most the window's positives are in it.
    code = np.where(labelled, q_codes, 0)
    at = starts[code][:, None] + np.arange(width)
    cand_ok = labelled[:, None] & (at < ends[code][:, None])
    cand = np.where(cand_ok, by_label[np.minimum(at, len(by_label) - 1)], -1)
    cand_ok &= ~(cand[:, :, None] == np.where(positive, win, -2)[:, None, :]).any(axis=2)

    # Row-wise tier offsets keep the new order non-increasing in score (see the module docstring).
    finite = valid & np.isfinite(scores)
    lo = np.where(finite, scores, np.inf).min(axis=1, initial=np.inf)
    hi = np.where(finite, scores, -np.inf).max(axis=1, initial=-np.inf)
    lo, hi = np.where(np.isfinite(lo), lo, 0), np.where(np.isfinite(hi), hi, 0)
    delta = (hi - lo + 1)[:, None]

    # Stable sort by tier: 0 moved (window order), 1 inserted (confidence order), 2 the rest, 3 none.
    tier = np.concatenate([np.where(positive, 0, np.where(win_valid, 2, 3)), np.where(cand_ok, 1, 3)], axis=1)
    entries = np.concatenate([win, cand], axis=1)
    entry_scores = np.concatenate([np.where(positive, win_scores + 2 * delta, win_scores),
                                   np.broadcast_to(lo[:, None] + delta, cand.shape)], axis=1).astype(scores.dtype)
    new = np.argsort(tier, axis=1, kind="stable")[:, :width]
    new_ids = np.where(np.take_along_axis(tier, new, axis=1) < 3, np.take_along_axis(entries, new, axis=1), -1)
    new_scores = np.take_along_axis(entry_scores, new, axis=1)
    return _first_unique(np.concatenate([new_ids, ids], axis=1), np.concatenate([new_scores, scores], axis=1), k)


def l2019_rerank(scores: np.ndarray, ids: np.ndarray, query_labels: np.ndarray, query_conf: np.ndarray,
                 db_labels: np.ndarray, db_conf: np.ndarray, *, top: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank ``(scores, ids)`` (``(Q, k)``, ids into the index, -1 = none) by predicted landmark labels.

    ``query_labels``/``query_conf`` (``(Q,)``) and ``db_labels``/``db_conf`` (``(N,)``) are the
    predictions of `knn_vote`. A query or index image without a prediction (label -1 in an integer
    array, None, "" or NaN otherwise) is never moved nor inserted; neither is a query whose label
    no index image has. ``query_conf`` is accepted for symmetry with the pipeline's predictions:
    the rule does not use it. Returns ``(scores, ids)`` of the same shape, rows in the new order
    with non-increasing scores (given non-increasing input rows), no id twice, padded with -1 /
    -inf; inserted images push the original list's last entries past ``k``, where they are cut.
    """
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    db_conf = np.asarray(db_conf, np.float64)
    if ids.ndim != 2 or scores.shape != ids.shape or ids.dtype.kind not in "iu":
        raise ValueError(f"l2019_rerank: scores {scores.shape} and integer ids {ids.shape} must both be (Q, k)")
    if query_labels.shape != (len(ids),) or np.shape(query_conf) != (len(ids),):
        raise ValueError(f"l2019_rerank: query_labels {query_labels.shape} and query_conf {np.shape(query_conf)} "
                         f"must be ({len(ids)},), one per query")
    if db_labels.ndim != 1 or db_conf.shape != db_labels.shape:
        raise ValueError(f"l2019_rerank: db_labels {db_labels.shape} and db_conf {db_conf.shape} must be (N,)")
    if ids.size and ids.max() >= len(db_labels):
        raise ValueError(f"l2019_rerank: ids hold index {ids.max()}, but there are only {len(db_labels)} db labels")
    if top < 1:
        raise ValueError(f"l2019_rerank: top must be >= 1, got {top}")
    ids = ids.astype(np.int64, copy=False)
    vocab, db_codes = _encode(db_labels)
    q_codes = _lookup(vocab, query_labels)
    # The inverted lists, built once: index rows grouped by label, highest confidence first.
    labelled = np.flatnonzero(db_codes >= 0)
    by_label = labelled[np.lexsort((-db_conf[labelled], db_codes[labelled]))]
    grouped = db_codes[by_label]
    starts = np.searchsorted(grouped, np.arange(len(vocab)), side="left")
    ends = np.searchsorted(grouped, np.arange(len(vocab)), side="right")
    by_label = np.append(by_label, -1)  # a trailing -1 keeps clipped look-ups in range, even with no labels
    out_scores, out_ids = np.empty_like(scores), np.empty_like(ids)
    for s in range(0, len(ids), _BLOCK):
        block = slice(s, s + _BLOCK)
        out_ids[block], out_scores[block] = _rerank_block(scores[block], ids[block], q_codes[block], db_codes,
                                                          by_label, starts, ends, top)
    return out_scores, out_ids
