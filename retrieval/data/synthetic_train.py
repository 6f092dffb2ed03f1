"""The built-in benchmark's train split: labelled views of landmarks the benchmark never shows.

``make_synthetic_train(root, size, seed)`` renders, beside a benchmark made by
`retrieval.data.synthetic.make_synthetic` with the same ``size`` and ``seed``::

    <root>/train/jpg/synth_train_<n>.jpg   views (RGB JPEG)
    <root>/train/train.csv                 id,path,landmark_id,width,height  (a labelled image-folder CSV)
    <root>/train/train.json                generation parameters (the "complete" marker, written last)

Train landmarks are new scenes of the benchmark's own style families (so the domain is the
same), drawn from a separate seed stream, so none of them is a benchmark landmark: training on
this split and evaluating on the benchmark is a fair test. Each landmark gets mild and hard views
(viewpoint, scale, occlusion, light, crop) from the benchmark's camera model; views where the
landmark is barely visible (the benchmark's "junk") are redrawn, so every label is right.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.synthetic import (
    _PREFIX,
    SIZES,
    SyntheticConfig,
    _family,
    _label,
    _locked,
    _make_scene,
    _n_workers,
    _render_all,
    _render_view,
    _SceneJob,
    _ViewJob,
    family_seeds,
)

FORMAT_VERSION = 1
TRAIN_CSV = "train.csv"
_MARKER = "train.json"
_TMP_PREFIX = ".tmp-train-"
_SEED_TAG = 7919  # separates the train split's seed stream from the benchmark's


@dataclass(frozen=True)
class TrainSplitConfig:
    """How many train landmarks and views; ``hard_fraction`` of the views are hard ones."""

    n_landmarks: int
    views_per_landmark: int
    hard_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.n_landmarks < 2 or self.views_per_landmark < 2:
            raise ValueError("TrainSplitConfig: need at least 2 landmarks and 2 views per landmark")
        if not 0 <= self.hard_fraction <= 1:
            raise ValueError("TrainSplitConfig: hard_fraction must be in [0, 1]")


TRAIN_SIZES: dict[str, TrainSplitConfig] = {
    "tiny": TrainSplitConfig(8, 5),  # 40 images
    "default": TrainSplitConfig(100, 8),  # 800 images
    "large": TrainSplitConfig(400, 10),  # 4000 images
}


def _plan(cfg: SyntheticConfig, split: TrainSplitConfig, seed: int) -> list[_SceneJob]:
    fams = family_seeds(cfg, seed)
    rng = np.random.default_rng([seed, _SEED_TAG])
    sizes = [tuple(int(v) for v in s) for s in cfg.image_sizes]
    order = rng.permutation(np.arange(split.n_landmarks) % len(fams))
    jobs, n = [], 0
    for lm in range(split.n_landmarks):
        job = _SceneJob("landmark", lm, fams[int(order[lm])], int(rng.integers(0, 2**63 - 1)))
        for _ in range(split.views_per_landmark):
            mode = "hard" if rng.random() < split.hard_fraction else "easy"
            size = sizes[int(rng.integers(len(sizes)))]
            job.views.append(_ViewJob(f"{_PREFIX}train_{n:05d}", mode, size, int(rng.integers(0, 2**63 - 1))))
            n += 1
        jobs.append(job)
    return jobs


def _render_train_job(job: _SceneJob, cfg: SyntheticConfig, jpg_dir: str) -> list[dict[str, Any]]:
    """Render every view of one train landmark, redrawing views where it is barely visible."""
    scene = _make_scene(_family(job.family_seed, cfg.scene_mix), job.scene_seed, cfg.family_variation)
    records = []
    for vj in job.views:
        for attempt in range(30):
            rng = np.random.default_rng([vj.seed, attempt])
            im, info = _render_view(scene, vj.mode if attempt < 20 else "easy", vj.size, rng, cfg)
            info["label"] = _label(info, cfg)
            if info["label"] != "junk":
                break
        im.save(os.path.join(jpg_dir, vj.name + ".jpg"), "JPEG", quality=cfg.jpeg_quality)
        records.append({"name": vj.name, "landmark": job.landmark, "scene": job.scene_seed,
                        "label": info["label"], "size": list(vj.size)})
    return records


def _record(size: str, seed: int) -> dict[str, Any]:
    rec = {"format_version": FORMAT_VERSION, "seed": int(seed), "benchmark": asdict(SIZES[size]),
           "split": asdict(TRAIN_SIZES[size])}
    return json.loads(json.dumps(rec))


def _is_complete(root: Path, rec: dict[str, Any]) -> bool:
    try:
        found = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == rec and (root / TRAIN_CSV).is_file() and (root / "jpg").is_dir()


def make_synthetic_train(root: str | os.PathLike, size: str = "default", seed: int = 0, *,
                         workers: int | None = None) -> Path:
    """Write (or reuse) the train split under ``<root>/train``; returns the path of its ``train.csv``.

    ``root`` is the benchmark's folder (e.g. ``data/synthetic-default-s0``); ``size`` and ``seed``
    must be the benchmark's, so the split shares its style families. Like the benchmark, it is
    rendered into a temporary folder and moved into place with the marker last.
    """
    if size not in TRAIN_SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(TRAIN_SIZES)}")
    cfg, split = SIZES[size], TRAIN_SIZES[size]
    root = Path(root) / "train"
    root.mkdir(parents=True, exist_ok=True)
    rec = _record(size, seed)
    if _is_complete(root, rec):
        return root / TRAIN_CSV
    with _locked(root):
        if _is_complete(root, rec):
            return root / TRAIN_CSV
        for stale in root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            (tmp / "jpg").mkdir(parents=True)
            jobs = _plan(cfg, split, seed)
            n_images = split.n_landmarks * split.views_per_landmark
            records = sorted(_render_all(jobs, cfg, tmp / "jpg", _n_workers(workers, n_images), _render_train_job),
                             key=lambda r: r["name"])
            with (tmp / TRAIN_CSV).open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(("id", "path", "landmark_id", "width", "height"))
                for r in records:
                    writer.writerow((r["name"], f"jpg/{r['name']}.jpg", f"train_{r['landmark']:04d}", *r["size"]))
            (tmp / "meta_train.json").write_text(json.dumps(records))
            (root / _MARKER).unlink(missing_ok=True)
            if (root / "jpg").exists():
                (root / "jpg").rename(tmp / "old-jpg")
            (tmp / "jpg").rename(root / "jpg")
            for name in (TRAIN_CSV, "meta_train.json"):
                os.replace(tmp / name, root / name)
            (tmp / _MARKER).write_text(json.dumps(rec, indent=1))
            os.replace(tmp / _MARKER, root / _MARKER)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / TRAIN_CSV
