import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from retrieval.rerank.diffusion import (
    EXACT_BELOW,
    affinity,
    diffusion_dense,
    diffusion_rerank,
    laplacian,
    offline_diffusion,
    online_diffusion,
    spectral_offline,
    spectral_online,
    truncation_sets,
)
from retrieval.search import knn, knn_graph


@pytest.fixture(autouse=True)
def one_blas_thread():
    # The dense reference's small solves crawl when OpenBLAS threads fight other jobs for 2 cores.
    with threadpool_limits(1, user_api="blas"):
        yield


def embed(points: np.ndarray) -> np.ndarray:
    """2-D points onto the unit sphere, near its pole (local geometry kept, scale 1/10)."""
    v = np.hstack([points, np.full((len(points), 1), 10.0)])
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def chains():
    """Two parallel chains of points 0.02 apart along each chain and 0.1 across; queries on both."""
    t = np.arange(0, 3, 0.02)
    db = np.vstack([np.stack([t, 0 * t], 1), np.stack([t + 0.01, 0 * t + 0.1], 1)])
    labels = np.repeat([0, 1], len(t))
    queries = np.array([[0.51, 0.0], [1.51, 0.0], [2.01, 0.1], [1.0, 0.1]])
    return embed(db), labels, embed(queries), np.array([0, 0, 1, 1])


def clustered(n: int, dim: int = 16, n_queries: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 30), dim))
    x = centres[rng.integers(0, len(centres), n + n_queries)] + 0.7 * rng.standard_normal((n + n_queries, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x[:n], x[n:]


def precision(ids, labels, query_labels, m):
    return float(np.mean(labels[ids[:, :m]] == query_labels[:, None]))


def assert_same_ranking(scores, ids, ref_scores, ref_ids, rtol=1e-4, min_untied=0.5):
    assert ids.shape == ref_ids.shape and scores.shape == ref_scores.shape
    np.testing.assert_allclose(scores, ref_scores, rtol=rtol, atol=rtol * np.abs(ref_scores).max())
    # Ids must match wherever the reference's score is apart from its row neighbours' by more than
    # twice the largest score error (closer pairs may swap).
    gap = np.abs(np.diff(ref_scores, axis=1)) > 2 * np.abs(scores - ref_scores).max()
    untied = np.ones(ref_ids.shape, bool)
    untied[:, 1:] &= gap
    untied[:, :-1] &= gap
    assert untied.mean() > min_untied
    assert (ids[untied] == ref_ids[untied]).all()


def test_diffusion_follows_the_chain_that_knn_leaves():
    db, labels, queries, query_labels = chains()
    m = 20
    _, plain = knn(queries, db, m)
    _, diffused = diffusion_rerank(queries, db, m, kd=4, kq=3)
    _, spectral = diffusion_rerank(queries, db, m, kd=4, kq=3, spectral_rank=100)
    base = precision(plain, labels, query_labels, m)
    assert base < 0.7  # the other chain is nearer than the far end of one's own
    assert precision(diffused, labels, query_labels, m) == 1.0
    assert precision(spectral, labels, query_labels, m) == 1.0


def test_equals_the_dense_reference_when_cg_converges():
    db, queries = clustered(300)
    for kw in ({"kd": 8, "truncation": 1000, "kq": 4, "gamma": 1.0, "alpha": 0.9}, {"kd": 10, "truncation": 60}):
        ref = diffusion_dense(queries, db, 40, **kw)
        ours = diffusion_rerank(queries, db, 40, maxiter=2000, tol=1e-9, **kw)
        assert_same_ranking(*ours, *ref)
    # Landmark2019's 20 iterations already give nearly the exact top 10 here.
    _, ids = diffusion_rerank(queries, db, 10, kd=10, truncation=60)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, ref[1][:, :10], strict=True)]) >= 9


def test_spectral_variant_matches_its_dense_reference_and_the_exact_solve():
    db, queries = clustered(200)
    rank = 150
    ours = diffusion_rerank(queries, db, 30, kd=10, spectral_rank=rank)
    assert_same_ranking(*ours, *diffusion_dense(queries, db, 30, kd=10, spectral_rank=rank), rtol=1e-3)
    # Near full rank, FSR is the untruncated exact diffusion (truncation ≥ N).
    _, exact = diffusion_rerank(queries, db, 10, kd=10, truncation=1000, maxiter=2000, tol=1e-9)
    _, fsr = diffusion_rerank(queries, db, 10, kd=10, spectral_rank=len(db) - 2)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(fsr, exact, strict=True)]) >= 9


def test_truncation_sets_from_the_graph_or_a_search_agree():
    db, _ = clustered(400)
    graph = knn_graph(db, 120)
    from_graph = truncation_sets(db, 100, graph=graph)
    searched = truncation_sets(db, 100, graph=knn_graph(db, 10))
    assert from_graph.shape == (400, 101) and from_graph.dtype == np.int32
    assert (from_graph[:, 0] == np.arange(400)).all()
    assert np.mean([set(a) == set(b) for a, b in zip(from_graph, searched, strict=True)]) > 0.95
    assert truncation_sets(db[:5], 100).shape == (5, 5)  # capped at N − 1 others


def test_truncation_sets_of_a_large_database_come_from_nearby_cells():
    db, _ = clustered(EXACT_BELOW, dim=64)
    sets = truncation_sets(db, 200)
    assert sets.shape == (EXACT_BELOW, 201) and (sets[:, 0] == np.arange(EXACT_BELOW)).all()
    assert (sets[:, 1:] != np.arange(EXACT_BELOW)[:, None]).all() and (sets >= 0).all()
    assert all(len(set(row)) == 201 for row in sets[::500])
    sample = np.arange(0, EXACT_BELOW, 97)
    _, exact = knn(db[sample], db, 51)
    # An approximate search: most of the 50 nearest (random sets of 200 would hold 0.5 of them).
    recall = np.mean([len(set(a[1:]) & set(b[1:])) / 50 for a, b in zip(sets[sample], exact, strict=True)])
    assert recall > 0.8


def test_offline_matrix_is_sparse_and_workers_agree():
    db, _ = clustered(1500, dim=8)
    graph = knn_graph(db, 10)
    lap = laplacian(affinity(*graph, kd=10), 0.99)
    assert abs(lap - lap.T).max() < 1e-6 and np.allclose(lap.diagonal(), 1)
    sets = truncation_sets(db, 100, graph=graph)
    one = offline_diffusion(lap, sets, workers=1)
    two = offline_diffusion(lap, sets, workers=2)  # 1500 items of 101 slots: 3 batches, 2 processes
    assert sp.issparse(one) and one.shape == (1500, 1500) and one.nnz == 1500 * 101
    assert np.shares_memory(one.indices, sets)  # the sets become the CSR's columns, no copy
    np.testing.assert_allclose(one.toarray(), two.toarray(), atol=1e-6)
    assert (one.diagonal() > 0).all()


def test_mutual_affinity_and_padding():
    scores = np.array([[0.9, 0.5], [0.9, -0.2], [0.5, 0.1], [-np.inf, -np.inf]], np.float32)
    ids = np.array([[1, 2], [0, 2], [0, 3], [-1, -1]])
    w = affinity(scores, ids, kd=2, gamma=2.0).toarray()
    expected = np.zeros((4, 4), np.float32)
    expected[0, 1] = expected[1, 0] = 0.81  # 0 ↔ 1 mutual
    expected[0, 2] = expected[2, 0] = 0.25  # 0 ↔ 2 mutual; 1 → 2 and 2 → 3 are one-way
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_rows_are_full_permutation_prefixes_and_k_is_capped():
    db, queries = clustered(120)
    scores, ids = diffusion_rerank(queries, db, 500, kd=5, kq=2, truncation=10)
    assert scores.shape == ids.shape == (10, 120) and ids.dtype == np.int64
    assert all(sorted(row) == list(range(120)) for row in ids)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    s5, i5 = diffusion_rerank(queries, db, 5, kd=5, kq=2, truncation=10)
    assert i5.shape == (10, 5) and (i5 == ids[:, :5]).all()
    # Ranked by f where f ≠ 0, then the query's own kNN order for what the seeds' sets do not reach.
    knn_scores, knn_ids = knn(queries, db, 120)
    offline = offline_diffusion(laplacian(affinity(*knn_graph(db, 5))), truncation_sets(db, 10))
    _, online = online_diffusion(offline, knn_scores, knn_ids, 120, kq=2)
    assert (online == ids).all()
    for row, q_scores, q_ids in zip(online, knn_scores, knn_ids, strict=True):
        f = (np.maximum(q_scores[:2], 0) ** 3) @ offline[q_ids[:2]].toarray()
        reached = np.flatnonzero(f)
        assert 0 < len(reached) <= 22 and set(row[:len(reached)]) == set(reached)
        assert (row[len(reached):] == [i for i in q_ids if i not in set(reached)]).all()


def test_online_ranks_the_same_in_blocks_of_queries(monkeypatch):
    db, queries = clustered(200, n_queries=30)
    offline = offline_diffusion(laplacian(affinity(*knn_graph(db, 5))), truncation_sets(db, 20))
    q_knn = knn(queries, db, 200)
    whole = online_diffusion(offline, *q_knn, 150, kq=3)
    monkeypatch.setattr("retrieval.rerank.diffusion.ONLINE_BLOCK", 100)  # a few queries per block
    blocks = online_diffusion(offline, *q_knn, 150, kq=3)
    assert (whole[1] == blocks[1]).all() and np.array_equal(whole[0], blocks[0])


def test_spectral_stages_and_tiny_databases():
    db, queries = clustered(60)
    lap = laplacian(affinity(*knn_graph(db, 6), kd=6))
    u, h = spectral_offline(lap, 20)
    assert u.shape == (60, 20) and h.shape == (20,) and (h > 0).all()
    scores, ids = spectral_online(u, h, *knn(queries, db, 10), 7)
    assert ids.shape == (10, 7) and (np.diff(scores, axis=1) <= 0).all()
    one_scores, one_ids = diffusion_rerank(queries[:2], db[:1], 5)
    assert one_ids.tolist() == [[0], [0]] and np.isfinite(one_scores).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be a positive integer"),
    ({"kd": 0}, "kd must be a positive integer"),
    ({"kq": 2.5}, "kq must be a positive integer"),
    ({"truncation": 0}, "truncation must be"),
    ({"maxiter": 0}, "maxiter must be"),
    ({"alpha": 1.0}, "alpha must be in"),
    ({"gamma": 0.0}, "gamma and tol must be"),
    ({"tol": -1.0}, "gamma and tol must be"),
    ({"spectral_rank": 59}, "spectral_rank must be"),
    ({"graph": (np.zeros((60, 3)), np.zeros((60, 3), int))}, "3 neighbours per row, 50 are needed"),
    ({"graph": (np.zeros((59, 60)), np.zeros((59, 60), int))}, "graph must be"),
])
def test_invalid_arguments_raise(kwargs, message):
    db, queries = clustered(60)
    kwargs = {"k": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        diffusion_rerank(queries, db, **kwargs)


def test_invalid_inputs_raise():
    db, queries = clustered(60)
    with pytest.raises(ValueError, match="dimension"):
        diffusion_rerank(queries[:, :5], db, 10)
    with pytest.raises(ValueError, match="database is empty"):
        diffusion_rerank(queries, db[:0], 10)
    with pytest.raises(ValueError, match="start with the item itself"):
        offline_diffusion(sp.identity(60, format="csr"), np.zeros((60, 3), np.int32))
    with pytest.raises(ValueError, match="columns, 10 are needed"):
        online_diffusion(sp.identity(60, format="csr"), *knn(queries, db, 5), 10)
