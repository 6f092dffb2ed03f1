"""Post-processing (`retrieval.postprocess`): PCA-whitening, ensembles, float16 storage."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from retrieval.features import FeaturesReader, read_features, write_features
from retrieval.postprocess import (
    convert_features,
    ensemble_features,
    learn_whitening,
    load_whitening,
    save_whitening,
    whiten_features,
)


def correlated(rng, n, d):
    """Rows with very unequal variances along random directions (what whitening flattens), L2-normalised."""
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = (rng.normal(size=(n, d)) * np.geomspace(3.0, 0.05, d)) @ basis.T + 0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pca_whitening_matches_the_formula_and_whitens_its_learning_set(tmp_path):
    rng = np.random.default_rng(0)
    learn = correlated(rng, 3000, 16)
    path = write_features(tmp_path / "train.h5", [f"t{i}" for i in range(len(learn))], learn)
    w = learn_whitening(path, block_rows=700)  # covariance accumulated over 5 blocks
    # reference: Jégou & Chum 2012, P = Λ^(-1/2) Uᵀ from numpy's covariance
    x64 = learn.astype(np.float64)
    mean = x64.mean(0)
    lam, u = np.linalg.eigh(np.cov(x64, rowvar=False, bias=True))
    lam, u = lam[::-1], u[:, ::-1]
    np.testing.assert_allclose(w.mean, mean, atol=1e-10)
    np.testing.assert_allclose(w.eigenvalues, lam, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.abs(w.projection), np.abs(lam[:, None] ** -0.5 * u.T), rtol=1e-4, atol=1e-6)
    # the learning set, projected (before L2), has identity covariance
    projected = (x64 - w.mean) @ w.projection.T
    np.testing.assert_allclose(np.cov(projected, rowvar=False, bias=True), np.eye(16), atol=1e-6)
    # applied rows are unit length; the same whitening from an array equals the one from the file
    y = w(learn[:5])
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(learn_whitening(learn).projection, w.projection, rtol=1e-6, atol=1e-9)


def test_shrinkage_and_dimension_reduction(tmp_path):
    rng = np.random.default_rng(1)
    learn, other = correlated(rng, 2000, 12), correlated(rng, 50, 12)
    rotation = learn_whitening(learn, shrinkage=0.0)  # s = 0: a PCA rotation, inner products of centred rows kept
    centred = other.astype(np.float64) - rotation.mean
    np.testing.assert_allclose((centred @ rotation.projection.T) @ (centred @ rotation.projection.T).T,
                               centred @ centred.T, atol=1e-9)
    half = learn_whitening(learn, dim=4, shrinkage=0.5)
    assert half.dim_in == 12 and half.dim_out == 4 and half(other).shape == (50, 4)
    np.testing.assert_allclose(np.linalg.norm(half.projection, axis=1), half.eigenvalues[:4] ** -0.25, rtol=1e-6)
    saved = load_whitening(save_whitening(tmp_path / "w.h5", half))
    np.testing.assert_allclose(saved(other), half(other), atol=1e-6)
    assert saved.shrinkage == 0.5 and saved.name == "w" and saved.n_rows == 2000
    with pytest.raises(ValueError, match="dim 13 must be in 1..12"):
        learn_whitening(learn, dim=13)
    with pytest.raises(ValueError, match="dim 12 must be in 1..9"):
        learn_whitening(learn[:10], dim=12)  # 10 rows: a covariance of rank 9
    with pytest.raises(ValueError, match="shrinkage must be in"):
        learn_whitening(learn, shrinkage=2.0)


def test_whitened_and_float16_files_keep_ids_and_name_their_source(tmp_path):
    rng = np.random.default_rng(2)
    x = correlated(rng, 500, 8)
    ids = [f"i{j}" for j in range(500)]
    src = write_features(tmp_path / "db.h5", ids, x, architecture="net", scales=[1.0, 0.5])
    wpath = save_whitening(tmp_path / "pca.h5", learn_whitening(correlated(rng, 800, 8), dim=6, name="pca"))
    out = whiten_features(src, wpath, tmp_path / "db_pca.h5", block_rows=128)
    got_ids, feats, attrs = read_features(out)
    assert got_ids == ids and feats.shape == (500, 6)
    np.testing.assert_allclose(feats, load_whitening(wpath)(x), atol=1e-6)
    assert attrs["whitening"] == "pca" and attrs["whitening_file"] == str(wpath) and attrs["architecture"] == "net"
    assert attrs["dim"] == 6 and attrs["scales"] == [1.0, 0.5]
    half = convert_features(src, tmp_path / "db16.h5", "float16", block_rows=100)
    with h5py.File(half, "r") as f:
        assert f["feats"].dtype == np.float16
    with FeaturesReader(half) as reader:
        block = next(reader.blocks(1000))[1]
        assert block.dtype == np.float32 and reader.ids == ids
    np.testing.assert_allclose(block, x, atol=1e-3)
    with pytest.raises(ValueError, match="6-d rows but the whitening pca takes 8-d"):
        whiten_features(out, wpath, tmp_path / "twice.h5")


def test_ensembles_concatenate_with_weights_or_average(tmp_path):
    rng = np.random.default_rng(3)
    ids = [f"i{j}" for j in range(300)]
    a, b, c = unit(rng.normal(size=(300, 4))), unit(rng.normal(size=(300, 6))), unit(rng.normal(size=(300, 4)))
    fa, fb, fc = (write_features(tmp_path / f"{n}.h5", ids, v.astype(np.float32))
                  for n, v in zip("abc", (a, b, c), strict=True))
    out = ensemble_features([fa, fb, fc], tmp_path / "concat.h5", [0.5, 1.0, 0.5], block_rows=64)
    got_ids, feats, attrs = read_features(out)
    want = unit(np.concatenate([0.5 * a, 1.0 * b, 0.5 * c], 1))  # Landmark2019: each block × weight, row L2
    assert got_ids == ids and feats.shape == (300, 14)
    np.testing.assert_allclose(feats, want, atol=1e-6)
    assert [m["weight"] for m in json.loads(attrs["ensemble"])] == [0.5, 1.0, 0.5]
    assert attrs["ensemble_mode"] == "concat"
    mean = read_features(ensemble_features([fa, fc], tmp_path / "mean.h5", mode="mean", dtype="float16"))[1]
    np.testing.assert_allclose(mean, unit(a + c), atol=2e-3)  # GUIE's pair: the average, L2-normalised
    # the same images in another order are aligned by id
    perm = rng.permutation(300)
    fb_shuffled = write_features(tmp_path / "b_shuffled.h5", [ids[i] for i in perm], b[perm].astype(np.float32))
    shuffled = ensemble_features([fa, fb_shuffled, fc], tmp_path / "concat2.h5", [0.5, 1.0, 0.5], block_rows=64)
    np.testing.assert_allclose(read_features(shuffled)[1], want, atol=1e-6)


def test_ensembles_refuse_files_of_other_images(tmp_path):
    rng = np.random.default_rng(4)
    x = unit(rng.normal(size=(20, 4))).astype(np.float32)
    fa = write_features(tmp_path / "a.h5", [f"i{j}" for j in range(20)], x)
    fb = write_features(tmp_path / "b.h5", [f"i{j}" for j in range(19)] + ["other"], x)
    with pytest.raises(ValueError) as err:
        ensemble_features([fa, fb], tmp_path / "e.h5")
    message = str(err.value)
    assert "\n" not in message and str(fa) in message and str(fb) in message and "id lists differ" in message
    assert not (tmp_path / "e.h5").exists()
    fc = write_features(tmp_path / "c.h5", [f"i{j}" for j in range(20)], unit(rng.normal(size=(20, 6))).astype(
        np.float32))
    with pytest.raises(ValueError, match="dimensions differ.*use concat"):
        ensemble_features([fa, fc], tmp_path / "m.h5", mode="mean")
    with pytest.raises(ValueError, match="2 weights for 1 features file"):
        ensemble_features([fa], tmp_path / "w.h5", [1, 2])
