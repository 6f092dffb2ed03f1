"""Training sets: every source loads into one TrainSet; the built-in train split never shows a benchmark landmark."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_jpeg, write_labelled_folder
from retrieval.data.gldv2 import gldv2_image_path, write_train_clean
from retrieval.data.trainset import from_labelled, load_train_set


def test_folder_csv(tmp_path):
    csv_path = write_labelled_folder(tmp_path, n_classes=3, per_class=2)
    ts = load_train_set(f"folder:{csv_path}")
    assert len(ts) == 6 and ts.n_classes == 3 and ts.classes == ["lm0", "lm1", "lm2"]
    assert ts.class_counts().tolist() == [2, 2, 2]
    assert ts.paths[0] == tmp_path / "c0_v0.jpg" and ts.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ts.sizes is None
    assert load_train_set(str(csv_path)).ids == ts.ids  # a bare CSV path works too


def test_folder_csv_without_labels_is_refused(tmp_path):
    write_jpeg(tmp_path / "a.jpg")
    (tmp_path / "list.csv").write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match=r"list\.csv: 1 rows have no landmark_id"):
        load_train_set(f"folder:{tmp_path / 'list.csv'}")


def test_gldv2_train_clean_and_train_csv(tmp_path):
    root = tmp_path / "gldv2"
    write_train_clean(root / "metadata" / "train_clean.csv", {12: ["abc1", "abc2"], 3: ["def1"]})
    ts = load_train_set("gldv2", tmp_path)
    assert ts.classes == ["3", "12"]  # numeric order
    assert dict(zip(ts.ids, ts.labels.tolist(), strict=True)) == {"abc1": 1, "abc2": 1, "def1": 0}
    assert ts.paths[0] == gldv2_image_path(root, "train", "abc1")
    (root / "metadata" / "train.csv").write_text("id,url,landmark_id\naaa1,u,5\naaa2,u,5\nbbb1,u,7\n")
    full = load_train_set("gldv2-full", tmp_path, min_images=2)
    assert full.ids == ["aaa1", "aaa2"] and full.classes == ["5"]
    # a cleaned subset in train_clean's schema, by path
    subset = tmp_path / "cleaned_subsets" / "mine.csv"
    write_train_clean(subset, {5: ["aaa1", "aaa2"]})
    assert load_train_set(str(subset), gldv2_root=root).ids == ["aaa1", "aaa2"]


def test_from_labelled_min_images_and_errors():
    ts = from_labelled("x", ["a", "b", "c"], [None] * 3, ["p", "p", "q"], np.array([[1, 2], [3, 4], [5, 6]]), 2)
    assert ts.ids == ["a", "b"] and ts.sizes.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="no class has 3 or more images"):
        from_labelled("x", ["a"], [None], ["p"], min_images=3)
    with pytest.raises(ValueError, match="unknown train set"):
        load_train_set("nope")


def test_synthetic_train_split_is_disjoint_from_the_benchmark(tmp_path):
    ts = load_train_set("synthetic", tmp_path, synthetic_size="tiny", seed=0)
    assert len(ts) == 40 and ts.n_classes == 8 and ts.sizes.shape == (40, 2)
    assert all(p.is_file() for p in ts.paths)
    bench = tmp_path / "synthetic-tiny-s0"
    bench_scenes = {r["scene"] for r in json.loads((bench / "meta_synthetic.json").read_text()) if r["landmark"] >= 0}
    train_scenes = {r["scene"] for r in json.loads((bench / "train" / "meta_train.json").read_text())}
    assert len(train_scenes) == 8 and not bench_scenes & train_scenes
    assert all(r["label"] != "junk" for r in json.loads((bench / "train" / "meta_train.json").read_text()))
    again = load_train_set("synthetic", tmp_path, synthetic_size="tiny", seed=0)  # reused, not redrawn
    assert again.ids == ts.ids and again.paths[0].stat().st_mtime_ns == ts.paths[0].stat().st_mtime_ns
