"""Benchmark: diffusion (offline and online stages) and k-reciprocal re-ranking vs. their dense references.

Data: ``--clusters`` Gaussian clusters on the unit sphere (dim ``--dim``), N database vectors and
``--queries`` queries drawn from the same clusters, L2-normalised. Per N the database kNN graph
(`retrieval.search.knn_graph`, K = max(kd, k1); IVF from ``--ivf-from`` vectors, else exact) is built
once and timed apart; every measurement then runs in its own fresh (forked) process, so memory peaks
do not mix, which regenerates the data from the seed and loads the graph. Memory: ``peak_rss_mb`` is the
process's VmHWM, ``extra_peak_mb`` its growth over the data and graph (VmHWM reset through
/proc/self/clear_refs once they are loaded); diffusion's forked offline workers are reported
apart (``worker_peak_rss_mb``: the largest worker's VmHWM, shared pages included).

Dense references (`diffusion_dense`, `k_reciprocal_dense`: (N, N) float matrices, exact solves) run
where their matrices fit in ``--dense-max-gib``; each method's line then carries the dense run's
seconds and memory, the ratios ours/dense (time per query: ours amortises its offline stage over
all queries; memory: extra peak) and the top-10 overlap of the two rankings. The dense diffusion
ranks the first ``--dense-queries`` queries only (it solves one exact 1001² system per seed item);
the dense k-reciprocal takes all queries, since the queries are part of its neighbourhood graph.
They run with one OpenBLAS thread: on a shared 2-core machine its threads on ~1000² systems contend
and run 10× slower.

Prints one JSON line per (N, method), then a summary line with the log-log slopes of time and
memory against N. The default sizes are 10k and 100k (about 3 minutes on 2 cores): 1M with
truncation 1000 does not fit a 20-minute budget on 2 cores. Run it on its own with ``--n 1000000``:
it fits in 24 GiB (diffusion's process peaked at 8.6 GB, with its sets and offline matrix, 4 GB
each, shared with its 2 workers), and took 37 minutes on 2 cores shared with other jobs: graph
207 s, truncation sets 1035 s, offline solves 825 s, online 0.3 s, k-reciprocal 81 s.
Usage: python scripts/bench_rerank.py [--n 10000,100000 --dim 512 --queries 1000 --truncation 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from retrieval.rerank.diffusion import (
    affinity,
    diffusion_dense,
    laplacian,
    offline_diffusion,
    online_diffusion,
    spectral_offline,
    spectral_online,
    truncation_sets,
)
from retrieval.rerank.kreciprocal import k_reciprocal_dense, k_reciprocal_rerank
from retrieval.search import knn, knn_graph

GIB = 1 << 30


def clustered_data(n: int, n_queries: int, dim: int, clusters: int, spread: float, seed: int):
    """(db, queries): unit vectors around ``clusters`` random centres, built in float32 blocks."""
    rng = np.random.default_rng([seed, n])
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for s in range(0, count, 65536):
            rows = min(65536, count - s)
            x = centres[rng.integers(0, clusters, rows)]
            x += spread / np.sqrt(dim) * rng.standard_normal((rows, dim), dtype=np.float32)
            out[s:s + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def memory_mb() -> dict[str, float]:
    """This process's VmHWM and VmRSS, MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "VmRSS")}


def reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); return that RSS, MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory_mb()["VmRSS"]


def dense_bytes(method: str, n: int, n_queries: int) -> int:
    """What the dense reference holds at its peak (its (N, N) / (Q+N, Q+N) matrices), bytes."""
    if method.startswith("diffusion"):
        return 3 * 8 * n * n  # float64 (N, N): at most three live at once (sims + ranks, A + W, L + offline)
    m = n + n_queries
    return 4 * 4 * m * m  # distances, initial ranks, V and its expansion (float32 / int32)


def measure(job: dict) -> dict:
    """One measurement in a fresh process: regenerate the data, load the graph, run, time, read memory."""
    a = job["args"]
    db, queries = clustered_data(job["n"], a["queries"], a["dim"], a["clusters"], a["spread"], a["seed"])
    graph = np.load(job["graph"] + ".scores.npy"), np.load(job["graph"] + ".ids.npy")
    base = reset_peak()
    stages: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        stages[name] = time.perf_counter() - t
        return out

    method, k = job["method"], a["k"]
    if method.endswith("-dense"):
        threadpool_limits(1, user_api="blas")
    dparams = {"kd": a["kd"], "kq": a["kq"], "gamma": a["gamma"], "alpha": a["alpha"]}
    online = ()
    if method == "diffusion":
        sets = timed("truncation_s", truncation_sets, db, a["truncation"], graph=graph)
        lap = timed("laplacian_s", lambda: laplacian(affinity(*graph, a["kd"], a["gamma"]), a["alpha"]))
        offline = timed("offline_solve_s", offline_diffusion, lap, sets, maxiter=a["maxiter"], tol=a["tol"],
                        workers=a["workers"])
        del sets
        q = timed("query_knn_s", knn, queries, db, max(k, a["kq"]))
        _, ids = timed("online_s", online_diffusion, offline, *q, k, kq=a["kq"], gamma=a["gamma"])
        online = ("query_knn_s", "online_s")
    elif method == "diffusion-spectral":
        lap = timed("laplacian_s", lambda: laplacian(affinity(*graph, a["kd"], a["gamma"]), a["alpha"]))
        u, h = timed("eigsh_s", spectral_offline, lap, a["spectral_rank"], a["alpha"])
        q = timed("query_knn_s", knn, queries, db, max(k, a["kq"]))
        _, ids = timed("online_s", spectral_online, u, h, *q, k, kq=a["kq"], gamma=a["gamma"])
        online = ("query_knn_s", "online_s")
    elif method == "kreciprocal":
        _, ids = timed("total_s", k_reciprocal_rerank, queries, db, k, graph=graph, k1=a["k1"], k2=a["k2"],
                       lambda_value=a["lambda_value"])
        online = ("total_s",)
    elif method == "diffusion-dense":
        queries = queries[:a["dense_queries"]]
        _, ids = timed("total_s", diffusion_dense, queries, db, k, truncation=a["truncation"], **dparams)
    elif method == "diffusion-spectral-dense":
        queries = queries[:a["dense_queries"]]
        _, ids = timed("total_s", diffusion_dense, queries, db, k, spectral_rank=a["spectral_rank"], **dparams)
    else:
        _, ids = timed("total_s", k_reciprocal_dense, queries, db, k, k1=a["k1"], k2=a["k2"],
                       lambda_value=a["lambda_value"])
    np.save(job["out"], ids)
    mem = memory_mb()
    seconds = sum(stages.values())
    return {"seconds": round(seconds, 3), "queries": len(queries),
            "seconds_per_query": round(sum(stages[s] for s in online) / len(queries), 6) if online else None,
            "offline_s": round(seconds - sum(stages[s] for s in online), 3) if method.startswith("diffusion") else None,
            "stages": {key: round(value, 3) for key, value in stages.items()},
            "peak_rss_mb": round(mem["VmHWM"], 1), "extra_peak_mb": round(mem["VmHWM"] - base, 1),
            **({"worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
               if method == "diffusion" else {})}


def build_graph(job: dict) -> dict:
    a = job["args"]
    db, _ = clustered_data(job["n"], a["queries"], a["dim"], a["clusters"], a["spread"], a["seed"])
    base = reset_peak()
    index = "ivf" if job["n"] >= a["ivf_from"] else "flat"
    t = time.perf_counter()
    scores, ids = knn_graph(db, min(max(a["kd"], a["k1"]), job["n"] - 1), index=index, nprobe=a["nprobe"])
    seconds = time.perf_counter() - t
    mem = memory_mb()
    np.save(job["graph"] + ".scores.npy", scores)
    np.save(job["graph"] + ".ids.npy", ids)
    # Recall against exact search, on a sample of rows.
    sample = np.random.default_rng(a["seed"]).choice(job["n"], min(job["n"], 200), replace=False)
    _, exact = knn(db[sample], db, ids.shape[1] + 1)
    recall = np.mean([len(set(row) & set(e[e != s])) / ids.shape[1] for s, row, e in zip(sample, ids[sample], exact,
                                                                                        strict=True)])
    return {"seconds": round(seconds, 3), "index": index, "nprobe": a["nprobe"] if index == "ivf" else None,
            "k": int(ids.shape[1]), "recall": round(float(recall), 4), "peak_rss_mb": round(mem["VmHWM"], 1),
            "extra_peak_mb": round(mem["VmHWM"] - base, 1)}


def in_fresh_process(fn, job: dict) -> dict:
    """``fn(job)`` in a new forked process (this parent only imports and prints: nothing to inherit)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(fn, job).result()


def top_overlap(a: np.ndarray, b: np.ndarray, m: int = 10) -> float:
    return float(np.mean([len(set(x[:m]) & set(y[:m])) / min(m, len(x)) for x, y in zip(a, b, strict=True)]))


def slope(xs: list[float], ys: list[float]) -> float | None:
    """The exponent of a log-log least-squares fit y ∝ x^e (None below two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return None
    return round(float(np.polyfit(*zip(*pts, strict=True), 1)[0]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="10000,100000", help="database sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise norm around a cluster centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=100, help="ranked list length")
    parser.add_argument("--methods", default="diffusion,kreciprocal",
                        help="of diffusion, kreciprocal, diffusion-spectral (needs --spectral-rank)")
    parser.add_argument("--kd", type=int, default=50)
    parser.add_argument("--kq", type=int, default=10)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--truncation", type=int, default=1000)
    parser.add_argument("--maxiter", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--spectral-rank", type=int, default=0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="offline processes")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--ivf-from", type=int, default=100_000, help="IVF kNN graph from this many vectors")
    parser.add_argument("--nprobe", type=int, default=4, help="IVF cells the graph search scans (recall ≈ 0.95 here)")
    parser.add_argument("--dense-max-gib", type=float, default=4.0, help="skip dense references needing more")
    parser.add_argument("--dense-queries", type=int, default=50,
                        help="queries the dense diffusion references rank (k-reciprocal's takes all: they shape it)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.n.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "diffusion-spectral" in methods and args.spectral_rank <= 0:
        parser.error("diffusion-spectral needs --spectral-rank > 0")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_rerank_") as tmp:
        for n in sizes:
            job = {"n": n, "args": vars(args), "graph": str(Path(tmp) / f"graph{n}")}
            row = {"n": n, "method": "knn_graph", "dim": args.dim, **in_fresh_process(build_graph, job)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            for method in methods:
                out = str(Path(tmp) / f"{method}{n}.npy")
                row = {"n": n, "method": method, "dim": args.dim,
                       **in_fresh_process(measure, {**job, "method": method, "out": out})}
                need = dense_bytes(method, n, args.queries)
                if need > args.dense_max_gib * GIB:
                    row["dense"] = f"skipped: needs ~{need / GIB:.1f} GiB > --dense-max-gib {args.dense_max_gib}"
                else:
                    dense_out = str(Path(tmp) / f"{method}-dense{n}.npy")
                    dense = in_fresh_process(measure, {**job, "method": f"{method}-dense", "out": dense_out})
                    per_query = (row["seconds"] / row["queries"]) / (dense["seconds"] / dense["queries"])
                    row.update({"dense_seconds": dense["seconds"], "dense_queries": dense["queries"],
                                "dense_peak_rss_mb": dense["peak_rss_mb"],
                                "dense_extra_peak_mb": dense["extra_peak_mb"],
                                "time_ratio_ours_vs_dense": round(per_query, 4),
                                "memory_ratio_ours_vs_dense": round(row["extra_peak_mb"] / max(dense["extra_peak_mb"],
                                                                                               1e-3), 4),
                                "top10_overlap_vs_dense": top_overlap(np.load(out)[:dense["queries"]],
                                                                      np.load(dense_out))})
                print(json.dumps(row), flush=True)
                rows.append(row)
    summary = {"summary": True, "sizes": sizes, "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    for method in ["knn_graph", *methods]:
        mine = [r for r in rows if r["method"] == method]
        ns = [r["n"] for r in mine]
        summary[method] = {"time_exponent": slope(ns, [r["seconds"] for r in mine]),
                           "memory_exponent": slope(ns, [r["extra_peak_mb"] for r in mine])}
        dense = [r for r in mine if "dense_seconds" in r]
        if len(dense) >= 2:
            summary[method]["dense_time_exponent"] = slope([r["n"] for r in dense], [r["dense_seconds"] for r in dense])
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
