"""Benchmark: cleaning at scale (embedding-only) and spatial verification speed on real photos.

Part 1 draws ``--n`` unit descriptors in landmark clusters (``--per-landmark`` images each), moves
``--wrong`` of them to another landmark and adds ``--distractors`` of unclustered vectors under
random landmarks, then runs `retrieval.cleaning.clean_features` with verification off (the
``clean --no-verify`` path: the train × train kNN graph, IVF from 200k rows, and the rule). It
reports seconds per stage, the process's peak RSS growth against the sizes of the descriptors and
of the (N, k) graph, and precision / recall of the removed images against the injected noise.

Part 2 verifies every same-landmark pair and as many different-landmark pairs of the photos in
``--photos`` (``images/<landmark>/*.jpg`` + ``ground_truth.csv``, e.g. ``../shared/data/landmarks``)
with the cleaner's default local features and RANSAC, and reports pairs/s and the inlier counts
of both kinds of pair. Skipped (null) when the folder is absent.

Prints one JSON object. Usage: python scripts/bench_clean.py [--n 200000 --dim 512 --photos DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import faiss
import numpy as np

from retrieval.cleaning import IVF_FROM, CleanSettings, clean_features
from retrieval.data.noisy_train import removal_scores


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def noisy_clusters(n: int, dim: int, per_landmark: int, wrong: float, distractors: float, spread: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """``(features (n, dim) float32, labels (n,), id → kind)``: clustered clean rows, then the noise."""
    rng = np.random.default_rng(seed)
    n_distractors = round(distractors * n)
    n_clean = n - n_distractors
    n_landmarks = max(2, n_clean // per_landmark)
    centres = rng.standard_normal((n_landmarks, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    true = np.arange(n_clean) % n_landmarks
    x = np.empty((n, dim), np.float32)
    for s in range(0, n_clean, 65536):  # in blocks: one temporary of the block's size at a time
        e = min(n_clean, s + 65536)
        x[s:e] = centres[true[s:e]] + spread * rng.standard_normal((e - s, dim), dtype=np.float32) / np.sqrt(dim)
    x[n_clean:] = rng.standard_normal((n_distractors, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.concatenate([true, rng.integers(0, n_landmarks, n_distractors)])
    kinds = np.array(["clean"] * n_clean + ["distractor"] * n_distractors, dtype=object)
    moved = rng.choice(n_clean, size=round(wrong * n_clean), replace=False)
    labels[moved] = (labels[moved] + rng.integers(1, n_landmarks, len(moved))) % n_landmarks
    kinds[moved] = "wrong_label"
    return x, labels, {str(i): str(kind) for i, kind in enumerate(kinds)}


def bench_embedding_only(args: argparse.Namespace) -> dict:
    rss0 = peak_rss_mb()
    x, labels, noise = noisy_clusters(args.n, args.dim, args.per_landmark, args.wrong, args.distractors,
                                      args.spread, args.seed)
    rss_data = peak_rss_mb()
    ids = [str(i) for i in range(len(x))]
    settings = CleanSettings(k=args.k, verify=False)
    t = time.perf_counter()
    keep, stats = clean_features(ids, [Path(i) for i in ids], labels, x, settings, progress=False)
    seconds = time.perf_counter() - t
    return {
        "n": args.n, "dim": args.dim, "per_landmark": args.per_landmark, "wrong_labels": args.wrong,
        "distractors": args.distractors, "k": settings.k, "freq_threshold": settings.freq_threshold,
        "knn_index": "ivf" if args.n >= IVF_FROM else "flat",
        "seconds": round(seconds, 2), "seconds_knn_graph": stats["seconds"]["knn_graph"],
        "images_per_s": round(args.n / seconds, 1),
        "descriptors_mb": round(x.nbytes / 2**20, 1),
        "graph_mb": round(args.n * settings.k * (4 + 8) / 2**20, 1),  # float32 scores + int64 ids
        "peak_rss_growth_mb": round(peak_rss_mb() - rss0, 1),
        "peak_rss_growth_after_data_mb": round(peak_rss_mb() - rss_data, 1),
        "kept": int(keep.sum()),
        **{key: round(v, 4) if isinstance(v, float) else v
           for key, v in removal_scores({ids[i] for i in np.flatnonzero(keep)}, noise).items()},
    }


def photo_pairs(root: Path, seed: int) -> tuple[list[str], list[Path], list[tuple[str, str]], np.ndarray]:
    """Ids, paths, pairs and whether each pair shows the same landmark (all positives + as many negatives)."""
    with (root / "ground_truth.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ids = [r["image"] for r in rows]
    landmark = {r["image"]: r["landmark_id"] for r in rows}
    every = list(combinations(ids, 2))
    positives = [p for p in every if landmark[p[0]] == landmark[p[1]]]
    negatives = [p for p in every if landmark[p[0]] != landmark[p[1]]]
    rng = np.random.default_rng(seed)
    negatives = [negatives[i] for i in rng.choice(len(negatives), min(len(negatives), len(positives)), replace=False)]
    pairs = positives + negatives
    same = np.array([True] * len(positives) + [False] * len(negatives))
    return ids, [root / i for i in ids], pairs, same


def bench_verification(root: Path, args: argparse.Namespace) -> dict | None:
    from retrieval.local_features import extract_local_features
    from retrieval.verify import verify_pairs

    if not (root / "ground_truth.csv").is_file():
        return None
    settings = replace(CleanSettings(), workers=args.workers, resize=args.resize, max_keypoints=args.max_keypoints)
    ids, paths, pairs, same = photo_pairs(root, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cache = extract_local_features(ids, paths, Path(tmp) / "local.h5", features=settings.features,
                                       max_keypoints=settings.max_keypoints, resize=settings.resize, progress=False)
        extract_s = time.perf_counter() - t
        t = time.perf_counter()
        inliers = verify_pairs(pairs, cache, cache, ransac=settings.ransac, threshold=settings.threshold,
                               max_trials=settings.max_trials, workers=settings.workers, progress=False)
        verify_s = time.perf_counter() - t

    def quartiles(v: np.ndarray) -> list[int]:
        return [int(q) for q in np.percentile(v, [10, 25, 50, 75, 90])] if len(v) else []

    passed = inliers >= settings.inlier_threshold
    return {
        "photos": len(ids), "pairs": len(pairs), "same_landmark_pairs": int(same.sum()),
        "features": settings.features, "max_keypoints": settings.max_keypoints, "resize": settings.resize,
        "ransac": settings.ransac, "threshold_px": settings.threshold, "max_trials": settings.max_trials,
        "workers": settings.workers,
        "local_features_images_per_s": round(len(ids) / extract_s, 2),
        "pairs_per_s": round(len(pairs) / verify_s, 1),
        "inliers_same_p10_25_50_75_90": quartiles(inliers[same]),
        "inliers_different_p10_25_50_75_90": quartiles(inliers[~same]),
        "inliers_different_max": int(inliers[~same].max()) if (~same).any() else None,
        f"same_pass_{settings.inlier_threshold}": round(float(passed[same].mean()), 3),
        f"different_pass_{settings.inlier_threshold}": round(float(passed[~same].mean()), 3) if (~same).any() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="descriptors (default 200k: the IVF graph)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-landmark", type=int, default=10)
    parser.add_argument("--wrong", type=float, default=0.1, help="fraction of clean rows moved to another landmark")
    parser.add_argument("--distractors", type=float, default=0.1, help="fraction of rows that are unclustered")
    parser.add_argument("--spread", type=float, default=1.0,
                        help="within-landmark noise (cosine to the centre ≈ 1/√(1+s²))")
    parser.add_argument("--k", type=int, default=CleanSettings.k)
    parser.add_argument("--photos", type=Path,
                        default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "landmarks")
    parser.add_argument("--workers", type=int, default=CleanSettings.workers)
    parser.add_argument("--resize", type=int, default=CleanSettings.resize, help="local features' long side")
    parser.add_argument("--max-keypoints", type=int, default=CleanSettings.max_keypoints)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    print(json.dumps({
        "benchmark": "cleaning",
        "embedding_only": bench_embedding_only(args),
        "verification_real_photos": bench_verification(args.photos, args),
        "faiss_version": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
