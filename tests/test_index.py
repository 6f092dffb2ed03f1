"""FAISS indexes by factory string (`retrieval.index`): build from a features file, save, reload, search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.features import write_features
from retrieval.index import (
    IDS_FILE,
    INDEX_FILE,
    PARAMS_FILE,
    build_index,
    check_ids,
    create_index,
    load_index,
    save_index,
    search_batched,
    set_search_params,
)
from retrieval.search import knn


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """4000 clustered unit vectors (64 clusters, 32-d) in a features file, and 200 queries near them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 32))
    x = (centres[rng.integers(0, 64, 4000)] + 0.3 * rng.normal(size=(4000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, 4000, 200)] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ids = [f"img{i}" for i in range(len(x))]
    path = write_features(tmp_path_factory.mktemp("index") / "db.h5", ids, x)
    return path, ids, x, q


def recall_at_10(ids, exact):  # random ids would score 10 / 4000
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])


@pytest.mark.parametrize("factory, recall", [("Flat", 1.0), ("IVF32,Flat", 0.9), ("IVF32,PQ8x4", 0.2),
                                             ("IVF32,PQ8x4fs,RFlat", 0.9), ("HNSW16", 0.9), ("PCA16,IVF16,SQ8", 0.2)])
def test_factory_strings_build_inner_product_indexes_from_a_file(clustered, factory, recall):
    path, _, x, q = clustered
    _, exact = knn(q, x, 10)
    index, stats = build_index(path, factory, block_rows=900)  # added in 5 blocks
    assert index.ntotal == len(x) and index.metric_type == 0  # faiss.METRIC_INNER_PRODUCT
    assert stats["dim"] == 32 and stats["ntotal"] == 4000 and stats["add_s"] >= 0
    if factory.startswith("IVF"):
        refine = {"k_factor": 16} if factory.endswith("RFlat") else {}  # PQ codes, then 16·k re-ranked exactly
        assert stats["train_rows"] == 4000 and stats["search"] == {"nprobe": 1, **refine}
        assert set_search_params(index, nprobe=8, **refine) == {"nprobe": 8, **refine}
    if factory.startswith("HNSW"):
        assert stats["search"] == {"efsearch": 64}
    scores, ids = search_batched(index, q, 10, batch=64)
    assert ids.shape == (200, 10) and (np.diff(scores, axis=1) <= 1e-5).all()
    assert recall_at_10(ids, exact) >= recall, factory
    if factory == "Flat":
        np.testing.assert_array_equal(ids, exact)
        np.testing.assert_allclose(scores, knn(q, x, 10)[0], atol=1e-5)


def test_saved_index_reloads_with_its_ids_and_search_defaults(clustered, tmp_path):
    path, ids, x, q = clustered
    index, stats = build_index(path, "IVF32,Flat", train_rows=2000, seed=1)
    assert stats["train_rows"] == 2000
    folder = save_index(tmp_path / "ivf", index, ids, {**stats, "features": str(path), "whiten": None})
    assert sorted(p.name for p in folder.iterdir()) == sorted([INDEX_FILE, IDS_FILE, PARAMS_FILE])
    record = json.loads((folder / PARAMS_FILE).read_text())
    assert record["factory"] == "IVF32,Flat" and record["metric"] == "inner_product" and record["ntotal"] == 4000
    saved = load_index(folder)
    assert saved.ids == ids and saved.params["search"] == {"nprobe": 1}
    np.testing.assert_array_equal(saved.search(q, 10)[1], index.search(q, 10)[1])
    more = load_index(folder, nprobe=32)  # all 32 cells: exact
    assert more.params["search"] == {"nprobe": 32} and "nprobe=32" in more.describe()
    np.testing.assert_array_equal(more.search(q, 10, batch=7)[1], knn(q, x, 10)[1])
    check_ids(saved, ids, path)
    with pytest.raises(ValueError, match="was built on other rows than"):
        check_ids(saved, ids[::-1], "other.h5")
    with pytest.raises(ValueError, match="has no search parameter 'efsearch'"):
        load_index(folder, efsearch=10)
    # saving again replaces the folder whole, leaving no temporary folder behind
    flat, flat_stats = build_index(path, "Flat")
    save_index(folder, flat, ids, flat_stats)
    assert load_index(folder).params["factory"] == "Flat" and not (tmp_path / "ivf.tmp").exists()
    with pytest.raises(FileNotFoundError, match="no saved index here"):
        load_index(tmp_path / "missing")


def test_bad_factory_strings_and_sizes_are_one_line_errors(clustered):
    path, ids, _, _ = clustered
    with pytest.raises(ValueError, match=r"index 'IVFx,Flat': not a FAISS index-factory string for 8-d vectors"):
        create_index("IVFx,Flat", 8)
    with pytest.raises(ValueError, match="8192 IVF cells need at least as many training rows"):
        build_index(path, "IVF8192,Flat")
    index, _ = build_index(path, "Flat")
    with pytest.raises(ValueError, match="holds 4000 vectors but 3 ids"):
        save_index(path.parent / "bad", index, ids[:3], {})
