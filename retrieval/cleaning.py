"""Cleaning a noisy training set the way Landmark2019 cleaned GLDv2 (arXiv 1906.04087, section 3).

For every train image i of landmark y_i, take its ``k`` nearest train images in the embedding
(the train × train kNN graph, `retrieval.search.knn_graph`). Keep i when at least
``freq_threshold`` of them share y_i and, unless verification is off, are confirmed by spatial
verification with at least ``inlier_threshold`` RANSAC inliers (`retrieval.verify`). Their sweep
(inliers 20-50, frequency 1-10) chose 30 and 3, with affine RANSAC, 20 px residual and 1000
trials: those are the defaults here. Landmarks left with fewer than 2 images are dropped.

Only pairs that can change a decision are verified: same-landmark neighbours of images that
have at least ``freq_threshold`` of them, each unordered pair once. Local features and verified
pairs are cached (``local_<settings>.h5``, ``pairs_<settings>.csv``, named by their settings), so
a killed run resumes without re-verifying the pairs already done. Memory: the (N, k) graph plus
one verification worker's local features.

Outputs (`clean_experiment`), both written to a temporary name and renamed::

    cleaned_subsets/<name>.csv    landmark_id,images   (GLDv2's train_clean.csv schema)
    cleaned_subsets/<name>.json   source list, image root, features, checkpoint, settings, counts
                                  before and after, seconds per stage (and scores against a known
                                  noise list when the source has one: `retrieval.data.noisy_train`)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.data.dataset import ImageList
from retrieval.data.gldv2 import write_train_clean
from retrieval.data.trainset import TrainSet, load_train_set
from retrieval.features import read_features
from retrieval.report import write_json
from retrieval.search import knn_graph

logger = logging.getLogger(__name__)

IVF_FROM = 200_000  # train sets from this size get an IVF kNN graph instead of an exact one


@dataclass(frozen=True)
class CleanSettings:
    """The cleaning rule and its spatial verification (defaults: Landmark2019's)."""

    k: int = 100
    freq_threshold: int = 3
    inlier_threshold: int = 30
    verify: bool = True
    min_images: int = 2  # landmarks with fewer images left are dropped
    features: str = "sift"  # local features: sift (RootSIFT), aliked or disk (retrieval.local_features)
    max_keypoints: int = 2048
    resize: int = 1024  # long side the images are shrunk to for local features; the residual is in these pixels
    ransac: str = "affine"
    threshold: float = 20.0
    max_trials: int = 1000
    workers: int = 2  # verification processes

    def __post_init__(self) -> None:
        for name in ("k", "freq_threshold", "min_images", "max_trials"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"clean: {name} must be >= 1, got {getattr(self, name)}")
        if self.freq_threshold > self.k:
            raise ValueError(f"clean: freq_threshold {self.freq_threshold} > k {self.k} can keep nothing")
        if self.inlier_threshold < 0:
            raise ValueError(f"clean: inlier_threshold must be >= 0, got {self.inlier_threshold}")


def same_label_neighbours(labels: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """``(N, k)`` bool: neighbour ``neighbours[i, c]`` exists and has image i's label."""
    labels = np.asarray(labels)
    valid = neighbours >= 0
    return valid & (labels[np.where(valid, neighbours, 0)] == labels[:, None])


def candidate_pairs(neighbours: np.ndarray, same: np.ndarray, freq_threshold: int) -> np.ndarray:
    """``(P, 2)`` unordered pairs ``i < j`` (unique) to verify: same-label neighbours of images with
    at least ``freq_threshold`` of them (the others are dropped whatever verification says)."""
    eligible = same.sum(1) >= freq_threshold
    rows, cols = np.nonzero(same & eligible[:, None])
    a, b = rows, neighbours[rows, cols]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def keep_mask(labels: np.ndarray, neighbours: np.ndarray, freq_threshold: int,
              inliers: np.ndarray | None = None, inlier_threshold: int = 0, min_images: int = 2) -> np.ndarray:
    """The images the rule keeps (``(N,)`` bool).

    ``inliers``: ``(N, k)`` inlier counts of each neighbour pair (None: no verification, the
    embedding-only mode). Landmarks left with fewer than ``min_images`` images are dropped.
    """
    labels = np.asarray(labels)
    support = same_label_neighbours(labels, neighbours)
    if inliers is not None:
        support &= inliers >= inlier_threshold
    keep = support.sum(1) >= freq_threshold
    kept_labels, counts = np.unique(labels[keep], return_counts=True)
    keep &= np.isin(labels, kept_labels[counts >= min_images])
    return keep


def pair_inliers(neighbours: np.ndarray, pairs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Scatter verified unordered pairs' inlier counts onto the ``(N, k)`` neighbour table (0 elsewhere)."""
    n = len(neighbours)
    out = np.zeros(neighbours.shape, np.int64)
    if not len(pairs):
        return out
    keys = pairs[:, 0] * n + pairs[:, 1]
    order = np.argsort(keys)
    keys, counts = keys[order], np.asarray(counts, np.int64)[order]
    rows = np.repeat(np.arange(n), neighbours.shape[1]).reshape(neighbours.shape)
    lo, hi = np.minimum(rows, neighbours), np.maximum(rows, neighbours)
    query = lo * n + hi
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    found = (keys[pos] == query) & (neighbours >= 0)
    out[found] = counts[pos[found]]
    return out


def clean_features(ids: list[str], paths: list[Path], labels: np.ndarray, feats: np.ndarray,
                   settings: CleanSettings = CleanSettings(), cache_dir: Path | None = None, device: str = "cpu",
                   progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply the rule to images with descriptors ``feats`` (row i = ``ids[i]``): ``(keep, stats)``."""
    from retrieval.local_features import extract_local_features
    from retrieval.verify import verify_pairs

    stats: dict[str, Any] = {"seconds": {}}
    start = time.perf_counter()
    k = min(settings.k, len(ids) - 1)
    if k < 1:
        raise ValueError("clean: need at least 2 images")
    _, neighbours = knn_graph(feats, k, index="ivf" if len(ids) >= IVF_FROM else "flat", progress=progress)
    stats["seconds"]["knn_graph"] = round(time.perf_counter() - start, 2)
    inliers = None
    if settings.verify:
        if cache_dir is None:
            raise ValueError("clean: verification needs a cache folder")
        same = same_label_neighbours(labels, neighbours)
        pairs = candidate_pairs(neighbours, same, settings.freq_threshold)
        stats["pairs"] = int(len(pairs))
        t = time.perf_counter()
        needed = np.unique(pairs)
        local = f"{settings.features}-k{settings.max_keypoints}-r{settings.resize}"  # one cache per setting
        verified = f"{local}_{settings.ransac}-t{settings.threshold:g}-n{settings.max_trials}"
        cache = extract_local_features([ids[i] for i in needed], [paths[i] for i in needed],
                                       cache_dir / f"local_{local}.h5", features=settings.features,
                                       max_keypoints=settings.max_keypoints, resize=settings.resize, device=device,
                                       progress=progress)
        stats["seconds"]["local_features"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        counts = verify_pairs([(ids[a], ids[b]) for a, b in pairs], cache, cache, ransac=settings.ransac,
                              threshold=settings.threshold, max_trials=settings.max_trials,
                              workers=settings.workers, results=cache_dir / f"pairs_{verified}.csv", device=device,
                              progress=progress)
        stats["seconds"]["verify"] = round(time.perf_counter() - t, 2)
        stats["pairs_per_s"] = round(len(pairs) / max(stats["seconds"]["verify"], 1e-9), 1)
        inliers = pair_inliers(neighbours, pairs, counts)
    keep = keep_mask(labels, neighbours, settings.freq_threshold, inliers, settings.inlier_threshold,
                     settings.min_images)
    stats["seconds"]["total"] = round(time.perf_counter() - start, 2)
    return keep, stats


def _int_landmarks(train: TrainSet) -> list[int]:
    try:
        return [int(c) for c in train.classes]
    except ValueError:
        raise ValueError(f"{train.name}: clean writes GLDv2's landmark_id,images schema, whose landmark ids are "
                         f"integers; this set has ids like {train.classes[0]!r}") from None


def clean_experiment(exp: Any, train_spec: str, checkpoint: Path | None, name: str, settings: CleanSettings,
                     out_dir: Path = Path("cleaned_subsets"), image_root: Path | None = None,
                     devices: list[torch.device] | None = None) -> dict[str, Any]:
    """The ``clean`` verb: describe the train set with the experiment's net (reusing its features
    file when complete), clean it, and write ``<out_dir>/<name>.csv`` + ``.json``; returns the record."""
    from retrieval.experiment import features_path
    from retrieval.extract import extract_on_devices, sizing_params

    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"--name {name!r}: give a plain file name (no folders)")
    p = exp.params
    start = time.perf_counter()
    train = load_train_set(train_spec, p.get("data_root", "data"), synthetic_size=p.get("synthetic_size", "default"),
                           seed=int(p.get("seed", 0)), gldv2_root=image_root or p.get("gldv2_root"))
    landmarks = _int_landmarks(train)
    setting_dir = exp.setting_dir(checkpoint)
    feats_file = extract_on_devices(exp.make_net(checkpoint), ImageList(train.ids, train.paths),
                                    features_path(setting_dir, train.name, "train", False),
                                    devices or [torch.device("cpu")], **sizing_params(p, train_spec),
                                    batch_size=int(p.get("batch_size_eval", 32)),
                                    num_workers=int(p.get("num_workers", 0)), progress=bool(p.get("progress", True)))
    feat_ids, feats, attrs = read_features(feats_file)
    row = {image_id: i for i, image_id in enumerate(train.ids)}
    rows = np.asarray([row[i] for i in feat_ids], np.int64)  # described images (unreadable ones are dropped)
    labels = train.labels[rows]
    device = str(devices[0]) if devices else "cpu"
    keep, stats = clean_features(feat_ids, [train.paths[i] for i in rows], labels, feats, settings,
                                 setting_dir / "clean" / train.name, device, bool(p.get("progress", True)))
    mapping: dict[int, list[str]] = {}
    for i in np.flatnonzero(keep):
        mapping.setdefault(landmarks[labels[i]], []).append(feat_ids[i])
    if not mapping:
        raise ValueError(f"clean: no image of {train.name} passes the rule (k={settings.k}, "
                         f"freq_threshold={settings.freq_threshold}, inlier_threshold={settings.inlier_threshold})")
    out_dir = Path(out_dir)
    csv_path = out_dir / f"{name}.csv"
    write_train_clean(csv_path, dict(sorted(mapping.items())))
    root = Path(image_root) if image_root else _gldv2_root_of(train)
    record: dict[str, Any] = {
        "name": name, "csv": str(csv_path), "source": train_spec, "train_set": train.name,
        "image_root": str(root), "features": str(feats_file),
        "checkpoint": str(checkpoint) if checkpoint else None, "architecture": attrs.get("architecture"),
        "image_size": attrs.get("image_size"), "settings": asdict(settings),
        "counts": {"images_before": len(train), "landmarks_before": train.n_classes,
                   "unreadable": len(train) - len(feat_ids), "images_after": int(keep.sum()),
                   "landmarks_after": len(mapping)},
        **{key: stats[key] for key in ("pairs", "pairs_per_s") if key in stats},
        "seconds": {**stats["seconds"], "all": round(time.perf_counter() - start, 2)},
    }
    noise_csv = root / "noise.csv"
    if noise_csv.is_file():
        from retrieval.data.noisy_train import read_noise, removal_scores

        record["against_known_noise"] = removal_scores({feat_ids[i] for i in np.flatnonzero(keep)},
                                                       read_noise(noise_csv))
    write_json(out_dir / f"{name}.json", record)
    logger.info("clean: %s: %d → %d images, %d → %d landmarks (%s)", train.name, len(train), int(keep.sum()),
                train.n_classes, len(mapping), csv_path)
    return record


def _gldv2_root_of(train: TrainSet) -> Path:
    """The folder holding ``train/<a>/<b>/<c>/<id>.jpg`` of a GLDv2-layout set (else the first image's folder)."""
    path = Path(train.paths[0])
    if len(path.parents) > 4 and path.parents[3].name == "train":
        return path.parents[4]
    return path.parent
