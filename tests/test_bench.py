import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_search.py"


def test_bench_search_prints_json_lines_of_every_section(tmp_path):
    """A small run of every section but sgemm (two more child processes)."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--n-db", "3000", "--n-queries", "200", "--dim", "32",
                          "--exact-queries", "100", "--k", "20", "--block-rows", "700", "--nlist", "16",
                          "--pq", "PQ8x4", "--nprobe", "2,16", "--fastscan", "PQ8x4fs", "--refine-nprobe", "16",
                          "--hnsw-rows", "1000", "--efsearch", "16,64",
                          "--sections", "exact,ann,evaluate,numpy", "--numpy-rows", "2000", "--work",
                          str(tmp_path)], capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    by = {}
    for row in rows:
        by.setdefault(row.get("section", "summary"), []).append(row)
    exact = by["exact"][0]
    assert exact["blocked_same_neighbour_lists"] == 1.0 and exact["blocked_max_score_diff"] < 1e-5
    assert exact["one_shot_gflops"] > 0 and exact["blocked_vs_one_shot_time"] > 0
    ann = {(r["index"], r.get("nprobe", r.get("efsearch"))): r for r in by["ann"]}
    assert set(ann) == {("IVF16,Flat", 2), ("IVF16,Flat", 16), ("IVF16,PQ8x4", 2), ("IVF16,PQ8x4", 16),
                        ("IVF16,PQ8x4fs,RFlat", 16), ("HNSW32", 16), ("HNSW32", 64)}
    assert ann["IVF16,Flat", 16]["recall_at_10"] == 1.0  # every cell probed: exact
    assert ann["IVF16,Flat", 2]["recall_at_10"] < 1.0 and ann["HNSW32", 64]["rows"] == 1000
    assert ann["IVF16,PQ8x4fs,RFlat", 16]["k_factor"] == 16
    assert all(r["qps"] > 0 and r["build_s"] >= 0 and r["index_mb"] > 0 for r in by["ann"])
    evaluated, summary = by["evaluate"][0], by["summary"][-1]
    best = summary["best_ann_at_recall_0.95"]  # the fastest full index at recall 0.95 is what evaluate searched
    assert best["rows"] == 3000 and best["recall_at_10"] >= 0.95 and summary["ann_target_met"] in (True, False)
    assert evaluated["topk"] == 100 and evaluated["search"].startswith(f"index {best['index']} (3000 vectors")
    assert evaluated["peak_rss_mb"] > 0 and 0 < evaluated["map_at_100"] <= 1
    assert by["numpy"][0]["same_neighbour_sets"] == 1.0
    assert summary["blocked_equals_one_shot"] is True and summary["evaluate_seconds"] > 0


def test_bench_train_prints_json_for_one_and_two_processes():
    script = SCRIPT.parent / "bench_train.py"
    out = subprocess.run([sys.executable, str(script), "--architecture", "test_efficientnet", "--pretrained", "none",
                          "--images", "16", "--classes", "4", "--size", "64", "48", "--batch-size", "4",
                          "--epochs", "1"], capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("config") for r in rows[:2]] == ["1-process", "2-processes"]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows[:2])
    assert rows[-1]["summary"] and rows[-1]["speedup_multi_vs_one"] > 0
