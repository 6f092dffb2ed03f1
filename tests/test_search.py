import numpy as np
import pytest

from retrieval.features import SchemaError, write_features
from retrieval.search import knn, knn_graph, knn_numpy, read_ranks, write_ranks


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("search", [knn, knn_numpy])
def test_knn_matches_brute_force(search):
    rng = np.random.default_rng(0)
    db, q = unit_rows(rng, 500, 32), unit_rows(rng, 20, 32)
    scores, ids = search(q, db, 10)
    sims = q @ db.T
    expected = np.argsort(-sims, axis=1)[:, :10]
    assert ids.shape == (20, 10) and ids.dtype == np.int64
    assert np.array_equal(ids, expected)
    assert np.allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)


def test_k_larger_than_db_and_full_ranking():
    rng = np.random.default_rng(1)
    db, q = unit_rows(rng, 7, 4), unit_rows(rng, 3, 4)
    for search in (knn, knn_numpy):
        scores, ids = search(q, db, 50)
        assert ids.shape == (3, 7) and all(sorted(r) == list(range(7)) for r in ids)
        assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_knn_rejects_bad_input():
    db = np.zeros((5, 4), np.float32)
    with pytest.raises(TypeError, match="queries must be a 2-D"):
        knn(np.zeros(4, np.float32), db, 2)
    with pytest.raises(ValueError, match="queries has dimension 3, expected 4"):
        knn(np.zeros((1, 3), np.float32), db, 2)
    with pytest.raises(TypeError, match="floating point"):
        knn(np.zeros((1, 4), np.int64), db, 2)


def test_ranks_file_round_trip(tmp_path):
    ranks = np.array([[2, 0, -1], [1, 2, 0]])
    scores = np.array([[0.9, 0.5, np.nan], [0.8, 0.3, 0.1]], np.float32)
    path = write_ranks(tmp_path / "ranks.h5", ["q1", "q2"], ["a", "b", "c"], ranks, scores)
    q_ids, db_ids, r, s = read_ranks(path)
    assert q_ids == ["q1", "q2"] and db_ids == ["a", "b", "c"]
    assert np.array_equal(r, ranks) and np.allclose(s, scores, equal_nan=True)
    with pytest.raises(ValueError, match="must be"):
        write_ranks(tmp_path / "x.h5", ["q1"], ["a"], ranks, scores)
    features = write_features(tmp_path / "f.h5", ["a"], np.ones((1, 2), np.float32))
    with pytest.raises(SchemaError, match="not a retrieval.ranks file"):
        read_ranks(features)


def test_knn_graph_drops_self_and_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores, ids = knn_graph(x, 5, batch=64)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1)[:, :5]
    assert ids.shape == (300, 5) and not (ids == np.arange(300)[:, None]).any()
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, want, axis=1), rtol=1e-5)


def test_knn_graph_keeps_neighbours_when_self_is_tied_away_from_column_0():
    x = np.ones((4, 3), np.float32) / np.sqrt(3)  # all identical: self may come anywhere
    _, ids = knn_graph(x, 3)
    for i, row in enumerate(ids):
        assert sorted(row) == sorted(set(range(4)) - {i})


def test_knn_graph_pads_small_sets_and_ivf_finds_clustered_neighbours():
    x = np.eye(3, dtype=np.float32)
    scores, ids = knn_graph(x, 4)
    assert (ids[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(0, 20, 4000)] + 0.05 * rng.normal(size=(4000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, exact = knn_graph(x, 10)
    _, approx = knn_graph(x, 10, index="ivf", nprobe=4)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx, strict=True)])
    assert recall > 0.9
    with pytest.raises(ValueError, match="unknown index"):
        knn_graph(x, 3, index="hnsw")
