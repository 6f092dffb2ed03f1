"""Benchmark: FAISS exact inner-product search vs. a plain numpy baseline (matrix product + argpartition).

Prints JSON: sizes, seconds of each (first call, and median of --repeat calls), the speed
ratios numpy/faiss, peak extra memory of each, and how many neighbour lists agree. The numpy
baseline materialises the full (Q, N) similarity matrix; its first call pays for those pages.
Usage: python scripts/bench_search.py [--n-db 100000 --dim 512 --n-queries 1000 --k 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import faiss
import numpy as np

from retrieval.search import gpu_available, knn, knn_numpy


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int):
    """(first-call seconds, median seconds over ``repeat`` calls, peak RSS growth MB, result)."""
    rss0 = peak_rss_mb()
    times, out = [], None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times), peak_rss_mb() - rss0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-db", type=int, default=100_000)
    parser.add_argument("--n-queries", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    db = rng.standard_normal((args.n_db, args.dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    # Queries near database points, as in retrieval: the top of each list is well separated.
    queries = db[rng.integers(0, args.n_db, args.n_queries)] + 0.5 * rng.standard_normal(
        (args.n_queries, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    # FAISS first: peak RSS only grows, so the numpy figure is its growth beyond FAISS's peak.
    f_first, f_med, f_mem, (s_f, i_f) = timed(lambda: knn(queries, db, args.k), args.repeat)
    n_first, n_med, n_mem, (s_n, i_n) = timed(lambda: knn_numpy(queries, db, args.k), args.repeat)

    same_lists = float(np.mean([set(a) == set(b) for a, b in zip(i_f, i_n, strict=True)]))
    same_order = float(np.mean(np.all(i_f == i_n, axis=1)))
    print(json.dumps({
        "benchmark": "exact inner-product kNN",
        "n_db": args.n_db, "n_queries": args.n_queries, "dim": args.dim, "k": args.k,
        "repeat": args.repeat,
        "faiss_first_s": round(f_first, 4), "faiss_median_s": round(f_med, 4),
        "numpy_first_s": round(n_first, 4), "numpy_median_s": round(n_med, 4),
        "speedup_faiss_vs_numpy_median": round(n_med / f_med, 2),
        "speedup_faiss_vs_numpy_first": round(n_first / f_first, 2),
        "faiss_peak_rss_growth_mb": round(f_mem, 1), "numpy_peak_rss_growth_mb": round(n_mem, 1),
        "same_neighbour_sets": same_lists, "same_order": same_order,
        "max_abs_score_diff": float(np.abs(s_f - s_n).max()),
        "faiss_version": faiss.__version__, "faiss_gpu": gpu_available(), "faiss_threads": faiss.omp_get_max_threads(),
        "numpy_version": np.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
