"""Labelled training sets: GLDv2 train / train_clean / cleaned subsets, image-folder CSVs, the built-in split.

Every source loads into one `TrainSet`: image ids and paths, a class index per image
(``0 .. n_classes-1``) and the original landmark id of each class, so a checkpoint's head rows
can be traced back to landmarks. ``load_train_set(spec, ...)`` picks the source by name:

- ``synthetic``: the built-in benchmark's train split (`retrieval.data.synthetic_train`), whose
  landmarks are disjoint from the benchmark's; ``synthetic-noisy``: the same with known label noise
  and distractors, in GLDv2's layout (`retrieval.data.noisy_train`);
- ``gldv2`` / ``gldv2-clean``: ``<data_root>/gldv2/metadata/train_clean.csv`` (1.58M images,
  81,313 landmarks); ``gldv2-full``: ``train.csv`` (4.1M images, 203k landmarks);
- a CSV path (optionally ``folder:<csv>`` / ``clean:<csv>``): a ``landmark_id,images`` file (the
  ``train_clean.csv`` schema, e.g. ``cleaned_subsets/<name>.csv``; images in the GLDv2 train
  layout under ``gldv2_root``, or the ``image_root`` of the list's cleaning record) or a labelled
  image-folder CSV (``path``/``image`` + ``landmark_id``, see `retrieval.data.folder`).

Several sources train together (`load_train_sets`, the ``train_sets`` param: GUIE-style
multi-domain training): each is loaded as above and `merge_train_sets` concatenates them with
class indices offset so no two sources share a class, ids and class names prefixed by the
source's name, and ``domains`` saying which source each image comes from; each source has a
sampling ``weight`` (`domain_weights`, used by `retrieval.data.samplers`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.dataset import ImageList, RetrievalDataset, gnd_from_labels
from retrieval.data.folder import read_image_csv
from retrieval.data.gldv2 import gldv2_image_path, read_train, read_train_clean


@dataclass(frozen=True)
class TrainSet:
    """Images with class labels; ``classes[c]`` is the landmark id of class index ``c``."""

    name: str
    ids: list[str]
    paths: list[Path]
    labels: np.ndarray  # (N,) int64 class indices
    classes: list[str]
    sizes: np.ndarray | None = None  # (N, 2) width, height when the source lists them
    domains: np.ndarray | None = None  # (N,) int64 index into domain_names: the source of each image (merged sets)
    domain_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.paths) != n or len(self.labels) != n:
            raise ValueError(f"{self.name}: {n} ids, {len(self.paths)} paths, {len(self.labels)} labels")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{self.name}: class indices outside 0..{len(self.classes) - 1}")
        if self.sizes is not None and self.sizes.shape != (n, 2):
            raise ValueError(f"{self.name}: sizes must be ({n}, 2), got {self.sizes.shape}")
        if self.domains is not None and (self.domains.shape != (n,) or (n and not
                                         0 <= self.domains.min() <= self.domains.max() < len(self.domain_names))):
            raise ValueError(f"{self.name}: domains must be ({n},) indices into {len(self.domain_names)} names")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        """Images per class, ``(n_classes,)``."""
        return np.bincount(self.labels, minlength=self.n_classes)


def from_labelled(name: str, ids: list[str], paths: list[Path], landmarks: list, sizes: np.ndarray | None = None,
                  min_images: int = 1) -> TrainSet:
    """A `TrainSet` from per-image landmark ids; classes with fewer than ``min_images`` images are dropped."""
    keys = np.asarray([str(x) for x in landmarks])
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= min_images
    if not keep.any():
        raise ValueError(f"{name}: no class has {min_images} or more images")
    rows = np.flatnonzero(keep)
    kept_classes = np.flatnonzero(counts >= min_images)
    remap = np.full(len(uniq), -1, dtype=np.int64)
    remap[kept_classes] = np.arange(len(kept_classes))
    classes = uniq[kept_classes].tolist()
    if all(c.lstrip("-").isdigit() for c in classes):  # GLDv2 ids: order classes numerically
        order = np.argsort(np.asarray(classes, dtype=np.int64), kind="stable")
        classes = [classes[i] for i in order]
        remap[kept_classes[order]] = np.arange(len(order))
    return TrainSet(name, [ids[i] for i in rows], [paths[i] for i in rows], remap[inverse[rows]], classes,
                    None if sizes is None else sizes[rows])


def load_folder_train(csv_path: str | os.PathLike, name: str | None = None, min_images: int = 1) -> TrainSet:
    """A labelled image-folder CSV; optional ``width``/``height`` columns spare reading image headers."""
    csv_path = Path(csv_path)
    rows = read_image_csv(csv_path)
    missing = [r["id"] for r in rows if r["landmark_id"] is None]
    if missing:
        raise ValueError(f"{csv_path}: {len(missing)} rows have no landmark_id (e.g. {missing[0]!r}); "
                         "a training CSV needs one per image")
    sizes = _csv_sizes(csv_path, len(rows))
    return from_labelled(name or csv_path.stem, [r["id"] for r in rows], [r["path"] for r in rows],
                         [r["landmark_id"] for r in rows], sizes, min_images)


def _csv_sizes(csv_path: Path, n: int) -> np.ndarray | None:
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"width", "height"} <= set(reader.fieldnames or []):
            return None
        try:
            sizes = np.asarray([(int(r["width"]), int(r["height"])) for r in reader], dtype=np.int64)
        except (TypeError, ValueError):
            return None
    return sizes if len(sizes) == n else None


def load_gldv2_train(csv_path: str | os.PathLike, image_root: str | os.PathLike, name: str | None = None,
                     min_images: int = 1) -> TrainSet:
    """GLDv2 ``train.csv`` (``id,url,landmark_id``) or a ``landmark_id,images`` list (``train_clean.csv``)."""
    csv_path = Path(csv_path)
    with csv_path.open(encoding="utf-8-sig") as f:
        header = {h.strip() for h in f.readline().split(",")}
    if {"landmark_id", "images"} <= header:
        mapping = read_train_clean(csv_path)
        ids = [i for images in mapping.values() for i in images]
        landmarks = [lm for lm, images in mapping.items() for _ in images]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{csv_path}: an image id is listed under two landmarks")
    else:
        ids, labels = read_train(csv_path)
        landmarks = labels.tolist()
    paths = [gldv2_image_path(image_root, "train", i) for i in ids]
    return from_labelled(name or csv_path.stem, ids, paths, landmarks, None, min_images)


def load_train_set(spec: str, data_root: str | os.PathLike = "data", *, synthetic_size: str = "default",
                   seed: int = 0, gldv2_root: str | os.PathLike | None = None, min_images: int = 1) -> TrainSet:
    """A training set by name or CSV path (see the module docstring)."""
    data_root = Path(data_root)
    explicit_root = gldv2_root is not None
    gldv2_root = Path(gldv2_root) if gldv2_root else data_root / "gldv2"
    if spec == "synthetic":
        from retrieval.data.synthetic import make_synthetic
        from retrieval.data.synthetic_train import make_synthetic_train

        bench = data_root / f"synthetic-{synthetic_size}-s{seed}"
        make_synthetic(bench, synthetic_size, seed)  # the split shares the benchmark's style families
        return load_folder_train(make_synthetic_train(bench, synthetic_size, seed),
                                 f"synthetic-{synthetic_size}-s{seed}-train", min_images)
    if spec == "synthetic-noisy":
        from retrieval.data.noisy_train import make_noisy_train
        from retrieval.data.synthetic import make_synthetic

        bench = data_root / f"synthetic-{synthetic_size}-s{seed}"
        make_synthetic(bench, synthetic_size, seed)
        csv_path = make_noisy_train(bench, synthetic_size, seed)
        return load_gldv2_train(csv_path, csv_path.parent, f"synthetic-{synthetic_size}-s{seed}-noisy", min_images)
    if spec in ("gldv2", "gldv2-clean"):
        return load_gldv2_train(gldv2_root / "metadata" / "train_clean.csv", gldv2_root, "gldv2-clean", min_images)
    if spec == "gldv2-full":
        return load_gldv2_train(gldv2_root / "metadata" / "train.csv", gldv2_root, "gldv2-full", min_images)
    if spec.startswith("folder:"):
        return load_folder_train(spec.removeprefix("folder:"), min_images=min_images)
    if spec.startswith("clean:"):
        path = Path(spec.removeprefix("clean:"))
        return load_gldv2_train(path, _image_root(path, explicit_root, gldv2_root), min_images=min_images)
    if spec.endswith(".csv"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: training CSV not found")
        with path.open(encoding="utf-8-sig") as f:
            header = {h.strip() for h in f.readline().split(",")}
        if {"landmark_id", "images"} <= header or "url" in header:
            return load_gldv2_train(path, _image_root(path, explicit_root, gldv2_root), min_images=min_images)
        return load_folder_train(path, min_images=min_images)
    raise ValueError(f"unknown train set {spec!r}: expected synthetic, gldv2, gldv2-full, folder:<csv>, "
                     "clean:<csv> or a CSV path")


def merge_train_sets(parts: Sequence[tuple[str, TrainSet]], name: str | None = None) -> TrainSet:
    """One set from several ``(name, set)``: class indices offset by the classes before, so they never
    collide; ids and class names become ``<name>/<id>``; ``domains`` = the part of each image."""
    names = [n for n, _ in parts]
    if not parts:
        raise ValueError("train_sets: no sources")
    if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        raise ValueError(f"train_sets: names must be unique, non-empty and without '/', got {names}")
    offsets = np.cumsum([0] + [ts.n_classes for _, ts in parts])
    sizes = None
    if all(ts.sizes is not None for _, ts in parts):
        sizes = np.concatenate([ts.sizes for _, ts in parts])
    return TrainSet(
        name or "+".join(names),
        [f"{n}/{i}" for n, ts in parts for i in ts.ids],
        [p for _, ts in parts for p in ts.paths],
        np.concatenate([ts.labels + off for (_, ts), off in zip(parts, offsets, strict=False)]).astype(np.int64),
        [f"{n}/{c}" for n, ts in parts for c in ts.classes],
        sizes,
        np.concatenate([np.full(len(ts), d, dtype=np.int64) for d, (_, ts) in enumerate(parts)]),
        tuple(names),
    )


def _check_entries(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("train_set"):
            raise ValueError(f"train_sets[{i}]: expected {{\"name\": ..., \"train_set\": ..., \"weight\": 1.0}}, "
                             f"got {entry!r}")
        unknown = sorted(set(entry) - {"name", "train_set", "weight", "min_images"})
        if unknown:
            raise ValueError(f"train_sets[{i}] ({entry['name']}): unknown keys {unknown}")
        if float(entry.get("weight", 1.0)) < 0:
            raise ValueError(f"train_sets[{i}] ({entry['name']}): weight must be >= 0, got {entry['weight']}")
        out.append(entry)
    return out


def load_train_sets(entries: Sequence[dict[str, Any]], data_root: str | os.PathLike = "data", *,
                    synthetic_size: str = "default", seed: int = 0, gldv2_root: str | os.PathLike | None = None,
                    min_images: int = 1) -> TrainSet:
    """Several training sources as one `merge_train_sets` set; ``entries``: ``[{"name", "train_set"
    (any `load_train_set` spec), "weight" (sampling weight, default 1), "min_images"}, ...]``."""
    parts = [(e["name"], load_train_set(e["train_set"], data_root, synthetic_size=synthetic_size, seed=seed,
                                        gldv2_root=gldv2_root, min_images=int(e.get("min_images", min_images))))
             for e in _check_entries(entries)]
    return merge_train_sets(parts)


def domain_weights(entries: Sequence[dict[str, Any]], active: Sequence[str] | None = None) -> np.ndarray:
    """Sampling weight per source of ``train_sets`` (``weight``, default 1); sources not in ``active``
    (a stage's ``datasets``) get 0. A weight is the share of that source's images drawn per epoch:
    0.5 half of them, 2 each twice (`retrieval.data.samplers.weighted_selection`)."""
    entries = _check_entries(entries)
    names = [e["name"] for e in entries]
    if active is not None:
        unknown = sorted(set(active) - set(names))
        if unknown:
            raise ValueError(f"datasets {unknown} are not train_sets names ({', '.join(names)})")
    weights = np.asarray([float(e.get("weight", 1.0)) if active is None or e["name"] in active else 0.0
                          for e in entries])
    if not (weights > 0).any():
        raise ValueError(f"train_sets: every source has weight 0 (active: {active})")
    return weights


def _image_root(csv_path: Path, explicit: bool, gldv2_root: Path) -> Path:
    """Where a GLDv2-schema list's images are: ``gldv2_root`` when given, else the ``image_root`` its
    cleaning record (``<name>.json`` beside a ``cleaned_subsets/<name>.csv``) names, else ``gldv2_root``."""
    record = csv_path.with_suffix(".json")
    if not explicit and record.is_file():
        try:
            root = json.loads(record.read_text()).get("image_root")
        except (json.JSONDecodeError, AttributeError):
            root = None
        if root:
            return Path(root)
    return gldv2_root


def heldout_split(train: TrainSet, n_classes: float, seed: int) -> tuple[TrainSet, RetrievalDataset | None]:
    """Hold classes (of 2+ images) out of training as a leave-one-out validation benchmark.

    ``n_classes``: how many (an integer ≥ 1), or a fraction of the eligible classes (0 < f < 1, at least one).
    """
    if n_classes <= 0:
        return train, None
    counts = train.class_counts()
    eligible = np.flatnonzero(counts >= 2)
    if n_classes < 1:
        n_classes = max(1, round(n_classes * len(eligible)))
    n_classes = int(n_classes)
    if len(eligible) <= n_classes:
        raise ValueError(f"val_classes={n_classes}: the train set has only {len(eligible)} classes of 2+ images")
    held = np.random.default_rng([seed, 31]).choice(eligible, size=n_classes, replace=False)
    is_held = np.isin(train.labels, held)
    keep = np.flatnonzero(~is_held)
    rest = from_labelled(train.name, [train.ids[i] for i in keep], [train.paths[i] for i in keep],
                         [train.classes[train.labels[i]] for i in keep],
                         None if train.sizes is None else train.sizes[keep])
    if train.domains is not None:
        rest = replace(rest, domains=train.domains[keep], domain_names=train.domain_names)
    rows = np.flatnonzero(is_held)
    images = ImageList([train.ids[i] for i in rows], [train.paths[i] for i in rows])
    labels = train.labels[rows].tolist()
    val = RetrievalDataset(f"{train.name}-heldout{n_classes}", images, images,
                           gnd_from_labels(labels, labels, images.ids, images.ids))
    return rest, val
