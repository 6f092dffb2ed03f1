"""Evaluation at scale: the features-only benchmark, streamed (blocked / indexed) evaluation, GLDv2 mAP@100,
and the index / whiten / ensemble verbs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.data import load_dataset
from retrieval.data.vectors import SyntheticVectors, parse_spec
from retrieval.evaluate import default_topk, evaluate_features, load_pair, rank_dataset, streams
from retrieval.features import write_features
from retrieval.rerank import RerankContext
from retrieval.runner import build_cli
from retrieval.search import knn, read_ranks

SMALL = SyntheticVectors(5000, n_queries=200, dim=32, cluster_size=10, seed=3)


def test_synthetic_vectors_are_seeded_and_independent_of_the_block_size():
    db = SMALL.get_database()
    assert db.shape == (5000, 32) and db.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate(list(SMALL.database_iterator(bs=777))), db)
    parts = [np.concatenate(list(SMALL.database_iterator(bs=1000, split=(3, r)))) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), db)
    again = SyntheticVectors(5000, n_queries=200, dim=32, cluster_size=10, seed=3)
    np.testing.assert_array_equal(again.get_queries(), SMALL.get_queries())
    assert not np.array_equal(SyntheticVectors(5000, 200, 32, 10, seed=4).get_queries(), SMALL.get_queries())
    # ground truth: exact kNN; positives: the database rows of the query's landmark, which rank high
    np.testing.assert_array_equal(SMALL.get_groundtruth(10), knn(SMALL.get_queries(), db, 10)[1])
    positives = SMALL.positives()
    assert all((SMALL.db_labels[p] == label).all() and len(p) for p, label in zip(positives, SMALL.query_labels,
                                                                                  strict=True))
    top1 = SMALL.get_groundtruth(1)[:, 0]
    assert np.mean([t in p for t, p in zip(top1, positives, strict=True)]) > 0.2  # chance: 10 / 5000
    assert parse_spec("vectors:1e6,queries=10000,dim=512", seed=2) == SyntheticVectors(10**6, 10_000, 512, seed=2)
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        parse_spec("vectors:100,colour=red")


def test_features_only_dataset_loads_with_its_files_and_the_gldv2_protocol(tmp_path):
    ds = load_dataset("vectors:3000,queries=50,dim=16", tmp_path, seed=1)
    assert ds.protocol == "gldv2" and set(ds.features) == {"query", "db"}
    assert len(ds.db) == 3000 and len(ds.queries) == 50 and len(ds.gnd) == 50
    assert ds.db.paths[5].name == ds.db.ids[5]  # placeholders: there are no image files
    mtime = ds.features["db"].stat().st_mtime_ns
    assert load_dataset("vectors:3000,queries=50,dim=16", tmp_path, seed=1).features["db"].stat().st_mtime_ns == mtime
    assert default_topk(ds, 3000) == 100 and default_topk(ds, 3000, 10) == 10
    ds.protocol = "revisitop"
    assert default_topk(ds, 3000) == 3000 and default_topk(ds, 3_000_000) == 1000


@pytest.fixture(scope="module")
def vectors_ds(tmp_path_factory):
    return load_dataset("vectors:4000,queries=120,dim=24,cluster_size=8,noise=0.5", tmp_path_factory.mktemp("v"),
                        seed=0)


@pytest.mark.parametrize("method", ["none", "aqe", "qe"])
def test_streamed_evaluation_equals_the_in_memory_ranking(vectors_ds, tmp_path, method):
    """Blocked exact search (several blocks) + αQE reading back only the top rows = the whole-database path."""
    ds = vectors_ds
    assert streams(method)
    params = {"topk": 50, "search_block": 700, "qe_n": 3, "alpha": 3.0}
    res = evaluate_features(ds, ds.features["query"], ds.features["db"], [method], tmp_path, feature_kind="ss",
                            experiment="t", setting="s", results_csv=tmp_path / "r.csv", params=params)[0]
    _, _, ranks, scores = read_ranks(tmp_path / f"{ds.name}_ss_{method}" / "ranks.h5")
    pair = load_pair(ds, ds.features["query"], ds.features["db"], RerankContext(params=params))
    want_ranks, want_scores = rank_dataset(pair.q_feats, pair.q_ok, pair.db_feats, pair.db_ok, method, 50,
                                           qe_n=3, alpha=3.0)
    np.testing.assert_array_equal(ranks, want_ranks)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert res["topk"] == 50 and res["search"] == "exact, 700 rows per block"
    assert set(res["metrics"]) == {"gldv2"} and 0.3 < res["metrics"]["gldv2"]["map@100"] < 1.0
    assert len(res["per_query_ap"]["gldv2"]) == 120
    assert not (tmp_path / f"{ds.name}_ss_{method}" / "ranked.html").exists()  # no images to show


def test_chains_that_need_the_whole_database_still_run(vectors_ds, tmp_path):
    ds = vectors_ds
    params = {"diffusion_kd": 5, "diffusion_kq": 3, "diffusion_truncation": 50, "kr_k1": 5, "kr_k2": 2}
    results = evaluate_features(ds, ds.features["query"], ds.features["db"], ["none", "adba+aqe+diffusion",
                                                                              "kreciprocal"], tmp_path,
                                feature_kind="ss", experiment="t", setting="s", results_csv=tmp_path / "r.csv",
                                params=params)
    assert [r["search"] for r in results] == ["exact, 65536 rows per block"] + 2 * ["exact, whole database in memory"]
    for r in results:
        assert r["topk"] == 100 and 0.3 < r["metrics"]["gldv2"]["map@100"] <= 1.0


def test_index_whiten_and_ensemble_verbs_through_the_runner(tmp_path):
    """Two nets' features (written as predict would), combined, whitened, indexed and evaluated by name."""
    from conftest import TINY_TRAIN_PARAMS, write_labelled_folder
    from retrieval.data.trainset import load_train_set
    from retrieval.experiment import features_path

    data = write_labelled_folder(tmp_path / "data", n_classes=6, per_class=8, queries=True)
    params = {**TINY_TRAIN_PARAMS, "dataset": f"folder:{data}", "train_set": f"folder:{data}"}
    cli = build_cli(params, name="exp")
    common = ["--out-root", str(tmp_path / "out")]
    ds, labels = load_dataset(f"folder:{data}"), load_train_set(f"folder:{data}")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 12))
    for net in ("a", "b"):  # each "net" sees the classes through its own noise
        folder = tmp_path / "out" / "nets" / net
        for split, where, ids in (("query", ds.name, ds.queries.ids), ("db", ds.name, ds.db.ids),
                                  ("train", labels.name, labels.ids)):
            x = centres[[int(i.split("_")[0][1:]) for i in ids]] + 0.8 * rng.normal(size=(len(ids), 12))
            write_features(features_path(folder, where, split, False), ids,
                           (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))

    def invoke(*args):
        result = CliRunner().invoke(cli, [*common, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    members = ["-m", str(tmp_path / "out" / "nets" / "a.pth"), "-m", str(tmp_path / "out" / "nets" / "b.pth")]
    printed = invoke("ensemble", "ens", *members, "--weights", "0.5,1", "--splits", "query,db,train")
    assert len(printed.split()) == 3
    invoke("whiten", "--ensemble", "ens", "--name", "pca8", "--dim", "8", "--shrinkage", "0.5")
    assert (tmp_path / "out" / "ensembles" / "ens" / "whiten" / "pca8.h5").is_file()
    exact = invoke("evaluate", "--ensemble", "ens", "--whiten", "pca8", "--rerank", "none,adba+aqe")
    assert "αDBA + αQE" in exact
    folder = invoke("index", "--ensemble", "ens", "--whiten", "pca8", "--factory", "Flat", "--knn-graph", "3").strip()
    assert folder.endswith("index/data_ss_w-pca8_Flat") and json.loads(
        (tmp_path / "out" / folder.split("out/")[1] / "index.json").read_text())["whiten"] == "pca8"
    invoke("evaluate", "--ensemble", "ens", "--whiten", "pca8", "--index", "Flat", "--rerank", "aqe")
    eval_dir = tmp_path / "out" / "ensembles" / "ens" / "eval"
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and all("ensembles/ens" in r for r in rows[1:])
    indexed = json.loads((eval_dir / "data_ss_aqe" / "results.json").read_text())
    assert indexed["search"].startswith("index Flat") and indexed["whiten"] == "pca8"
    assert 0.5 < indexed["metrics"]["medium"]["map"] <= 1.0
    # the saved Flat index gives the exact path's ranking
    _, _, via_index, _ = read_ranks(eval_dir / "data_ss_aqe" / "ranks.h5")
    invoke("evaluate", "--ensemble", "ens", "--whiten", "pca8", "--index", "none", "--rerank", "aqe")
    np.testing.assert_array_equal(read_ranks(eval_dir / "data_ss_aqe" / "ranks.h5")[2], via_index)
    # what is missing is named, with the command that makes it
    result = CliRunner().invoke(cli, [*common, "evaluate", "--ensemble", "ens", "--index", "HNSW8"])
    assert result.exit_code != 0 and "run `index --factory HNSW8 --ensemble ens` first" in result.output
    result = CliRunner().invoke(cli, [*common, "evaluate", "--ensemble", "ens", "--whiten", "nope"])
    assert result.exit_code != 0 and "learn it with `whiten --name nope` first" in result.output
    result = CliRunner().invoke(cli, [*common, "ensemble", "bad", "-m", "pretrained"])
    assert result.exit_code != 0 and "features not found; run `predict --splits query` first" in result.output
