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


def clustered(rng, n, d, n_centres=20, noise=0.05):
    centres = rng.normal(size=(n_centres, d))
    x = (centres[rng.integers(0, n_centres, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_blocked_exact_search_returns_the_neighbours_of_one_shot_exact(tmp_path):
    """FAISS result heaps over blocks (from arrays and from the HDF5 file) = one exact search of the whole."""
    from retrieval.search import knn_blocked, knn_file

    rng = np.random.default_rng(3)
    db, q = unit_rows(rng, 6000, 48), unit_rows(rng, 300, 48)
    one_scores, one_ids = knn(q, db, 60)
    ids_list = [f"x{i}" for i in range(len(db))]
    path = write_features(tmp_path / "db.h5", ids_list, db)
    for scores, ids in (knn_blocked(q, (db[s:s + 777] for s in range(0, len(db), 777)), 60),
                        knn_file(q, path, 60, block_rows=1000), knn_file(q, path, 60, block_rows=100_000)):
        np.testing.assert_array_equal(ids, one_ids)
        np.testing.assert_allclose(scores, one_scores, atol=1e-6)
    # fewer rows than k: capped by knn_file, padded (-1, -inf) by knn_blocked
    scores, ids = knn_blocked(q[:2], [db[:3], db[3:5]], 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4]
    assert knn_file(q[:2], path, 10**6, block_rows=4096)[1].shape == (2, 6000)
    # float16 storage is read back as float32 and searched like the rounded vectors
    half = write_features(tmp_path / "half.h5", ids_list, db.astype(np.float16))
    np.testing.assert_array_equal(knn_file(q, half, 20, block_rows=2500)[1],
                                  knn(q, db.astype(np.float16).astype(np.float32), 20)[1])


def test_knn_graph_file_equals_the_in_memory_graph_and_resumes_after_a_kill(tmp_path):
    from retrieval.index import build_index
    from retrieval.search import build_knn_graph_file, read_knn_graph

    rng = np.random.default_rng(4)
    x = clustered(rng, 3000, 32)
    features = write_features(tmp_path / "f.h5", [f"r{i}" for i in range(len(x))], x)
    want_scores, want_ids = knn_graph(x, 6)
    calls = []

    def killed_on_third_batch(rows):  # called on each batch of 500 graph rows and each database block of 700/200
        calls.append(len(rows))
        if calls.count(500) == 3:
            raise KeyboardInterrupt  # the run dies here; batches 0 and 1 are committed
        return rows

    out = tmp_path / "graph.h5"
    with pytest.raises(KeyboardInterrupt):
        build_knn_graph_file(features, out, 6, batch=500, block_rows=700, transform=killed_on_third_batch)
    assert not out.exists() and (tmp_path / "graph.h5.tmp").exists()
    calls.clear()
    build_knn_graph_file(features, out, 6, batch=500, block_rows=700,
                         transform=lambda rows: calls.append(len(rows)) or rows)
    assert calls.count(500) == 4  # resumed at row 1000: the 4 batches left, not all 6
    ids, scores, nb = read_knn_graph(out)
    assert ids == [f"r{i}" for i in range(len(x))] and not (tmp_path / "graph.h5.tmp").exists()
    np.testing.assert_array_equal(nb, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    # an approximate index holding the rows builds the same kind of graph, close to the exact one
    ivf, _ = build_index(features, "IVF16,Flat")
    ivf.nprobe = 4
    build_knn_graph_file(features, tmp_path / "ivf.h5", 6, index=ivf, index_name="IVF16,Flat nprobe=4", batch=1000)
    _, _, approx = read_knn_graph(tmp_path / "ivf.h5")
    assert np.mean([len(set(a) & set(b)) / 6 for a, b in zip(approx, want_ids, strict=True)]) > 0.9
    _, mem_ids = knn_graph(x, 6, index=ivf)
    np.testing.assert_array_equal(mem_ids, approx)
