import numpy as np
import pytest

from retrieval.rerank import (
    RerankContext,
    alpha_database_augmentation,
    alpha_query_expansion,
    average_query_expansion,
    parse_method,
    rerank_search,
)
from retrieval.search import knn


def norm(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


DB = norm([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]])
Q = norm([[1, 0.1, 0]])


def test_alpha_qe_by_hand():
    ranks = np.array([[0, 1, 2, 3]])
    s0, s1 = float(Q[0] @ DB[0]), float(Q[0] @ DB[1])
    expected = norm(Q[0] + s0**3 * DB[0] + s1**3 * DB[1])
    assert np.allclose(alpha_query_expansion(Q, DB, ranks, n=2, alpha=3.0), expected[None], atol=1e-6)


def test_average_qe_is_plain_mean():
    ranks = np.array([[1, 0, 2, 3]])
    assert np.allclose(average_query_expansion(Q, DB, ranks, n=2), norm(Q[0] + DB[1] + DB[0])[None], atol=1e-6)


def test_qe_ignores_negative_similarities_and_n0():
    q = norm([[-1, 0, 0.01]])
    out = alpha_query_expansion(q, DB, np.array([[0, 1]]), n=1, alpha=1.0)  # similarity < 0 → weight 0
    assert np.allclose(out, q, atol=1e-6)
    assert np.allclose(alpha_query_expansion(Q, DB, np.array([[0]]), n=0), Q)


def test_qe_needs_enough_neighbours():
    with pytest.raises(ValueError, match="needs at least 3 valid neighbours"):
        alpha_query_expansion(Q, DB, np.array([[0, 1]]), n=3)
    with pytest.raises(ValueError, match="needs at least 2 valid neighbours"):
        alpha_query_expansion(Q, DB, np.array([[0, -1]]), n=2)


def test_alpha_dba_by_hand():
    out = alpha_database_augmentation(DB, n=1, alpha=3.0)
    # DB[0]'s nearest other vector is DB[1] (0.8); DB[3] is orthogonal to all: weight 0, unchanged.
    assert np.allclose(out[0], norm(DB[0] + 0.8**3 * DB[1]), atol=1e-6)
    assert np.allclose(out[3], DB[3], atol=1e-6)
    _, ranks = knn(DB, DB, 2)
    assert np.allclose(alpha_database_augmentation(DB, 1, 3.0, ranks=ranks), out)


def test_rerank_pipelines_return_valid_rankings():
    rng = np.random.default_rng(0)
    db = norm(rng.standard_normal((50, 8)))
    q = norm(db[:5] + 0.1 * rng.standard_normal((5, 8)))
    for method in ("none", "qe", "aqe", "adba", "adba+aqe"):
        scores, ids = rerank_search(method, q, db, 50)
        assert ids.shape == (5, 50) and all(sorted(r) == list(range(50)) for r in ids), method
        assert (np.diff(scores, axis=1) <= 1e-5).all()
    assert np.array_equal(rerank_search("none", q, db, 10)[1], knn(q, db, 10)[1])
    with pytest.raises(ValueError, match="unknown step 'dqe'"):
        rerank_search("dqe", q, db, 10)


def test_qe_pulls_up_a_neighbour_of_the_top_result():
    """B is far from the query but close to its top match A; after αQE it overtakes the distractor D."""
    a, d, b = norm([0.95, 0.31, 0]), norm([0.7, -0.714, 0]), norm([0.6, 0.8, 0])
    db = np.stack([a, d, b])
    q = norm([[1, 0, 0]])
    assert knn(q, db, 3)[1].tolist() == [[0, 1, 2]]
    assert rerank_search("aqe", q, db, 3, qe_n=1)[1].tolist() == [[0, 2, 1]]


def test_chains_parse_vector_steps_first_and_reject_bad_orders():
    assert parse_method("none") == ([], [])
    assert parse_method("adba+aqe+diffusion+sv") == (["adba", "aqe"], ["diffusion", "sv"])
    assert parse_method("l2019+sv") == ([], ["l2019", "sv"])
    for bad, msg in [("diffusion+aqe", "come before"), ("aqe+adba", "adba comes before"), ("qe+aqe", "one of"),
                     ("sv+sv", "twice"), ("aqe+foo", "unknown step 'foo'")]:
        with pytest.raises(ValueError, match=msg):
            parse_method(bad)


def test_ranking_steps_say_what_context_they_miss():
    rng = np.random.default_rng(0)
    db = norm(rng.standard_normal((20, 4)))
    with pytest.raises(ValueError, match="l2019 re-ranking needs a labelled train set"):
        rerank_search("l2019", db[:2], db, 5)
    with pytest.raises(ValueError, match="sv re-ranking needs the query and database images"):
        rerank_search("sv", db[:2], db, 5)


@pytest.mark.parametrize("method", ["none", "aqe", "adba+aqe", "adba+diffusion", "kreciprocal"])
def test_a_kept_cache_gives_the_same_rankings_and_is_built_once(method):
    rng = np.random.default_rng(3)
    db = rng.normal(size=(300, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries = db[:5] + 0.1 * rng.normal(size=(5, 16)).astype(np.float32)
    ctx = RerankContext(params={"diffusion_kd": 10, "diffusion_kq": 4, "kr_k1": 10, "kr_k2": 3})
    fresh = rerank_search(method, queries, db, 10, context=ctx)
    cache: dict = {}
    first = rerank_search(method, queries, db, 10, context=ctx, cache=cache)
    built = {key: id(value) for key, value in cache.items()}
    extras = {key: id(v) for db_state in cache.values() for key, v in db_state.extras.items()}
    assert bool(extras) == ("diffusion" in method)  # diffusion's offline stage is kept too
    assert ("adba", 2, 3.0) in cache if "adba" in method else set(cache) == {"raw"}
    again = rerank_search(method, queries[::-1], db, 10, context=ctx, cache=cache)
    assert {key: id(value) for key, value in cache.items()} == built
    assert {key: id(v) for db_state in cache.values() for key, v in db_state.extras.items()} == extras
    for a, b in zip(fresh, first, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again[1], first[1][::-1])
