"""Tests for retrieval.rerank.l2019 (Landmark2019 sort and insert steps)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.metrics import gldv2_map_at_k
from retrieval.recognition import knn_vote, no_label
from retrieval.rerank import RerankContext, rerank_search
from retrieval.rerank.l2019 import l2019_rerank
from retrieval.search import knn

# Index images 0..9: labels and vote confidences (9 has no prediction).
DB_LABELS = np.array(["A", "B", "A", "C", "B", "A", "A", "B", "A", ""], dtype=object)
DB_CONF = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.9, 0.1, 0.7, 0.0])
ROW = [3, 0, 1, 2, 4, 5]
ROW_SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def reference(ids_row, query_label, db_labels, db_conf, top):
    """The rule written out per query: positives of the window, inserted by confidence, the rest, cut, refilled."""
    k = len(ids_row)
    window = [i for i in ids_row[:min(top, k)] if i >= 0]
    new = window
    if not no_label(np.asarray([query_label]))[0]:
        pos = [i for i in window if db_labels[i] == query_label]
        neg = [i for i in window if db_labels[i] != query_label]
        cands = sorted((i for i in range(len(db_labels)) if db_labels[i] == query_label and i not in window),
                       key=lambda i: (-db_conf[i], i))
        new = (pos + cands + neg)[:min(top, k)]
    out = []
    for i in new + [i for i in ids_row if i >= 0]:
        if i not in out:
            out.append(i)
    return (out + [-1] * k)[:k]


def check_rows(scores, ids):
    """Rows non-increasing in score, no id twice, padding (-1) last and scored -inf."""
    assert np.all(scores[:, :-1] >= scores[:, 1:])
    assert np.all(np.isneginf(scores[ids < 0]))
    for row in ids:
        valid = row[row >= 0]
        assert len(set(valid.tolist())) == len(valid) and np.all(row[len(valid):] == -1)


def test_sort_and_insert_by_hand():
    ids = np.array([ROW, ROW, [4, 7, -1, -1, -1, -1]])
    scores = np.array([ROW_SCORES, ROW_SCORES, [0.9, 0.8] + [-np.inf] * 4], np.float32)
    query_labels = np.array(["A", None, "B"], dtype=object)
    out_scores, out_ids = l2019_rerank(scores, ids, query_labels, np.ones(3), DB_LABELS, DB_CONF, top=4)
    # Query "A", window [3 C, 0 A, 1 B, 2 A]: sort step moves 0, 2 ahead in their order; insert step adds the other
    # "A" images by confidence (6: .9, 8: .7, 5: .5) and the cut to 4 keeps 6, 8; the original list refills the rest.
    assert out_ids[0].tolist() == [0, 2, 6, 8, 3, 1]
    assert out_ids[1].tolist() == ROW  # no prediction: not moved
    assert np.array_equal(out_scores[1], scores[1])
    # Query "B", both results are "B": nothing to move; image 1 ("B") is inserted, 7 is already there.
    assert out_ids[2].tolist() == [4, 7, 1, -1, -1, -1]
    # Δ = max - min + 1 per row: moved s + 2Δ, inserted min + Δ, the rest keep s.
    d = 0.9 - 0.4 + 1
    assert np.allclose(out_scores[0], [0.8 + 2 * d, 0.6 + 2 * d, 0.4 + d, 0.4 + d, 0.9, 0.7])
    assert np.allclose(out_scores[2, :3], [0.9 + 2.2, 0.8 + 2.2, 0.8 + 1.1]) and np.all(np.isneginf(out_scores[2, 3:]))
    assert out_scores.dtype == np.float32 and out_ids.dtype == np.int64
    check_rows(out_scores, out_ids)
    for i in range(3):
        assert out_ids[i].tolist() == reference(ids[i].tolist(), query_labels[i], DB_LABELS, DB_CONF, 4)


def test_sort_step_is_stable_and_insert_skips_images_already_in_the_window():
    ids = np.array([ROW])
    scores = np.array([ROW_SCORES], np.float32)
    # top ≥ k: the window is the whole row; 5 ("A") is in it, so only 6 and 8 are inserted.
    _, out = l2019_rerank(scores, ids, np.array(["A"], dtype=object), [1.0], DB_LABELS, DB_CONF)
    assert out[0].tolist() == [0, 2, 5, 6, 8, 3]
    # Only the sort step when nothing else carries the label.
    labels = np.array(["A", "B", "A", "C", "B", "A"], dtype=object)
    _, out = l2019_rerank(scores, ids, np.array(["B"], dtype=object), [1.0], labels, np.zeros(6))
    assert out[0].tolist() == [1, 4, 3, 0, 2, 5]


def test_insert_order_ties_and_integer_sentinels():
    db_labels = np.array([7, 7, 7, 3, -1, 7])
    db_conf = np.array([0.5, 0.5, 0.9, 0.1, 0.9, 0.5])
    ids = np.array([[3, 4, 0], [3, 4, 0]])
    scores = np.array([[0.9, 0.5, 0.1]] * 2)
    out_scores, out = l2019_rerank(scores, ids, np.array([7, -1]), np.ones(2), db_labels, db_conf, top=3)
    # 0 moves ahead; 2 (.9) then 1 and 5 (.5 each, lower index first) are inserted; -1 images never are.
    assert out[0].tolist() == [0, 2, 1]
    assert out[1].tolist() == [3, 4, 0] and np.array_equal(out_scores[1], scores[1])
    # A query label that no index image has: nothing to move.
    _, out = l2019_rerank(scores[:1], ids[:1], np.array([42]), [1.0], db_labels, db_conf)
    assert out[0].tolist() == [3, 4, 0]


def test_matches_the_rule_on_random_rankings():
    rng = np.random.default_rng(0)
    n_db, q, k = 300, 2500, 12  # more queries than one block
    db_labels = rng.integers(-1, 8, n_db)
    db_conf = rng.random(n_db).round(1)
    query_labels = rng.integers(-1, 10, q)
    ids = np.stack([rng.permutation(n_db)[:k] for _ in range(q)])
    ids[rng.random(q) < 0.1, -3:] = -1
    scores = np.where(ids >= 0, -np.sort(-rng.random((q, k)), axis=1), -np.inf).astype(np.float32)
    out_scores, out = l2019_rerank(scores, ids, query_labels, rng.random(q), db_labels, db_conf, top=5)
    assert out.shape == ids.shape and out_scores.shape == scores.shape
    for i in range(0, q, 7):
        assert out[i].tolist() == reference(ids[i].tolist(), query_labels[i], db_labels, db_conf, 5)
    check_rows(out_scores, out)


def angle(deg):
    t = np.deg2rad(np.asarray(deg, np.float64))
    return np.stack([np.cos(t), np.sin(t)], axis=-1).astype(np.float32)


def test_labels_fix_an_interleaved_ranking():
    # Two landmarks on either side of the query's axis: by similarity their index images interleave (A +10°,
    # B -20°, A +30°, B -40°, A +50°, B -60°, A +70°), but each one's nearest train images carry its label.
    index = angle([10, -20, 30, -40, 50, -60, 70])
    index_ids = ["a10", "b20", "a30", "b40", "a50", "b60", "a70"]
    train = angle([15, 35, 55, 75, -15, -35, -55, -75])
    train_labels = np.array(["A"] * 4 + ["B"] * 4)
    query = angle([3])
    truth = {"q": ["a10", "a30", "a50", "a70"]}

    scores, ids = knn(query, index, 5)
    assert [index_ids[i] for i in ids[0]] == ["a10", "b20", "a30", "b40", "a50"]
    q_labels, q_conf = knn_vote(query, train, train_labels)
    db_labels, db_conf = knn_vote(index, train, train_labels)
    assert q_labels.tolist() == ["A"] and db_labels.tolist() == ["A", "B", "A", "B", "A", "B", "A"]
    new_scores, new_ids = l2019_rerank(scores, ids, q_labels, q_conf, db_labels, db_conf, top=5)

    def m_ap(rows):
        return gldv2_map_at_k({"q": [index_ids[i] for i in rows[0]]}, truth, k=5)

    assert m_ap(ids) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert [index_ids[i] for i in new_ids[0]] == ["a10", "a30", "a50", "a70", "b20"]  # a70 inserted
    assert m_ap(new_ids) == pytest.approx(1.0)
    assert np.all(np.diff(new_scores[0]) <= 0)
    # the same through the evaluate chain, which votes with its context's train set
    context = RerankContext(params={"l2019_top": 5}, train_features=train, train_labels=train_labels)
    assert np.array_equal(rerank_search("l2019", query, index, 5, context=context)[1], new_ids)


def test_errors():
    ids = np.array([ROW])
    scores = np.array([ROW_SCORES])
    with pytest.raises(ValueError, match="must both be"):
        l2019_rerank(scores[:, :3], ids, np.array(["A"]), [1.0], DB_LABELS, DB_CONF)
    with pytest.raises(ValueError, match="one per query"):
        l2019_rerank(scores, ids, np.array(["A", "B"]), [1.0], DB_LABELS, DB_CONF)
    with pytest.raises(ValueError, match="only 3 db labels"):
        l2019_rerank(scores, ids, np.array(["A"]), [1.0], DB_LABELS[:3], DB_CONF[:3])
    with pytest.raises(ValueError, match="top must be"):
        l2019_rerank(scores, ids, np.array(["A"]), [1.0], DB_LABELS, DB_CONF, top=0)
