"""GLDv2-style cleaning: the rule on arrays, the noisy built-in split, and the clean verb end to end."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cleaning import CleanSettings, candidate_pairs, keep_mask, pair_inliers, same_label_neighbours
from retrieval.data.gldv2 import read_train_clean
from retrieval.data.noisy_train import make_noisy_train, read_noise, removal_scores
from retrieval.data.synthetic import make_synthetic
from retrieval.data.trainset import load_train_set
from retrieval.runner import build_cli
from tests.conftest import TINY_TRAIN_PARAMS

LABELS = np.array([0, 0, 0, 1, 1, 2])
NEIGHBOURS = np.array([[1, 2, 3], [0, 2, 4], [0, 1, 5], [4, 0, 1], [3, 1, 2], [0, 3, -1]])


def test_keep_mask_counts_same_label_neighbours_and_drops_small_landmarks():
    same = same_label_neighbours(LABELS, NEIGHBOURS)
    assert same.sum(1).tolist() == [2, 2, 2, 1, 1, 0]
    assert keep_mask(LABELS, NEIGHBOURS, 2).tolist() == [True, True, True, False, False, False]
    # landmark 1 keeps both images at freq 1, landmark 2's only image goes
    assert keep_mask(LABELS, NEIGHBOURS, 1).tolist() == [True, True, True, True, True, False]
    # at freq 1 with a minimum of 3 images per landmark, landmark 1 (2 images) goes too
    assert keep_mask(LABELS, NEIGHBOURS, 1, min_images=3).tolist() == [True] * 3 + [False] * 3


def test_verification_removes_neighbours_below_the_inlier_threshold():
    pairs = candidate_pairs(NEIGHBOURS, same_label_neighbours(LABELS, NEIGHBOURS), 1)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]  # unordered, once each
    inliers = pair_inliers(NEIGHBOURS, pairs, np.array([50, 5, 40, 31]))
    assert inliers[0].tolist() == [50, 5, 0] and inliers[2].tolist() == [5, 40, 0] and inliers[3, 0] == 31
    keep = keep_mask(LABELS, NEIGHBOURS, 1, inliers, inlier_threshold=30)
    assert keep.tolist() == [True, True, True, True, True, False]
    # at freq 2 only image 1 has two verified neighbours: its landmark is left with one image, dropped
    assert not keep_mask(LABELS, NEIGHBOURS, 2, inliers, inlier_threshold=30).any()
    assert keep_mask(LABELS, NEIGHBOURS, 2, inliers, inlier_threshold=30, min_images=1).tolist() == \
        [False, True, False, False, False, False]
    assert candidate_pairs(NEIGHBOURS, same_label_neighbours(LABELS, NEIGHBOURS), 3).shape == (0, 2)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="freq_threshold 5 > k 3"):
        CleanSettings(k=3, freq_threshold=5)
    with pytest.raises(ValueError, match="k must be"):
        CleanSettings(k=0)


def test_noisy_split_has_the_asked_noise_in_gldv2_layout(tmp_path):
    bench = tmp_path / "synthetic-tiny-s0"
    make_synthetic(bench, "tiny", 0)
    csv_path = make_noisy_train(bench, "tiny", 0)  # the defaults: 30% moved, 30% more distractors
    noise = read_noise(csv_path.parent / "noise.csv")
    assert Counter(noise.values()) == {"clean": 28, "wrong_label": 12, "distractor": 12}
    train = load_train_set(str(csv_path), tmp_path, gldv2_root=csv_path.parent)
    assert len(train) == 52 and all(p.is_file() for p in train.paths)
    assert all(p.relative_to(csv_path.parent).parts[:4] == ("train", i[0], i[1], i[2])
               for i, p in zip(train.ids, train.paths, strict=True))
    again = load_train_set("synthetic-noisy", tmp_path, synthetic_size="tiny")
    assert again.ids == train.ids
    scores = removal_scores([i for i, kind in noise.items() if kind == "clean"], noise)
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0
    scores = removal_scores(list(noise)[:0], noise)
    assert scores["precision"] == pytest.approx(24 / 52) and scores["recall"] == 1.0
    mild = make_noisy_train(tmp_path / "mild", "tiny", 0, wrong_labels=0.1, distractors=0.1)
    assert Counter(read_noise(mild.parent / "noise.csv").values()) == {"clean": 36, "wrong_label": 4,
                                                                      "distractor": 4}


@pytest.fixture()
def noisy_experiment(tmp_path):
    params = {**TINY_TRAIN_PARAMS, "dataset": "synthetic", "synthetic_size": "tiny", "data_root": str(tmp_path / "d"),
              "train_set": "synthetic-noisy", "val_dataset": None, "epochs": 1}
    return build_cli(params, name="exp", script=tmp_path / "exp.py"), tmp_path


def _invoke(cli, *args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_clean_verb_writes_a_gldv2_list_that_trains_with_job(noisy_experiment):
    cli, tmp = noisy_experiment
    out = tmp / "cleaned_subsets"
    result = _invoke(cli, "clean", "--train-csv", "synthetic-noisy", "--name", "tiny-emb", "--no-verify",
                     "--k", "6", "--freq-threshold", "1", "--out-dir", str(out))
    record = json.loads(result.stdout)
    mapping = read_train_clean(out / "tiny-emb.csv")
    assert sum(map(len, mapping.values())) == record["counts"]["images_after"] > 0
    assert record["counts"]["images_before"] == 52 and record["settings"]["verify"] is False
    assert set(record["against_known_noise"]) >= {"precision", "recall"}
    assert json.loads((out / "tiny-emb.json").read_text())["image_root"] == record["image_root"]
    cleaned = load_train_set(f"clean:{out / 'tiny-emb.csv'}", tmp / "d")  # images found from the record
    assert all(p.is_file() for p in cleaned.paths) and len(cleaned) == record["counts"]["images_after"]
    job = _invoke(cli, "--set", f"train_set={json.dumps(str(out / 'tiny-emb.csv'))}", "job")
    assert json.loads(job.stdout)["checkpoint"]


def test_a_killed_clean_resumes_without_reverifying_done_pairs(noisy_experiment):
    cli, tmp = noisy_experiment
    args = ["clean", "--train-csv", "synthetic-noisy", "--name", "tiny-sv", "--k", "8", "--freq-threshold", "1",
            "--inlier-threshold", "10", "--workers", "0", "--out-dir", str(tmp / "cs")]
    first = json.loads(_invoke(cli, *args).stdout)
    pairs_csv = next((tmp / "exp" / "pretrained" / "clean").glob("*/pairs_*.csv"))
    lines = pairs_csv.read_text().splitlines(keepends=True)
    assert len(lines) - 2 == first["pairs"] > 4  # header lines + one row per pair
    # a kill in the middle of verification: half the rows written, the next one cut short
    half = 2 + (len(lines) - 2) // 2
    pairs_csv.write_text("".join(lines[:half]) + lines[half][:5])
    (tmp / "cs" / "tiny-sv.csv").unlink()
    second = json.loads(_invoke(cli, *args).stdout)
    after = pairs_csv.read_text().splitlines(keepends=True)
    assert after[:half] == lines[:half]  # the verified pairs kept, not redone
    assert sorted(after) == sorted(lines)  # the rest verified once, no row repeated
    assert second["counts"] == first["counts"]


def test_noisy_split_landmarks_are_of_the_kinds_asked():
    from retrieval.data.noisy_train import SCENE_KINDS, _landmark_jobs
    from retrieval.data.synthetic import SIZES, _family
    from retrieval.data.synthetic_train import TRAIN_SIZES

    cfg, split = SIZES["tiny"], dataclasses.replace(TRAIN_SIZES["tiny"], hard_fraction=0.0)
    jobs = _landmark_jobs(cfg, split, 0, SCENE_KINDS)
    assert [j.landmark for j in jobs] == list(range(split.n_landmarks))
    assert {_family(j.family_seed, cfg.scene_mix)["kind"] for j in jobs} == set(SCENE_KINDS)
    assert {v.mode for j in jobs for v in j.views} == {"easy"}
    with pytest.raises(ValueError, match="kinds"):
        make_noisy_train(".", "tiny", 0, kinds=("statue",))
