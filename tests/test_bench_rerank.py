import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_rerank.py"


def test_bench_rerank_prints_json_agreeing_with_the_dense_references():
    out = subprocess.run([sys.executable, str(SCRIPT), "--n", "1000,2000", "--dim", "32", "--queries", "50",
                          "--clusters", "40", "--truncation", "100", "--k", "20", "--spectral-rank", "40",
                          "--methods", "diffusion,kreciprocal,diffusion-spectral"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r.get("n"), r.get("method")) for r in rows[:-1]] == [
        (n, m) for n in (1000, 2000) for m in ("knn_graph", "diffusion", "kreciprocal", "diffusion-spectral")]
    for row in rows[:-1]:
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0
        if row["method"] != "knn_graph":
            assert row["seconds_per_query"] > 0 and row["dense_seconds"] > 0
            assert row["top10_overlap_vs_dense"] >= 0.95 and row["time_ratio_ours_vs_dense"] > 0
    assert set(rows[0]) >= {"index", "k", "extra_peak_mb"} and rows[0]["recall"] == 1.0  # exact at these sizes
    assert {"truncation_s", "laplacian_s", "offline_solve_s", "query_knn_s", "online_s"} == set(rows[1]["stages"])
    summary = rows[-1]
    assert summary["summary"] and summary["diffusion"]["time_exponent"] is not None
    assert summary["kreciprocal"]["dense_time_exponent"] is not None


def test_bench_rerank_skips_dense_references_over_the_memory_cap():
    out = subprocess.run([sys.executable, str(SCRIPT), "--n", "500", "--dim", "16", "--queries", "10",
                          "--clusters", "10", "--truncation", "50", "--methods", "kreciprocal",
                          "--dense-max-gib", "0.0001"], capture_output=True, text=True, check=True).stdout
    row = json.loads(out.splitlines()[1])
    assert row["dense"].startswith("skipped: needs") and "top10_overlap_vs_dense" not in row
