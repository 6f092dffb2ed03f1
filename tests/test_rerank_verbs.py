"""Re-ranking chains through the runner: evaluate --rerank with every ranking step, and submit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY_TRAIN_PARAMS, write_labelled_folder
from retrieval.recognition import (
    read_recognition_submission,
    read_retrieval_submission,
    validate_recognition_submission,
    validate_retrieval_submission,
)
from retrieval.runner import build_cli
from retrieval.search import read_ranks


@pytest.fixture()
def labelled(tmp_path):
    data = write_labelled_folder(tmp_path / "data", n_classes=4, per_class=5, queries=True)
    params = {**TINY_TRAIN_PARAMS, "dataset": f"folder:{data}", "train_set": f"folder:{data}",
              "diffusion_truncation": 10, "diffusion_kd": 4, "kr_k1": 4, "kr_k2": 2}
    return build_cli(params, name="exp"), ["--out-root", str(tmp_path / "out")], tmp_path / "out"


def invoke(cli, args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_evaluate_runs_every_chain_and_submit_writes_valid_files(labelled):
    cli, common, out = labelled
    invoke(cli, [*common, "predict", "--splits", "query,db,train"])
    methods = "none,l2019,adba+aqe+diffusion,kreciprocal,aqe+l2019"
    table = invoke(cli, [*common, "evaluate", "--rerank", methods])
    assert "αDBA + αQE + diffusion" in table and "k-reciprocal" in table and "L2019 sort+insert" in table
    for method in methods.split(","):
        res_dir = out / "pretrained" / "eval" / f"data_ss_{method}"
        q_ids, db_ids, ranks, scores = read_ranks(res_dir / "ranks.h5")
        assert ranks.shape == (4, 16) and all(sorted(r) == list(range(16)) for r in ranks), method
        assert (np.diff(scores, axis=1) <= 1e-5).all(), method
        res = json.loads((res_dir / "results.json").read_text())
        assert res["seconds_per_query"] > 0 and res["rerank"] == method
    # with the benchmark's own labels as the label set, the sort step puts every positive first
    l2019 = json.loads((out / "pretrained" / "eval" / "data_ss_l2019" / "results.json").read_text())
    assert l2019["metrics"]["medium"]["map"] == pytest.approx(1.0)

    printed = invoke(cli, [*common, "submit", "--rerank", "l2019"])
    paths = dict(line.split(": ", 1) for line in printed.strip().splitlines())
    validate_retrieval_submission(paths["retrieval"], q_ids, db_ids)
    validate_recognition_submission(paths["recognition"], q_ids, known_labels=[f"lm{c}" for c in range(4)])
    retrieved = read_retrieval_submission(paths["retrieval"])
    assert list(retrieved) == q_ids and all(len(v) == 16 for v in retrieved.values())
    recognised = read_recognition_submission(paths["recognition"])
    assert {q: lab for q, (lab, _) in recognised.items()} == {q: q.split("_")[0].replace("c", "lm") for q in q_ids}


def test_l2019_without_label_features_says_what_to_run(labelled):
    cli, common, _ = labelled
    invoke(cli, [*common, "predict"])
    result = CliRunner().invoke(cli, [*common, "evaluate", "--rerank", "l2019"])
    assert result.exit_code != 0 and "run `predict --splits train` first" in result.output
    result = CliRunner().invoke(cli, [*common, "submit", "--rerank", "none,aqe"])
    assert result.exit_code == 2 and "give one method" in result.output
