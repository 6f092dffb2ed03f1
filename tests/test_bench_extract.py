import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_extract.py"


@pytest.mark.slow
def test_bench_extract_prints_json_for_every_variant_and_the_ratios(tmp_path):
    args = ["--parts", "throughput,rss", "--photos", "", "--synthetic", "tiny", "--repeat", "1", "--rounds", "1",
            "--architecture", "test_efficientnet", "--pretrained", "none", "--synthetic-image-size", "64",
            "--batch-size", "4", "--workers", "1", "--baseline-workers", "1", "--rss-sizes", "30", "60",
            "--rss-image-size", "32", "--threads", "1"]
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True,
                         timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    speed = [r for r in rows if r.get("part") == "throughput"]
    assert {(r["scales"], r["variant"]) for r in speed} == {
        (s, v) for s in ("ss", "ms") for v in ("batch1", "batch1-folded", "shape-grouped", "exact-windowed", "aspect")}
    assert all(r["images_per_s"] > 0 and 0 < r["mean_batch_occupancy"] <= 1 for r in speed)
    aspect = next(r for r in speed if r["variant"] == "aspect" and r["scales"] == "ss")
    grouped = next(r for r in speed if r["variant"] == "shape-grouped" and r["scales"] == "ss")
    assert aspect["mean_batch_occupancy"] > grouped["mean_batch_occupancy"]  # buckets fill batches
    rss = [r for r in rows if r.get("part") == "rss"]
    assert [r["images"] for r in rss] == [30, 60] and all(r["peak_rss_mb"] > 0 for r in rss)
    summary = rows[-1]
    assert summary["summary"] and summary["synthetic_tiny_ss_aspect_vs_batch1"] > 0
    assert summary["synthetic_tiny_ms_aspect_vs_batch1_folded"] > 0
    assert summary["rss_peak_ratio_largest_vs_smallest"] > 0
