"""Spatial verification re-ranking (Philbin et al., CVPR 2007; Landmark2019, arXiv 1906.04087).

Each query's top-``top`` database images are verified geometrically (`retrieval.verify`:
local features, matching, RANSAC); those with at least ``min_inliers`` inliers move to the
front, most inliers first, and the others keep their order after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.data.dataset import BBox
from retrieval.local_features import extract_local_features
from retrieval.verify import verify_pairs, verify_settings

# Fewest inliers that count as verified at the default 1024 points, 640 px. On ../shared/data/landmarks,
# ALIKED + LightGlue + F: unrelated pairs ≤ 35 inliers (95th percentile 26), views of one place ≥ 42
# (10th percentile 85): LightGlue matches something on any pair and F fits much of it. RootSIFT + mnn + F:
# unrelated ≤ 11, views of one place median 24. Fewer keypoints give fewer inliers (20 suits 256-512).
MIN_INLIERS = {("lightglue", "usac"): 30, ("lightglue", "homography"): 25, ("lightglue", "affine"): 25,
               ("mnn", "usac"): 15, ("mnn", "homography"): 12, ("mnn", "affine"): 12}


def spatial_rerank(scores: np.ndarray, ids: np.ndarray, inliers: np.ndarray, *, top: int = 100,
                   min_inliers: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each row's first ``top`` entries by spatial verification: ``(scores, ids)``, both ``(Q, k)``.

    ``inliers``: ``(Q, ≥ min(top, k))``, inlier counts of ``ids[:, :top]`` (columns past ``top``
    are ignored). Entries with ``inliers ≥ min_inliers`` (and an id ≥ 0) come first, most inliers
    first (ties: original order), scored ``max(row score) + 1 + inliers``; the rest keep their
    order and scores after them; entries past ``top`` are untouched. Sorted input rows stay sorted.
    """
    scores, ids = np.asarray(scores), np.asarray(ids)
    if scores.shape != ids.shape or ids.ndim != 2:
        raise ValueError(f"scores and ids must both be (Q, k), got {scores.shape} and {ids.shape}")
    t = max(0, min(int(top), ids.shape[1]))
    inliers = np.asarray(inliers)
    if inliers.ndim != 2 or inliers.shape[0] != len(ids) or inliers.shape[1] < t:
        raise ValueError(f"inliers must be (Q, >= {t}) with Q = {len(ids)}, got {inliers.shape}")
    out_scores, out_ids = scores.astype(np.float32, copy=True), ids.copy()
    if t == 0:
        return out_scores, out_ids
    inl = inliers[:, :t].astype(np.int64)
    verified = (inl >= min_inliers) & (ids[:, :t] >= 0)
    position = np.broadcast_to(np.arange(t), (len(ids), t))
    # lexsort: the last key is primary: verified first, then more inliers, then the original position.
    order = np.lexsort((position, np.where(verified, -inl, 0), ~verified), axis=-1)
    out_ids[:, :t] = np.take_along_axis(ids[:, :t], order, axis=1)
    valid = ids >= 0
    row_max = np.where(valid.any(1), np.max(np.where(valid, scores, -np.inf), axis=1), 0.0)
    new = np.where(verified, row_max[:, None] + 1.0 + inl, scores[:, :t])
    out_scores[:, :t] = np.take_along_axis(new, order, axis=1)
    return out_scores, out_ids


def sv_rerank(scores: np.ndarray, ids: np.ndarray, query_ids: Sequence[str], query_paths: Sequence[Path],
              db_ids: Sequence[str], db_paths: Sequence[Path], *, cache_dir: Path, top: int = 100,
              features: str = "aliked", max_keypoints: int = 1024, resize: int = 640, matcher: str | None = None,
              ransac: str = "usac", threshold: float | None = None, min_inliers: int | None = None,
              workers: int = 0, device: str = "cpu", query_bbxs: Sequence[BBox | None] | None = None,
              progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Spatially verify each query's top-``top`` (``ids``: rows into ``db_ids``, -1 = none) and re-rank.

    Local features of the queries and of the database images in any top-``top`` (not the whole
    database) are cached under ``cache_dir`` as ``local_<features>-k<max_keypoints>-r<resize>_{query,db}.h5``
    and the pair results as ``pairs_<...>_<matcher>_<ransac>_t<threshold>.csv``; both resume.
    ``matcher``/``threshold``/``min_inliers`` None: the defaults of the features and ``ransac``
    (`retrieval.verify.verify_settings`, `MIN_INLIERS`). ``query_bbxs``:
    query crop boxes (revisitop). Returns `spatial_rerank`'s ``(scores, ids)``.
    """
    matcher, threshold = verify_settings(features, matcher, ransac, threshold)
    min_inliers = MIN_INLIERS[matcher, ransac] if min_inliers is None else int(min_inliers)
    ids = np.asarray(ids)
    if ids.ndim != 2 or len(ids) != len(query_ids):
        raise ValueError(f"ids must be (Q, k) with Q = {len(query_ids)} queries, got {ids.shape}")
    t = min(int(top), ids.shape[1])
    head = ids[:, :t]
    rows = np.unique(head[head >= 0])
    cache_dir = Path(cache_dir)
    tag = f"{features}-k{max_keypoints}-r{resize}"
    opts = {"features": features, "max_keypoints": max_keypoints, "resize": resize, "device": device,
            "progress": progress}
    query_cache = extract_local_features(query_ids, query_paths, cache_dir / f"local_{tag}_query.h5", bbxs=query_bbxs,
                                         **opts)
    db_cache = extract_local_features([db_ids[r] for r in rows], [db_paths[r] for r in rows],
                                      cache_dir / f"local_{tag}_db.h5", **opts)
    qs, cols = np.nonzero(head >= 0)
    pairs = [(query_ids[q], db_ids[head[q, c]]) for q, c in zip(qs, cols, strict=True)]
    results = cache_dir / f"pairs_{tag}_{matcher}_{ransac}_t{threshold:g}.csv"
    inliers = np.zeros(head.shape, np.int64)
    inliers[qs, cols] = verify_pairs(pairs, query_cache, db_cache, matcher=matcher, ransac=ransac,
                                     threshold=threshold, workers=workers, results=results, device=device,
                                     progress=progress)
    return spatial_rerank(scores, ids, inliers, top=t, min_inliers=min_inliers)
