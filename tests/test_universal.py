"""Universal-embedding training: weighted datasets, stages that change the head, margin, patches and data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_PARAMS, write_labelled_folder
from retrieval.data.augment import TrainImages
from retrieval.data.samplers import TrainBatchSampler, weighted_selection
from retrieval.data.trainset import domain_weights, heldout_split, load_train_set, load_train_sets, merge_train_sets
from retrieval.models import load_checkpoint
from retrieval.train import train


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_merged_train_sets_keep_classes_and_ids_apart(tmp_path):
    a = write_labelled_folder(tmp_path / "a", n_classes=2, per_class=3)
    b = write_labelled_folder(tmp_path / "b", n_classes=3, per_class=2, seed=1)  # same ids and landmark names as a
    ts = load_train_sets([{"name": "shops", "train_set": f"folder:{a}"},
                          {"name": "sights", "train_set": f"folder:{b}", "weight": 2}])
    assert ts.n_classes == 5 and len(ts) == 12 and len(set(ts.ids)) == 12
    assert ts.classes == ["shops/lm0", "shops/lm1", "sights/lm0", "sights/lm1", "sights/lm2"]
    assert ts.ids[0] == "shops/c0_v0" and ts.domain_names == ("shops", "sights")
    assert ts.domains.tolist() == [0] * 6 + [1] * 6 and ts.labels[6:].min() == 2  # offset past a's classes
    rest, val = heldout_split(ts, 1, seed=0)
    assert rest.domains is not None and len(rest.domains) == len(rest)
    entries = [{"name": "shops", "train_set": "x"}, {"name": "sights", "train_set": "y", "weight": 2}]
    assert domain_weights(entries).tolist() == [1.0, 2.0]
    assert domain_weights(entries, ["sights"]).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match=r"datasets \['museums'\] are not train_sets names"):
        domain_weights(entries, ["museums"])
    with pytest.raises(ValueError, match="names must be unique"):
        merge_train_sets([("a", ts), ("a", ts)])
    with pytest.raises(ValueError, match=r"train_sets\[0\] \(a\): unknown keys \['weigth'\]"):
        domain_weights([{"name": "a", "train_set": "x", "weigth": 1}])


def test_weighted_selection_draws_weight_times_each_source():
    domains = np.array([0] * 10 + [1] * 6)
    sel = weighted_selection(np.arange(16), domains, [0.5, 2.0], seed=0, epoch=3)
    real, repeat = sel % 16, sel // 16
    assert np.count_nonzero(domains[real] == 0) == 5 and np.count_nonzero(domains[real] == 1) == 12
    assert len(set(sel.tolist())) == len(sel) and set(repeat[domains[real] == 1].tolist()) == {0, 1}
    assert np.array_equal(sel, weighted_selection(np.arange(16), domains, [0.5, 2.0], seed=0, epoch=3))
    assert not np.array_equal(sel, weighted_selection(np.arange(16), domains, [0.5, 2.0], seed=0, epoch=4))
    sampler = TrainBatchSampler(np.arange(16) % 4, np.zeros(16, int), 4, domains=domains, domain_weights=[0.0, 2.0])
    keys = [k for batch in sampler for k in batch]
    assert len(keys) == 12 and all(domains[k[0]] == 1 for k in keys)
    assert sorted(k[3] for k in keys if len(k) == 4) == [1] * 6  # the second copies carry their repeat number


def test_a_repeated_image_gets_its_own_augmentation(tmp_path):
    data = write_labelled_folder(tmp_path / "d", n_classes=1, per_class=2)
    images = TrainImages(load_train_set(f"folder:{data}"), [(64, 48)], (0.5,) * 3, (0.5,) * 3, "hard", seed=0)
    first, again, repeat = images[(0, 0, 1)][1], images[(0, 0, 1)][1], images[(0, 0, 1, 1)][1]
    assert torch.equal(first, again) and not torch.equal(first, repeat)


@pytest.mark.slow
def test_stages_add_datasets_raise_the_margin_overlap_patches_and_switch_the_head(tmp_path):
    """One ViT run through three stages, then a resume from the switched head's checkpoint."""
    a = write_labelled_folder(tmp_path / "a", n_classes=2, per_class=4)
    b = write_labelled_folder(tmp_path / "b", n_classes=2, per_class=3, seed=1)
    params = {**TINY_TRAIN_PARAMS, "architecture": "vit_tiny_patch16_224", "pooling": "cls",
              "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64},
              "fc_dim": 16, "dropout": 0.1, "neck_bn": False, "loss": "arcface", "margin": 0.2,
              "optimizer": "adamw", "size_templates": [[64, 64]],
              "train_sets": [{"name": "a", "train_set": f"folder:{a}"}, {"name": "b", "train_set": f"folder:{b}"}],
              "stages": [{"epochs": 1, "lr": 0.01, "freeze_backbone": True, "datasets": ["a"]},
                         {"epochs": 1, "lr": 0.01, "frozen_blocks": 1, "freeze_neck": True, "margin": 0.5,
                          "patch_stride": 12, "size_templates": [[68, 68]]},
                         {"epochs": 1, "lr": 0.01, "loss": "softmax", "freeze_backbone": True}]}
    train(params, tmp_path / "run", ["cpu"])
    log = list(csv.DictReader((tmp_path / "run" / "train_log.csv").open()))
    assert [r["images"] for r in log] == ["8", "14", "14"]  # dataset b joins in the second stage
    e1, e2, e3 = (tmp_path / "run" / f"ep{i}.pth" for i in (1, 2, 3))
    m1, m2, m3 = (load_checkpoint(e).meta for e in (e1, e2, e3))
    assert (m1["head"]["m"], m2["head"]["m"]) == (0.2, 0.5) and m2["patch_stride"] == 12 and m1["patch_stride"] is None
    assert m3["head"]["name"] == "softmax" and m3["head"]["n_classes"] == 4
    s1, s2, s3 = _state(e1), _state(e2), _state(e3)
    vit = "backbone.vit."
    for frozen in ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "neck.fc.weight"):
        key = frozen if frozen.startswith("neck") else vit + frozen
        assert torch.equal(s1[key], s2[key]), f"stage 2 moved {key}"
    assert not torch.equal(s1[vit + "blocks.1.attn.qkv.weight"], s2[vit + "blocks.1.attn.qkv.weight"])
    assert "head.margins" in s2 and "head.margins" not in s3
    assert not torch.equal(s2["head.weight"], s3["head.weight"])  # the softmax stage trained the same rows on
    # resuming from the softmax checkpoint rebuilds the switched head before loading its weights
    assert train(params, tmp_path / "run", ["cpu"], resume=e3) == e3


def test_evaluate_reports_mp5_overall_and_per_domain(tmp_path):
    """Two domains, leave-one-out: mP@5 ignores the query itself; each domain gets its own mP@5 and mAP."""
    import json

    from retrieval.data import load_folder
    from retrieval.evaluate import evaluate_features
    from retrieval.features import write_features
    from retrieval.report import read_results_csv

    rows = ["id,path,landmark_id,domain"]
    for domain, n_classes in (("shops", 2), ("sights", 3)):
        for c in range(n_classes):
            rows += [f"{domain}{c}_{v},{domain}{c}_{v}.jpg,{domain}{c},{domain}" for v in range(3)]
    (tmp_path / "gt.csv").write_text("\n".join(rows) + "\n")
    ds = load_folder(tmp_path / "gt.csv")
    assert ds.domains["sights2_1"] == "sights" and len(ds.queries) == 15
    # shops: each image nearest to its own class; sights: class 0 found, classes 1 and 2 swapped
    label = {i: ds.labels[i] for i in ds.db.ids}
    centre = {"shops0": 0, "shops1": 1, "sights0": 2, "sights1": 4, "sights2": 3}
    truth = {"shops0": 0, "shops1": 1, "sights0": 2, "sights1": 3, "sights2": 4}
    rng = np.random.default_rng(0)

    def feats(ids, place):
        f = np.stack([np.eye(8)[place[label[i]]] + 0.01 * rng.standard_normal(8) for i in ids]).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    # queries sit at their class, the database at the (partly swapped) places: sights1/2 queries find the other class
    write_features(tmp_path / "q.h5", ds.queries.ids, feats(ds.queries.ids, truth))
    write_features(tmp_path / "db.h5", ds.db.ids, feats(ds.db.ids, centre))
    (res,) = evaluate_features(ds, tmp_path / "q.h5", tmp_path / "db.h5", ["none"], tmp_path / "eval",
                               feature_kind="ss", experiment="t", setting="s", results_csv=tmp_path / "results.csv")
    # n_q = 2 positives per query (itself is junk): shops and sights0 queries score 1, sights1/2 score 0
    assert res["mp@5"] == pytest.approx(9 / 15)
    assert res["domains"]["shops"] == {"n_queries": 6, "mp@5": 1.0, "map": pytest.approx(
        {"easy": 1.0, "medium": 1.0, "hard": float("nan")}, nan_ok=True)}
    assert res["domains"]["sights"]["mp@5"] == pytest.approx(3 / 9)
    on_disk = json.loads((tmp_path / "eval" / f"{ds.name}_ss_none" / "results.json").read_text())
    assert on_disk["mp@5"] == pytest.approx(0.6)
    (row,) = read_results_csv(tmp_path / "results.csv")
    assert row["mp5"] == "60.00" and row["mp5_domains"] == "shops:100.00 sights:33.33"
