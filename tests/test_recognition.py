"""Tests for retrieval.recognition (kNN voting, Kaggle submission files) and metrics.gap."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from retrieval.metrics import gap
from retrieval.recognition import (
    knn_vote,
    no_label,
    read_recognition_submission,
    read_retrieval_submission,
    validate_recognition_submission,
    validate_retrieval_submission,
    write_recognition_submission,
    write_retrieval_submission,
)


def norm(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters(n_per: int = 5, seed: int = 0, labels=(10, 20, 30)):
    """Tight clusters around the first axes: ``(feats, labels, centres)``."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8, dtype=np.float32)[:len(labels)]
    feats = norm(np.repeat(centres, n_per, axis=0) + 0.05 * rng.standard_normal((len(labels) * n_per, 8)))
    return feats, np.repeat(np.asarray(labels), n_per), centres


# --------------------------------------------------------------------------------------------------
# knn_vote
# --------------------------------------------------------------------------------------------------


def test_knn_vote_clear_clusters_and_confidence_is_cosine_sum():
    train, train_labels, centres = clusters()
    queries = norm(centres + 0.02)
    labels, conf = knn_vote(queries, train, train_labels, k=3)
    assert labels.tolist() == [10, 20, 30] and labels.dtype == train_labels.dtype
    top3 = np.sort(queries @ train.T, axis=1)[:, ::-1][:, :3]  # all three neighbours share the label
    assert np.allclose(conf, top3.sum(axis=1), atol=1e-5)


def test_knn_vote_soft_votes_and_ties_go_to_the_nearer_neighbour():
    q = np.array([[1, 0, 0, 0]], np.float32)
    # Similarities to q are exact: B 0.75; A 0.5 + 0.25 = 0.75, a tie; B holds the nearest neighbour.
    train = np.array([[0.75, np.sqrt(0.4375), 0, 0], [0.5, 0, np.sqrt(0.75), 0], [0.25, 0, 0, np.sqrt(0.9375)]],
                     np.float32)
    labels, conf = knn_vote(q, train, np.array(["B", "A", "A"]), k=3)
    assert labels.tolist() == ["B"] and conf[0] == pytest.approx(0.75)
    # Soft voting: two A votes (0.5 + 0.25) lose to one nearer B vote (0.8) where a majority vote would not.
    train[0] = [0.8, 0.6, 0, 0]
    labels, conf = knn_vote(q, train, np.array(["B", "A", "A"]), k=3)
    assert labels.tolist() == ["B"] and conf[0] == pytest.approx(0.8)
    labels, conf = knn_vote(q, train, np.array(["B", "A", "A"]), k=1)
    assert labels.tolist() == ["B"]


def test_knn_vote_string_labels_keep_their_dtype():
    train, train_labels, centres = clusters(labels=("eiffel", "louvre"))
    for lab in (train_labels, train_labels.astype(object)):
        labels, _ = knn_vote(centres, train, lab, k=3)
        assert labels.tolist() == ["eiffel", "louvre"] and labels.dtype == lab.dtype


def test_knn_vote_exclude_self_is_leave_one_out():
    train, train_labels, _ = clusters(n_per=4, labels=("a", "b"))
    train_labels = train_labels.copy()
    train_labels[0] = "b"  # a mislabelled image inside cluster a
    assert knn_vote(train, train, train_labels, k=1)[0][0] == "b"  # its own label
    assert knn_vote(train, train, train_labels, k=1, exclude_self=True)[0][0] == "a"
    loo, _ = knn_vote(train, train, train_labels, k=3, exclude_self=True)
    assert loo.tolist() == ["a"] * 4 + ["b"] * 4
    # k larger than the train set: everyone else votes, so the odd one out takes the others' label.
    small = knn_vote(train[1:4], train[1:4], np.array(["a", "a", "b"]), k=5, exclude_self=True)[0]
    assert small[2] == "a"


def test_knn_vote_errors():
    train, train_labels, _ = clusters()
    with pytest.raises(ValueError, match="one per train vector"):
        knn_vote(train, train, train_labels[:-1])
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_vote(train, train, train_labels, k=0)
    with pytest.raises(ValueError, match="exclude_self needs"):
        knn_vote(train[:2], train, train_labels, exclude_self=True)


def test_no_label():
    assert no_label(np.array([3, -1, 0])).tolist() == [False, True, False]
    assert no_label(np.array(["x", ""])).tolist() == [False, True]
    assert no_label(np.array([1.0, np.nan])).tolist() == [False, True]
    assert no_label(np.array(["x", None, "", float("nan"), 4], dtype=object)).tolist() == [False, True, True, True,
                                                                                            False]


# --------------------------------------------------------------------------------------------------
# GAP
# --------------------------------------------------------------------------------------------------


def _gap_reference(pred, conf, true):
    """DELF's GlobalAveragePrecision loop on dicts (predictions without a label left out)."""
    predictions = {i: (p, c) for i, (p, c) in enumerate(zip(pred, conf, strict=True)) if p is not None}
    solution = {i: [] if t is None else [t] for i, t in enumerate(true)}
    correct, ap = 0, 0.0
    ranked = sorted(predictions.items(), key=lambda item: item[1][1], reverse=True)
    for total, (key, (label, _)) in enumerate(ranked, start=1):
        if label in solution[key]:
            correct += 1
            ap += correct / total
    return ap / sum(1 for v in solution.values() if v)


def test_gap_by_hand_with_missing_predictions_and_non_landmarks():
    # Ranked predictions: q2 (0.95, a non-landmark: wrong), q0 (0.9, right), q1 (0.8, wrong), q4 (0.5, right);
    # q3 has no prediction. GAP = (1/2 + 2/4) / M, M = 4 landmark queries (q0, q1, q3, q4).
    true = ["A", "B", None, "C", "A"]
    pred = ["A", "C", "B", None, "A"]
    conf = [0.9, 0.8, 0.95, float("nan"), 0.5]
    assert gap(pred, conf, true) == pytest.approx(0.25)
    assert gap(pred, conf, ["A", "B", "", "C", "A"]) == pytest.approx(0.25)


def test_gap_with_an_integer_sentinel():
    # Sorted: q2 (0.9, true -1: wrong), q1 (0.6, right, P = 1/2), q0 (0.5, right, P = 2/3); q3 predicts -1 = nothing.
    true = np.array([1, 2, -1, 3])
    pred = np.array([1, 2, 5, -1])
    conf = np.array([0.5, 0.6, 0.9, 0.99])
    assert gap(pred, conf, true, non_landmark=-1) == pytest.approx((1 / 2 + 2 / 3) / 3)


def test_gap_perfect_ties_and_edge_cases():
    assert gap([1, 2, 3], [0.1, 0.9, 0.5], [1, 2, 3]) == pytest.approx(1.0)
    # Equal confidences keep input order: the wrong prediction first halves the score.
    assert gap([9, 2], [0.5, 0.5], [1, 2]) == pytest.approx(0.25)
    assert gap([2, 9], [0.5, 0.5], [2, 1]) == pytest.approx(0.5)
    assert math.isnan(gap([1], [0.5], [None]))
    assert gap([None, None], [0.1, 0.2], [1, 2]) == 0.0
    with pytest.raises(ValueError, match="one of each per query"):
        gap([1, 2], [0.5], [1, 2])
    with pytest.raises(ValueError, match="NaN confidence"):
        gap([1], [float("nan")], [1])


def test_gap_matches_the_reference_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 30
        true = [None if rng.random() < 0.3 else int(rng.integers(5)) for _ in range(n)]
        pred = [None if rng.random() < 0.2 else int(rng.integers(5)) for _ in range(n)]
        conf = rng.random(n).round(1).tolist()  # rounding makes ties
        assert gap(pred, conf, true) == pytest.approx(_gap_reference(pred, conf, true))


# --------------------------------------------------------------------------------------------------
# Submission files
# --------------------------------------------------------------------------------------------------

TEST_IDS = ["q0", "q1", "q2"]
INDEX_IDS = ["i0", "i1", "i2", "i3", "i4"]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def raises_at(path: Path, message: str):
    """pytest.raises for a ValueError naming ``path`` and containing ``message``."""
    return pytest.raises(ValueError, match=re.escape(str(path)) + r".*" + re.escape(message))


def test_retrieval_submission_round_trip(tmp_path):
    ranks = np.array([[0, 3, -1], [4, 1, 2], [-1, -1, -1]])
    path = write_retrieval_submission(tmp_path / "sub" / "retrieval.csv", TEST_IDS, INDEX_IDS, ranks)
    assert path.read_text() == "id,images\nq0,i0 i3\nq1,i4 i1 i2\nq2,\n"
    assert not (tmp_path / "sub" / "retrieval.csv.tmp").exists()
    validate_retrieval_submission(path, TEST_IDS, INDEX_IDS)
    assert read_retrieval_submission(path) == {"q0": ["i0", "i3"], "q1": ["i4", "i1", "i2"], "q2": []}
    write_retrieval_submission(path, TEST_IDS, INDEX_IDS, ranks, k=1)
    assert read_retrieval_submission(path) == {"q0": ["i0"], "q1": ["i4"], "q2": []}


def test_recognition_submission_round_trip(tmp_path):
    conf = np.array([0.3, 0.25, 0.1], np.float32)
    path = write_recognition_submission(tmp_path / "recognition.csv", TEST_IDS, np.array([12, 7, -1]), conf,
                                        known_labels=[7, 12])
    validate_recognition_submission(path, TEST_IDS, known_labels=["7", "12"])
    back = read_recognition_submission(path)
    assert back == {"q0": ("12", float(conf[0])), "q1": ("7", 0.25), "q2": None}
    assert path.read_text().splitlines()[3] == "q2,"
    strings = write_recognition_submission(tmp_path / "s.csv", TEST_IDS, np.array(["x", None, ""], dtype=object),
                                           [1.0, 2.0, 3.0])
    assert read_recognition_submission(strings) == {"q0": ("x", 1.0), "q1": None, "q2": None}


@pytest.mark.parametrize(("text", "message"), [
    ("id,images\nq0,i0\nq1,i1\n", "1 of 3 test ids have no row, first 'q2'"),
    ("id,images\nq0,i0\nq1,i1\nq2,\nq0,i2\n", "line 5: duplicate id 'q0' (first on line 2)"),
    ("id,images\nq0,i0 zz\nq1,\nq2,\n", "line 2 (id 'q0'): unknown index id 'zz'"),
    ("id,images\nq0,\nq1,i1 i2 i1\nq2,\n", "line 3 (id 'q1'): index id 'i1' appears twice"),
    ("id,images\nq0,\nq1,\nq2,\nq9,\n", "line 5: unknown test id 'q9'"),
    ("id,img\nq0,\n", "header must be 'id,images'"),
    ("id,images\nq0,i0,i1\n", "line 2: expected 2 columns"),
])
def test_retrieval_validator_rejects_broken_files(tmp_path, text, message):
    path = write_text(tmp_path / "broken.csv", text)
    with raises_at(path, message):
        validate_retrieval_submission(path, TEST_IDS, INDEX_IDS)


def test_retrieval_validator_rejects_more_than_100_images(tmp_path):
    index_ids = [f"i{j}" for j in range(101)]
    path = write_text(tmp_path / "long.csv", f"id,images\nq0,{' '.join(index_ids)}\nq1,\nq2,\n")
    with raises_at(path, "line 2 (id 'q0'): 101 images, at most 100 allowed"):
        validate_retrieval_submission(path, TEST_IDS, index_ids)
    with raises_at(path, "101 images"):
        read_retrieval_submission(path)


@pytest.mark.parametrize(("text", "message"), [
    ("id,landmarks\nq0,1 0.5\nq2,\n", "1 of 3 test ids have no row, first 'q1'"),
    ("id,landmarks\nq0,1 0.5\nq1,\nq1,2 0.1\nq2,\n", "line 4: duplicate id 'q1' (first on line 3)"),
    ("id,landmarks\nq0,1 0.5\nq1,99 0.2\nq2,\n", "line 3 (id 'q1'): unknown landmark id '99'"),
    ("id,landmarks\nq0,1 high\nq1,\nq2,\n", "line 2 (id 'q0'): unparseable score 'high'"),
    ("id,landmarks\nq0,1 nan\nq1,\nq2,\n", "line 2 (id 'q0'): score must be finite"),
    ("id,landmarks\nq0,1 0.5 2\nq1,\nq2,\n", "line 2 (id 'q0'): landmarks must be '<landmark_id> <score>'"),
    ("id,images\nq0,\n", "header must be 'id,landmarks'"),
])
def test_recognition_validator_rejects_broken_files(tmp_path, text, message):
    path = write_text(tmp_path / "broken.csv", text)
    with raises_at(path, message):
        validate_recognition_submission(path, TEST_IDS, known_labels=[1, 2])


def test_validators_on_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        validate_retrieval_submission(tmp_path / "nope.csv", TEST_IDS, INDEX_IDS)


def test_failed_writes_leave_no_file(tmp_path):
    path = tmp_path / "recognition.csv"
    with raises_at(path, "line 3 (id 'q1'): unknown landmark id '7'"):
        write_recognition_submission(path, TEST_IDS, np.array([12, 7, 12]), np.ones(3), known_labels=[12])
    assert not path.exists() and not (tmp_path / "recognition.csv.tmp").exists()
    path = tmp_path / "retrieval.csv"
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*appears twice") as err:
        write_retrieval_submission(path, TEST_IDS, INDEX_IDS, np.array([[0, 0], [1, 2], [3, 4]]))
    assert ".tmp" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="only 5 index ids"):
        write_retrieval_submission(path, TEST_IDS, INDEX_IDS, np.array([[5], [1], [2]]))
    with pytest.raises(ValueError, match="k must be in 1..100"):
        write_retrieval_submission(path, TEST_IDS, INDEX_IDS, np.zeros((3, 1), int), k=101)
