"""The experiment runner end to end: predict → evaluate → results.json / results.csv / ranked.html."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import shared_path
from retrieval.runner import build_cli, parse_devices
from retrieval.search import read_ranks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
from v1 import params as V1_PARAMS  # noqa: E402


def invoke(args, params=V1_PARAMS):
    result = CliRunner().invoke(build_cli(params, name="v1"), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_parse_devices_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert [str(d) for d in parse_devices("0,1")] == ["cpu", "cpu"]
    assert [str(d) for d in parse_devices(None)] == ["cpu"]
    with pytest.raises(Exception, match="expected device ids"):
        parse_devices("gpu0")


def random_ranking_map(gnd, n_db, trials=200, seed=0):
    from retrieval.metrics import revisitop_map

    rng = np.random.default_rng(seed)
    return np.mean([revisitop_map(np.stack([rng.permutation(n_db) for _ in gnd]), gnd)["medium"]["map"]
                    for _ in range(trials)])


@pytest.mark.slow
def test_evaluate_on_real_landmark_photos(tmp_path):
    """The default pretrained net on 33 real photos of 8 places: far better than chance."""
    csv_path = shared_path("landmarks", "ground_truth.csv")
    common = ["--out-root", str(tmp_path), "--dataset", f"folder:{csv_path}", "--set", "num_workers=0"]
    invoke([*common, "predict", "-b", "8"])
    out = invoke([*common, "evaluate", "--rerank", "none,aqe"])
    assert "GeM single-scale + αQE" in out
    res = json.loads((tmp_path / "pretrained" / "eval" / "landmarks_ss_none" / "results.json").read_text())
    from retrieval.data import load_folder

    ds = load_folder(csv_path)
    chance = random_ranking_map(ds.gnd, len(ds.db))
    medium = res["metrics"]["medium"]["map"]
    assert medium > chance + 0.3, (medium, chance)  # observed ≈ 0.7 vs chance ≈ 0.2
    q_ids, db_ids, ranks, _ = read_ranks(tmp_path / "pretrained" / "eval" / "landmarks_ss_none" / "ranks.h5")
    sacre = next(i for i, q in enumerate(q_ids) if "sacre_coeur" in q)
    top5 = [db_ids[j] for j in ranks[sacre, :5]]
    assert sum("sacre_coeur" in d for d in top5) >= 3, top5
    assert (tmp_path / "pretrained" / "eval" / "landmarks_ss_aqe" / "ranked.html").stat().st_size > 10_000
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3


def test_evaluate_without_features_says_what_to_run(tmp_path):
    (tmp_path / "l.csv").write_text("path,landmark_id\na.jpg,1\nb.jpg,1\n")
    result = CliRunner().invoke(build_cli(V1_PARAMS, name="v1"),
                                ["--out-root", str(tmp_path), "--dataset", f"folder:{tmp_path / 'l.csv'}",
                                 "evaluate", "--ms"])
    assert result.exit_code != 0
    assert "query_ms.h5: features not found; run `predict --ms` first" in result.output


def test_bad_rerank_name_is_rejected(tmp_path):
    result = CliRunner().invoke(build_cli(V1_PARAMS, name="v1"), ["--out-root", str(tmp_path), "evaluate",
                                                                   "--rerank", "none,magic"])
    assert result.exit_code == 2 and "unknown step 'magic'" in result.output


@pytest.mark.slow
def test_experiment_file_runs_the_pipeline_on_the_synthetic_benchmark(tmp_path):
    """The daily commands, as a user types them, on the tiny synthetic benchmark."""
    base = [sys.executable, str(REPO / "experiments" / "v1.py"), "--out-root", str(tmp_path / "v1"),
            "--data-root", str(tmp_path / "data"), "--set", 'synthetic_size="tiny"', "--set", "num_workers=0"]

    def run(*args):
        proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run("predict", "-d", "0")
    run("predict", "--ms", "-b", "8")
    run("evaluate", "--rerank", "none")
    out = run("evaluate", "--ms", "--rerank", "none,aqe,adba+aqe")
    assert "GeM multi-scale + αDBA + αQE" in out
    setting = tmp_path / "v1" / "pretrained"
    for split in ("query", "db"):
        for f in ("ss", "ms"):
            assert (setting / "features" / "synthetic-tiny-s0" / f"{split}_{f}.h5").is_file()
    res = json.loads((setting / "eval" / "synthetic-tiny-s0_ms_aqe" / "results.json").read_text())
    assert res["n_queries"] == 6 and set(res["metrics"]) == {"easy", "medium", "hard"}
    assert 0.0 < res["metrics"]["medium"]["map"] <= 1.0
    assert (setting / "eval" / "synthetic-tiny-s0_ms_adba+aqe" / "ranked.html").is_file()
    table = subprocess.run([sys.executable, "-m", "retrieval.report", "table", str(tmp_path / "v1" / "results.csv"),
                            "--dataset", "synthetic-tiny-s0", "--select", "ss:none,ms:none,ms:aqe,ms:adba+aqe"],
                           capture_output=True, text=True, check=True).stdout
    assert len(table.splitlines()) == 6


def test_unreadable_query_and_db_images_are_skipped_and_evaluation_goes_on(tmp_path):
    from conftest import write_jpeg

    rows = ["path,landmark_id,query"]
    for i in range(6):
        write_jpeg(tmp_path / f"{i}.jpg", seed=i)
        rows.append(f"{i}.jpg,{i % 2},{int(i < 2)}")
    (tmp_path / "0.jpg").write_bytes(b"")  # a query that cannot be read
    (tmp_path / "5.jpg").write_text("not a jpeg")  # a database image that cannot be read
    (tmp_path / "gt.csv").write_text("\n".join(rows) + "\n")
    common = ["--out-root", str(tmp_path / "out"), "--dataset", f"folder:{tmp_path / 'gt.csv'}",
              "--set", "pretrained=null", "--set", "image_size=64", "--set", "num_workers=0"]
    invoke([*common, "predict"])
    skipped = (tmp_path / "out" / "pretrained" / "features" / tmp_path.name / "skipped.csv").read_text()
    assert "query_ss.h5,0,0," in skipped and "db_ss.h5,3,5," in skipped
    invoke([*common, "evaluate", "--rerank", "none,adba+aqe"])
    res = json.loads((tmp_path / "out" / "pretrained" / "eval" / f"{tmp_path.name}_ss_none" / "results.json")
                     .read_text())
    assert res["n_queries_missing"] == 1 and res["n_db_missing"] == 1
    assert res["per_query_ap"]["medium"][0] == 0.0  # the unreadable query retrieves nothing
    _, _, ranks, _ = read_ranks(tmp_path / "out" / "pretrained" / "eval" / f"{tmp_path.name}_ss_none" / "ranks.h5")
    assert (ranks[0] == -1).all() and sorted(ranks[1]) == [0, 1, 2]  # db index 3 (5.jpg) has no features
