"""A noisy variant of the built-in train split, in GLDv2's train layout, with its noise written down.

GLDv2's train set is noisy in two ways: images filed under the wrong landmark, and images that
show no landmark at all (indoor shots, people, objects). ``make_noisy_train(bench_root, size,
seed)`` renders train landmarks as the clean split does (`retrieval.data.synthetic_train`: same
plan, scenes and view seeds) ``scale`` times larger (2: 640 × 480, nearer GLDv2's photos) and
injects both kinds of noise, in known amounts, so a cleaner can be scored (precision and recall
of what it removes)::

    <bench>/train_noisy/train.csv              id,url,landmark_id   (GLDv2's train.csv; url empty)
    <bench>/train_noisy/train/<a>/<b>/<c>/<id>.jpg   the images, in GLDv2's layout
    <bench>/train_noisy/noise.csv              id,landmark_id,true_landmark_id,kind
                                               (kind: clean | wrong_label | distractor)
    <bench>/train_noisy/noisy.json             parameters (the "complete" marker, written last)

``wrong_labels``: the fraction of the clean images moved to another landmark (uniformly drawn);
``distractors``: as many newly rendered non-landmark scenes, as a fraction of the clean images,
each filed under a random landmark. Ids are 16 hex digits like GLDv2's. The defaults (0.3, 0.3: 46%
of the list is noise) are nearer GLDv2 than a mild 10%, whose 61% of train.csv did not make
train_clean.csv, and at 10% + 10% a short fine-tune barely notices the noise.

What the split measures is the injected noise, so by default its landmarks are ones spatial
verification can confirm: ``kinds`` facade only (buildings, as most of GLDv2; RootSIFT + affine
RANSAC at the cleaner's defaults: 97% of their easy view pairs reach 30 inliers, panels 64% —
smooth painted ones never —, the smooth sculptures 5%) and ``hard_fraction`` 0 (hard views: yaw
up to 62°, occluders over 30-60% of the landmark, 24-52% of pairs pass). Landmark2019's rule
drops unverifiable landmarks and views together with the noise, as it did on GLDv2;
``kinds=KINDS_ALL, hard_fraction=0.5`` renders the clean split's own mix to measure that.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.gldv2 import gldv2_image_path
from retrieval.data.synthetic import (
    _KINDS,
    SIZES,
    _family,
    _locked,
    _n_workers,
    _render_all,
    _render_job,
    _SceneJob,
    _ViewJob,
    family_seeds,
)
from retrieval.data.synthetic_train import TRAIN_SIZES, _render_train_job
from retrieval.data.synthetic_train import _plan as _train_plan

FORMAT_VERSION = 1
FOLDER = "train_noisy"
NOISE_CSV = "noise.csv"
_MARKER = "noisy.json"
KINDS = ("clean", "wrong_label", "distractor")
SCENE_KINDS = ("facade",)  # the landmark kind local features verify (module docstring)
KINDS_ALL = _KINDS


def _hex_id(seed: int, name: str) -> str:
    return hashlib.sha1(f"{seed}/{name}".encode()).hexdigest()[:16]


def _record(size: str, seed: int, wrong_labels: float, distractors: float, scale: int, hard_fraction: float,
            kinds: tuple[str, ...]) -> dict:
    return {"format_version": FORMAT_VERSION, "size": size, "seed": int(seed), "wrong_labels": float(wrong_labels),
            "distractors": float(distractors), "scale": int(scale), "hard_fraction": float(hard_fraction),
            "kinds": list(kinds)}


def noisy_train_root(bench_root: str | os.PathLike) -> Path:
    return Path(bench_root) / FOLDER


def make_noisy_train(bench_root: str | os.PathLike, size: str = "default", seed: int = 0, *,
                     wrong_labels: float = 0.3, distractors: float = 0.3, scale: int = 2,
                     hard_fraction: float = 0.0, kinds: tuple[str, ...] = SCENE_KINDS,
                     workers: int | None = None) -> Path:
    """Write (or reuse) the noisy split beside the benchmark ``bench_root``; returns its ``train.csv``."""
    for name, value in (("wrong_labels", wrong_labels), ("distractors", distractors)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not 0 <= hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS_ALL for k in kinds):
        raise ValueError(f"kinds must be some of {KINDS_ALL}, got {kinds}")
    if size not in TRAIN_SIZES or int(scale) < 1:
        raise ValueError(f"noisy train split: unknown size {size!r} or scale {scale} < 1")
    root = noisy_train_root(bench_root)
    rec = _record(size, seed, wrong_labels, distractors, scale, hard_fraction, kinds)
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == rec:
        return root / "train.csv"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if marker.is_file() and json.loads(marker.read_text()) == rec:
            return root / "train.csv"
        marker.unlink(missing_ok=True)
        for old in ("train", "train.csv", NOISE_CSV):
            target = root / old
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        split = dataclasses.replace(TRAIN_SIZES[size], hard_fraction=float(hard_fraction))
        rows = _build(root, SIZES[size], split, seed, wrong_labels, distractors, int(scale), kinds, workers)
        for name, header, body in (("train.csv", ("id", "url", "landmark_id"), [(r[0], "", r[1]) for r in rows]),
                                   (NOISE_CSV, ("id", "landmark_id", "true_landmark_id", "kind"), rows)):
            tmp = root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(body)
            os.replace(tmp, root / name)
        tmp = root / f".{_MARKER}.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, marker)
    return root / "train.csv"


def _render_noisy_job(job: _SceneJob, cfg: Any, jpg_dir: str) -> list[dict[str, Any]]:
    """A train landmark's views as the clean split renders them; a distractor as the benchmark does."""
    return (_render_train_job if job.kind == "landmark" else _render_job)(job, cfg, jpg_dir)


def _landmark_jobs(cfg, split, seed: int, kinds: tuple[str, ...]) -> list[_SceneJob]:
    """The first ``split.n_landmarks`` landmarks of the clean split's plan (extended) of the ``kinds`` asked."""
    plan = _train_plan(cfg, dataclasses.replace(split, n_landmarks=4 * split.n_landmarks), seed)
    jobs = [job for job in plan if _family(job.family_seed, cfg.scene_mix)["kind"] in kinds][:split.n_landmarks]
    if len(jobs) < split.n_landmarks:
        raise ValueError(f"noisy train split: only {len(jobs)} of {split.n_landmarks} landmarks are of kinds {kinds}")
    for lm, job in enumerate(jobs):
        job.landmark = lm
    return jobs


def _build(root: Path, cfg, split, seed: int, wrong_labels: float, distractors: float, scale: int,
           kinds: tuple[str, ...], workers: int | None) -> list[tuple[str, int, object, str]]:
    """Images into ``root/train``; rows ``(id, landmark_id, true_landmark_id, kind)`` in id order."""
    jobs = _landmark_jobs(cfg, split, seed, kinds)
    rng = np.random.default_rng([seed, 4099])
    n_clean = sum(len(job.views) for job in jobs)
    n_distractors = round(distractors * n_clean)
    fams = family_seeds(cfg, seed)
    sizes = [tuple(int(v) for v in s) for s in cfg.image_sizes]
    for n in range(n_distractors):  # one view per scene: distractors do not form a class of their own
        fam = fams[int(rng.integers(len(fams)))] if rng.random() < cfg.distractor_family_share \
            else int(rng.integers(0, 2**63 - 1))
        job = _SceneJob("distractor", -1, fam, int(rng.integers(0, 2**63 - 1)))
        job.views = [_ViewJob(f"noisy_distractor_{n:05d}", "distractor", sizes[int(rng.integers(len(sizes)))],
                              int(rng.integers(0, 2**63 - 1)))]
        jobs.append(job)
    for job in jobs:
        for view in job.views:
            view.size = (view.size[0] * scale, view.size[1] * scale)

    tmp = root / f".render-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        records = _render_all(jobs, cfg, tmp, _n_workers(workers, n_clean + n_distractors),
                              _render_noisy_job)
        records.sort(key=lambda r: r["name"])
        landmarks = sorted({int(r["landmark"]) for r in records if r["landmark"] >= 0})
        clean = [r for r in records if r["landmark"] >= 0]
        wrong = set(rng.choice(len(clean), size=round(wrong_labels * len(clean)), replace=False).tolist())
        rows = []
        for i, r in enumerate(clean):
            true = int(r["landmark"])
            given, kind = true, "clean"
            if i in wrong:
                others = [lm for lm in landmarks if lm != true]
                given, kind = int(others[int(rng.integers(len(others)))]), "wrong_label"
            rows.append((r["name"], given, true, kind))
        rows += [(r["name"], int(landmarks[int(rng.integers(len(landmarks)))]), "", "distractor")
                 for r in records if r["landmark"] < 0]
        out = []
        for name, given, true, kind in rows:
            image_id = _hex_id(seed, name)
            dest = gldv2_image_path(root, "train", image_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f"{name}.jpg", dest)
            out.append((image_id, given, true, kind))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out)


def read_noise(path: str | os.PathLike) -> dict[str, str]:
    """``noise.csv`` → id → kind."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return {r["id"]: r["kind"] for r in csv.DictReader(f)}


def removal_scores(kept_ids: set[str] | list[str], noise: dict[str, str]) -> dict[str, float | int]:
    """Precision and recall of the images a cleaner removed against the known noise (noisy = not clean)."""
    kept = set(kept_ids)
    removed = {i for i in noise if i not in kept}
    noisy = {i for i, kind in noise.items() if kind != "clean"}
    hit = len(removed & noisy)
    out: dict[str, float | int] = {
        "removed": len(removed), "noisy": len(noisy), "removed_noisy": hit,
        "precision": hit / len(removed) if removed else 1.0, "recall": hit / len(noisy) if noisy else 1.0,
    }
    for kind in KINDS[1:]:
        of_kind = {i for i, k in noise.items() if k == kind}
        out[f"recall_{kind}"] = len(removed & of_kind) / len(of_kind) if of_kind else 1.0
    return out
