"""Benchmark: search at scale: exact vs IVF-Flat / IVF-PQ / HNSW, blocked exact search, evaluate at 1M rows.

Data: the features-only benchmark `retrieval.data.vectors` (``--n-db`` clustered unit vectors of
``--dim``, ``--n-queries`` queries, seeded), written once as features files under ``--work``
(the same files ``--dataset vectors:N,...`` evaluates). Sections (``--sections``):

- ``sgemm``: this machine's float32 matrix-product rate (numpy and torch, GFLOP/s), the yardstick;
- ``exact``: one-shot exact search (FAISS ``IndexFlatIP``, the whole database in RAM) of the first
  ``--exact-queries`` queries, its GFLOP/s (2·Q·N·D / s) as a fraction of sgemm, and the blocked
  exact search reading the HDF5 file ``--block-rows`` at a time (`retrieval.search.knn_file`):
  time ratio and how many neighbour lists are identical;
- ``ann``: ``IVF<nlist>,Flat``, ``IVF<nlist>,PQ<dim/8>`` and ``IVF<nlist>,PQ<dim/8>x4fs,RFlat``
  (4-bit fast-scan codes, the top ``k_factor``·k re-ranked on the stored vectors), built from the
  file by `retrieval.index.build_index` and saved where the ``index`` verb puts them, and
  ``HNSW32`` on the first ``--hnsw-rows`` rows (its build runs at ~1k vectors/s on 2 cores):
  build seconds, index bytes, memory growth, and per ``nprobe`` / ``efSearch`` the queries/s over
  ``--ann-queries`` queries, recall@10 against exact (on the exact queries) and the speed-up over
  exact queries/s on the same rows;
- ``evaluate``: the runner's ``evaluate --topk 100`` of all queries on the benchmark as
  ``vectors:N`` in a child process (its seconds and peak RSS, and the same child's RSS when it
  only loads: ``--help``), searching the fastest saved index that reached recall 0.95
  (``--eval-index best``) or exactly, reading the database in blocks (``--eval-index none``);
- ``numpy`` (not in the default): FAISS exact vs a numpy matrix product + argpartition.

Prints one JSON line per measurement, then a summary. On 2 shared cores the default (1M × 512,
10k queries) takes about 15 minutes; ratios are measured within the run.
Usage: python scripts/bench_search.py [--n-db 1000000 --n-queries 10000 --dim 512 --work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from retrieval.data.vectors import SyntheticVectors
from retrieval.features import FeaturesReader, read_features, write_features
from retrieval.index import build_index, index_slug, save_index, search_batched, set_search_params
from retrieval.search import gpu_available, knn, knn_file, knn_numpy

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("sgemm", "exact", "ann", "evaluate", "numpy")
# runs an experiment file in this process and reports its own peak RSS: VmHWM, the high-water mark of this
# process image (ru_maxrss would carry the bench's own peak over fork + exec)
CHILD = """
import json, runpy, sys, time
sys.argv = sys.argv[1:]
t, code = time.perf_counter(), 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit_:
    code = exit_.code or 0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": hwm / 1024, "exit": code}), file=sys.stderr)
"""


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def rss_mb() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sgemm_rates(dim: int, repeat: int = 3) -> dict:
    """float32 matrix products (4096 × dim) @ (dim × 16384): best GFLOP/s of numpy and of torch, each in a
    child process (torch's OpenMP pool would otherwise share the cores with FAISS's in this one)."""
    code = f"""
import sys, time
import numpy as np
rng = np.random.default_rng(0)
a, b = rng.random((4096, {dim}), dtype=np.float32), rng.random(({dim}, 16384), dtype=np.float32)
if sys.argv[1] == "torch":
    import torch
    a, b = torch.from_numpy(a), torch.from_numpy(b)
times = []
for _ in range({repeat}):
    t = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t)
print(2.0 * 4096 * {dim} * 16384 / min(times) / 1e9)
"""
    out = {}
    for name in ("numpy", "torch"):
        proc = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=True)
        out[f"{name}_gflops"] = round(float(proc.stdout.split()[-1]), 1)
    out["sgemm_gflops"] = max(out["numpy_gflops"], out["torch_gflops"])
    return out


def recall_at(ids: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """k-recall@k: the fraction of the exact top-k found in the returned top-k."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, truth, strict=True)]))


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    _, ids = search_batched(index, queries, k)
    return time.perf_counter() - t, ids


def sweep(name: str, index: faiss.Index, param: str, values: list[int], queries: np.ndarray,
          truth: np.ndarray, exact_qps: float, base: dict) -> list[dict]:
    """queries/s over all queries and recall@10 on the exact ones, per search-parameter value."""
    rows = []
    for value in values:
        set_search_params(index, **{param: value})
        seconds, ids = timed_search(index, queries, 10)
        qps = len(queries) / seconds
        rows.append(emit({**base, "index": name, param: value, "search_s": round(seconds, 3), "qps": round(qps, 1),
                          "recall_at_10": round(recall_at(ids[:len(truth)], truth), 4),
                          "speedup_vs_exact": round(qps / exact_qps, 1)}))
    return rows


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"exit": proc.returncode}
    if report.get("exit") or proc.returncode:
        raise RuntimeError(f"child {' '.join(map(str, args[:6]))} ... failed:\n{proc.stderr[-3000:]}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-db", type=int, default=1_000_000)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100, help="neighbours of the exact searches")
    parser.add_argument("--exact-queries", type=int, default=1000, help="queries searched exactly (ground truth)")
    parser.add_argument("--block-rows", type=int, default=65536)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cells (≈ √N; 4096+ trains for tens of minutes "
                                                                "on 2 cores)")
    parser.add_argument("--train-rows", type=int, default=None, help="IVF training rows [default: 64 per cell]")
    parser.add_argument("--pq", default=None, help="the IVF-PQ code [default: PQ<dim/8>, 8 dims per byte]")
    parser.add_argument("--nprobe", default="8,16,32", help="probes of IVF-Flat and IVF-PQ")
    parser.add_argument("--fastscan", default=None,
                        help="the code of the refined index IVF<nlist>,<code>,RFlat [default: PQ<dim/8>x4fs]")
    parser.add_argument("--refine-nprobe", default="64,128,256", help="probes of the refined index")
    parser.add_argument("--k-factor", type=int, default=16, help="candidates re-ranked exactly per result (RFlat)")
    parser.add_argument("--ann-queries", type=int, default=2000, help="queries timed per index setting")
    parser.add_argument("--hnsw-rows", type=int, default=100_000)
    parser.add_argument("--efsearch", default="16,32,64,128")
    parser.add_argument("--eval-index", default="best",
                        help="best (the fastest index of the ann section at recall 0.95), none (exact, in blocks), "
                             "or a factory an earlier run saved under --work")
    parser.add_argument("--eval-search", default="",
                        help="with a factory: its search params, e.g. nprobe=256,k_factor=16")
    parser.add_argument("--sections", default="sgemm,exact,ann,evaluate")
    parser.add_argument("--numpy-rows", type=int, default=100_000, help="database rows of the numpy section")
    parser.add_argument("--work", type=Path, default=None, help="data and indexes [default: a temporary folder]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_search_"))
    summary: dict = {"summary": True, "n_db": args.n_db, "n_queries": args.n_queries, "dim": args.dim}
    emit({"section": "machine", "faiss_version": faiss.__version__, "faiss_gpu": gpu_available(),
          "faiss_threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "numpy_version": np.__version__, "work": str(work)})

    vectors = SyntheticVectors(args.n_db, args.n_queries, args.dim, seed=args.seed)
    t = time.perf_counter()
    paths = vectors.write(work / "data" / vectors.name)
    queries = read_features(paths["query"])[1]
    with FeaturesReader(paths["db"]) as reader:
        db = np.concatenate([block for _, block in reader.blocks(args.block_rows)])
    emit({"section": "data", "dataset": vectors.name, "seconds": round(time.perf_counter() - t, 1),
          "db_mb": round(db.nbytes / 2**20, 1)})
    n_exact = min(args.exact_queries, args.n_queries)
    k = min(args.k, args.n_db)

    sgemm = None
    if "sgemm" in sections:
        sgemm = emit({"section": "sgemm", **sgemm_rates(args.dim)})["sgemm_gflops"]

    exact_qps, truth = None, None
    if "exact" in sections or "ann" in sections:
        t = time.perf_counter()
        one_scores, one_ids = knn(queries[:n_exact], db, k)
        one_s = time.perf_counter() - t
        exact_qps, truth = n_exact / one_s, one_ids[:, :10]
        gflops = 2.0 * n_exact * args.n_db * args.dim / one_s / 1e9
        record = {"section": "exact", "queries": n_exact, "k": k, "one_shot_s": round(one_s, 2),
                  "one_shot_qps": round(exact_qps, 2), "one_shot_gflops": round(gflops, 1),
                  "one_shot_memory_mb": round(db.nbytes / 2**20, 1)}
        if sgemm:
            record["fraction_of_sgemm"] = round(gflops / sgemm, 3)
        if "exact" in sections:
            t = time.perf_counter()
            blk_scores, blk_ids = knn_file(queries[:n_exact], paths["db"], k, block_rows=args.block_rows)
            blk_s = time.perf_counter() - t
            same = float(np.mean(np.all(blk_ids == one_ids, axis=1)))
            record.update({"blocked_s": round(blk_s, 2), "blocked_vs_one_shot_time": round(blk_s / one_s, 3),
                           "block_rows": args.block_rows,
                           "blocked_memory_mb": round(args.block_rows * args.dim * 4 / 2**20, 1),
                           "blocked_same_neighbour_lists": same,
                           "blocked_max_score_diff": float(np.abs(blk_scores - one_scores).max())})
            summary["blocked_equals_one_shot"] = same == 1.0
        emit(record)
        summary.update(exact_qps=round(exact_qps, 2), exact_fraction_of_sgemm=record.get("fraction_of_sgemm"))

    best = None  # the fastest index over all rows at recall@10 >= 0.95, with its search parameters
    if "ann" in sections:
        ann_queries = queries[:max(n_exact, min(args.ann_queries, args.n_queries))]
        code = f"PQ{max(1, args.dim // 8)}"
        builds = [(f"IVF{args.nlist},Flat", _ints(args.nprobe), {}),
                  (f"IVF{args.nlist},{args.pq or code}", _ints(args.nprobe), {}),
                  (f"IVF{args.nlist},{args.fastscan or code + 'x4fs'},RFlat", _ints(args.refine_nprobe),
                   {"k_factor": args.k_factor})]
        for factory, nprobes, extra in builds:
            rss0 = rss_mb()
            t = time.perf_counter()
            index, stats = build_index(paths["db"], factory, train_rows=args.train_rows, block_rows=args.block_rows)
            build_s = time.perf_counter() - t
            growth = rss_mb() - rss0
            # saved where the index verb puts it, so the evaluate section can search it by name
            folder = save_index(work / "out" / "pretrained" / "index" / f"{vectors.name}_ss_{index_slug(factory)}",
                                index, reader_ids(paths["db"]), {**stats, "features": str(paths["db"]),
                                                                 "whiten": None, "seed": 0})
            base = {"section": "ann", "build_s": round(build_s, 1), "train_s": stats["train_s"],
                    "add_s": stats["add_s"], "train_rows": stats["train_rows"],
                    "index_mb": round((folder / "index.faiss").stat().st_size / 2**20, 3),
                    "rss_growth_mb": round(growth, 1), "rows": args.n_db, **extra}
            set_search_params(index, **extra)
            rows = sweep(factory, index, "nprobe", nprobes, ann_queries, truth, exact_qps, base)
            best = _best(best, rows)
            del index
        # HNSW: its own exact baseline on the rows it holds
        rows_h = min(args.hnsw_rows, args.n_db)
        sub = paths["db"] if rows_h == args.n_db else write_features(
            work / "hnsw_rows.h5", [f"r{i}" for i in range(rows_h)], db[:rows_h])
        t = time.perf_counter()
        sub_truth = truth if rows_h == args.n_db else knn(queries[:n_exact], db[:rows_h], 10)[1]
        sub_qps = exact_qps if rows_h == args.n_db else n_exact / (time.perf_counter() - t)
        rss0 = rss_mb()
        t = time.perf_counter()
        index, stats = build_index(sub, "HNSW32", block_rows=args.block_rows)
        build_s = time.perf_counter() - t
        base = {"section": "ann", "build_s": round(build_s, 1), "add_s": stats["add_s"],
                "index_mb": round(len(faiss.serialize_index(index)) / 2**20, 3),
                "rss_growth_mb": round(rss_mb() - rss0, 1), "rows": rows_h, "exact_qps_same_rows": round(sub_qps, 2)}
        best = _best(best, sweep("HNSW32", index, "efsearch", _ints(args.efsearch), ann_queries, sub_truth, sub_qps,
                                 base))
        del index
        summary["best_ann_at_recall_0.95"] = best and {k_: v for k_, v in best.items()
                                                       if k_ in ("index", "rows", "nprobe", "efsearch", "k_factor",
                                                                 "recall_at_10", "qps", "speedup_vs_exact")}
        summary["ann_target_met"] = bool(best and best["rows"] == args.n_db and best["speedup_vs_exact"] >= 10)

    if "evaluate" in sections:
        spec = f"vectors:{args.n_db},queries={args.n_queries},dim={args.dim}"
        base = [REPO / "experiments" / "v1.py", "--out-root", work / "out", "--data-root", work / "data",
                "--dataset", spec, "--set", "progress=false", "--set", f"seed={args.seed}"]
        loaded = run_child([*base, "--help"])
        options = ["--topk", "100", "--rerank", "none"]
        if args.eval_index == "best":
            if best is None or best["rows"] != args.n_db:
                raise SystemExit("--eval-index best: no index over all rows reached recall 0.95 in the ann section; "
                                 "give --eval-index none (exact) or a factory the ann section saved")
            options += ["--index", best["index"], *(a for p_ in ("nprobe", "k_factor") if p_ in best
                                                      for a in (f"--{p_.replace('_', '-')}", str(best[p_])))]
        elif args.eval_index != "none":  # a factory saved under --work by an earlier run's ann section
            options += ["--index", args.eval_index, *(a for item in _split_pairs(args.eval_search)
                                                      for a in (f"--{item[0].replace('_', '-')}", item[1]))]
        report = run_child([*base, "evaluate", *options])
        res = json.loads((work / "out" / "pretrained" / "eval" / f"{vectors.name}_ss_none" / "results.json")
                         .read_text())
        record = emit({"section": "evaluate", "dataset": spec, "topk": res["topk"], "search": res["search"],
                       "seconds": round(report["seconds"], 1), "search_seconds": res["search_seconds"],
                       "peak_rss_mb": round(report["peak_rss_mb"], 1),
                       "peak_rss_of_the_runner_loading_only_mb": round(loaded["peak_rss_mb"], 1),
                       "map_at_100": round(res["metrics"]["gldv2"]["map@100"], 4)})
        summary.update(evaluate_seconds=record["seconds"], evaluate_peak_rss_mb=record["peak_rss_mb"],
                       evaluate_search=record["search"])

    if "numpy" in sections:
        rows_n = min(args.numpy_rows, args.n_db)
        q = queries[:n_exact]
        times_f, times_n = [], []
        for _ in range(3):
            t = time.perf_counter()
            s_f, i_f = knn(q, db[:rows_n], k)
            times_f.append(time.perf_counter() - t)
            t = time.perf_counter()
            s_n, i_n = knn_numpy(q, db[:rows_n], k)
            times_n.append(time.perf_counter() - t)
        emit({"section": "numpy", "rows": rows_n, "queries": len(q), "k": k,
              "faiss_median_s": round(statistics.median(times_f), 4),
              "numpy_median_s": round(statistics.median(times_n), 4),
              "speedup_faiss_vs_numpy_median": round(statistics.median(times_n) / statistics.median(times_f), 2),
              "same_neighbour_sets": float(np.mean([set(a) == set(b) for a, b in zip(i_f, i_n, strict=True)])),
              "max_abs_score_diff": float(np.abs(s_f - s_n).max())})

    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    emit(summary)


def _split_pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split("=", 1)) for item in text.split(",") if "=" in item]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _best(best: dict | None, rows: list[dict]) -> dict | None:
    """The row of highest speed-up among ``best`` and ``rows`` with recall@10 >= 0.95, preferring all rows."""
    good = [r for r in [best, *rows] if r is not None and r["recall_at_10"] >= 0.95]
    return max(good, key=lambda r: (r["rows"], r["speedup_vs_exact"]), default=None)


def reader_ids(path: Path) -> list[str]:
    with FeaturesReader(path) as reader:
        return reader.ids


if __name__ == "__main__":
    main()
