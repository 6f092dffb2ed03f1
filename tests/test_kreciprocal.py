import numpy as np
import pytest
from test_diffusion import assert_same_ranking, chains, clustered, precision

from retrieval.rerank.kreciprocal import (
    encoding,
    expanded_sets,
    k_reciprocal_dense,
    k_reciprocal_rerank,
    reciprocal_sets,
    union_lists,
)
from retrieval.search import knn, knn_graph


def test_k_reciprocal_follows_the_chain_that_knn_leaves():
    db, labels, queries, query_labels = chains()
    m = 20
    _, plain = knn(queries, db, m)
    _, reranked = k_reciprocal_rerank(queries, db, m, k1=8, k2=3)
    assert precision(plain, labels, query_labels, m) < 0.7
    assert precision(reranked, labels, query_labels, m) == 1.0


@pytest.mark.parametrize("kwargs", [{}, {"k1": 6, "k2": 3, "lambda_value": 0.5},
                                    {"k1": 7, "k2": 1, "lambda_value": 0.0}])
def test_equals_the_published_dense_algorithm(kwargs):
    db, queries = clustered(300, n_queries=15)
    ours = k_reciprocal_rerank(queries, db, 60, **kwargs)
    ref = k_reciprocal_dense(queries, db, 60, **kwargs)
    # λ = 0 ties every item outside the query's support (Jaccard 1); both break ties by distance.
    assert_same_ranking(*ours, *ref, rtol=1e-5, min_untied=0.1)
    assert np.mean(ours[1] == ref[1]) > 0.99
    wide = k_reciprocal_rerank(queries, db, 60, graph=knn_graph(db, 40), **kwargs)  # extra columns are ignored
    assert (wide[1] == ours[1]).all()


def test_queries_are_neighbours_of_each_other_in_the_union():
    db, queries = clustered(100, n_queries=4)
    twins = np.vstack([queries, queries + 1e-3])
    twins /= np.linalg.norm(twins, axis=1, keepdims=True)
    lists = union_lists(twins, db, knn_graph(db, 5), 5)
    assert lists.shape == (108, 6) and (lists[:, 0] == np.arange(108)).all()
    assert (lists[:4, 1] == np.arange(4, 8)).all() and (lists[4:8, 1] == np.arange(4)).all()
    assert (lists[8:] >= 0).all() and (lists[:, 1:] != np.arange(108)[:, None]).all()


def test_reciprocal_and_expanded_sets_on_a_tiny_graph():
    # 0, 1, 2 list each other; 3 lists 0 and 1 but neither lists 3.
    lists = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 0, 1]], np.int32)
    r = reciprocal_sets(lists, 2)
    assert [sorted(x[x >= 0]) for x in r] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [3]]
    expanded = expanded_sets(lists, 2)
    assert [list(expanded[i].indices) for i in range(4)] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [3]]


def test_encoding_is_sparse_with_rows_summing_to_one():
    db, queries = clustered(400, n_queries=20)
    lists = union_lists(queries, db, knn_graph(db, 20), 20)
    v = encoding(queries, db, lists, 20)
    assert v.shape == (420, 420) and v.nnz <= 420 * 21 * 12
    np.testing.assert_allclose(np.asarray(v.sum(axis=1)).ravel(), 1, rtol=1e-5)
    assert (v.diagonal() > 0).all()  # each item is in its own R*


def test_rows_are_full_permutation_prefixes_and_k_is_capped():
    db, queries = clustered(80, n_queries=6)
    scores, ids = k_reciprocal_rerank(queries, db, 500)
    assert scores.shape == ids.shape == (6, 80) and ids.dtype == np.int64
    assert all(sorted(row) == list(range(80)) for row in ids)
    assert (np.diff(scores, axis=1) <= 0).all()
    s5, i5 = k_reciprocal_rerank(queries, db, 5)
    assert i5.shape == (6, 5) and (i5 == ids[:, :5]).all() and np.allclose(s5, scores[:, :5])
    tiny_scores, tiny_ids = k_reciprocal_rerank(queries[:1], db[:2], 5)
    assert tiny_ids.shape == (1, 2) and sorted(tiny_ids[0]) == [0, 1]


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be a positive integer"),
    ({"k1": 0}, "k1 must be a positive integer"),
    ({"k2": 0}, "k2 must be a positive integer"),
    ({"k1": 4, "k2": 6}, "k2 = 6 must be ≤ k1 \\+ 1"),
    ({"lambda_value": 1.5}, "lambda_value must be in"),
    ({"graph": (np.zeros((60, 3)), np.zeros((60, 3), int))}, "3 neighbours per row, k1 = 20 are needed"),
    ({"graph": (np.zeros((60, 30)), np.zeros((60, 31), int))}, "graph must be"),
])
def test_invalid_arguments_raise(kwargs, message):
    db, queries = clustered(60)
    kwargs = {"k": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        k_reciprocal_rerank(queries, db, **kwargs)
    if "graph" not in kwargs:
        with pytest.raises(ValueError, match=message):
            k_reciprocal_dense(queries, db, **kwargs)


def test_invalid_inputs_raise():
    db, queries = clustered(60)
    with pytest.raises(ValueError, match="dimension"):
        k_reciprocal_rerank(queries[:, :5], db, 10)
    with pytest.raises(ValueError, match="database is empty"):
        k_reciprocal_rerank(queries, db[:0], 10)
