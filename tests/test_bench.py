import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_search.py"


def test_bench_search_prints_json_with_agreeing_neighbours():
    out = subprocess.run([sys.executable, str(SCRIPT), "--n-db", "2000", "--n-queries", "50", "--dim", "32",
                          "--k", "10", "--repeat", "1"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report["n_db"] == 2000 and report["k"] == 10
    assert report["same_neighbour_sets"] == 1.0 and report["max_abs_score_diff"] < 1e-4
    assert report["speedup_faiss_vs_numpy_median"] > 0 and report["numpy_first_s"] > 0


def test_bench_train_prints_json_for_one_and_two_processes():
    script = SCRIPT.parent / "bench_train.py"
    out = subprocess.run([sys.executable, str(script), "--architecture", "test_efficientnet", "--pretrained", "none",
                          "--images", "16", "--classes", "4", "--size", "64", "48", "--batch-size", "4",
                          "--epochs", "1"], capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("config") for r in rows[:2]] == ["1-process", "2-processes"]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows[:2])
    assert rows[-1]["summary"] and rows[-1]["speedup_multi_vs_one"] > 0
