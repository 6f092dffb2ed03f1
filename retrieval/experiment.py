"""An experiment's outputs and its verbs: predict, evaluate, and job (train → predict → evaluate).

Layout under ``out_root`` (``experiments/<name>/`` beside the experiment file)::

    results.csv                                   one row per evaluation, all settings
    pretrained/                                   the untrained net of params
    <setting>/params.json, train.log, train_log.csv, train_plot.png, epN.pth, last.pth, best.pth, job.json
    <setting>/<ckpt stem>/features/<dataset>/<split>_<ss|ms>.h5 (+ skipped.csv, extract.log)
    <setting>/<ckpt stem>/features/<label set>/train_<ss|ms>.h5   the labelled set l2019 votes against
    <setting>/<ckpt stem>/eval/<dataset>_<ss|ms>_<rerank>/{results.json, ranks.h5, ranked.html}
    <setting>/<ckpt stem>/local/<dataset>/     sv's local features and verified pairs (retrieval.verify)

``<setting>`` names a training run by the params it changes from the experiment file's
(``loss-cosface_margin-0.4``, Landmark2019's habit), ``default`` when none.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.data import ImageList, RetrievalDataset, load_dataset
from retrieval.data.trainset import TrainSet, load_train_set
from retrieval.evaluate import evaluate_features, load_pair
from retrieval.extract import MULTI_SCALES, extract_on_devices
from retrieval.features import read_features
from retrieval.models import RetrievalNet, create_model, load_checkpoint
from retrieval.recognition import (
    MAX_IMAGES,
    RECOGNITION_FILE,
    RETRIEVAL_FILE,
    knn_vote,
    write_recognition_submission,
    write_retrieval_submission,
)
from retrieval.report import write_json
from retrieval.rerank import RerankContext, needs_labels
from retrieval.train import RUNTIME_KEYS, train

logger = logging.getLogger(__name__)

JOB_DONE = "job.json"
PARAMS_JSON = "params.json"
# keys that say where things are, how fast they run or how the result is evaluated, not what is trained:
# not part of a setting's name
UNNAMED_KEYS = (*RUNTIME_KEYS, "tuning_params")


def setting_name(overrides: dict[str, Any]) -> str:
    """``key-value_key-value`` of the overridden params (sorted), ``default`` when there are none."""
    parts = []
    for key in sorted(overrides):
        value = overrides[key]
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}-{text}")
    name = "_".join(parts) or "default"
    return "".join(c if c.isalnum() or c in "-_.,+=" else "_" for c in name)[:200]


@dataclass
class Experiment:
    """What every verb needs: the params (the file's, with overrides) and where outputs live."""

    name: str
    params: dict[str, Any]
    out_root: Path
    defaults: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items()
                if k not in UNNAMED_KEYS and (k not in self.defaults or self.defaults[k] != v)}

    def setting(self, extra: dict[str, Any] | None = None) -> str:
        """The setting of these params, with ``extra`` (a sweep candidate) on top."""
        return setting_name({**self.overrides(), **(extra or {})})

    def setting_dir(self, checkpoint: Path | None) -> Path:
        if checkpoint is None:
            return self.out_root / "pretrained"
        return checkpoint.parent / checkpoint.stem

    def setting_label(self, checkpoint: Path | None) -> str:
        """The ``setting`` column of results: the setting folder relative to ``out_root``."""
        folder = self.setting_dir(checkpoint)
        try:
            return folder.resolve().relative_to(self.out_root.resolve()).as_posix()
        except ValueError:
            return folder.name

    def make_net(self, checkpoint: Path | None) -> functools.partial:
        """A picklable factory of the net (worker processes build their own)."""
        if checkpoint is not None:
            return functools.partial(load_checkpoint, checkpoint)
        return functools.partial(_seeded_model, int(self.params.get("seed", 0)), self.params)

    def dataset(self) -> RetrievalDataset:
        p = self.params
        return load_dataset(p["dataset"], p.get("data_root", "data"), p.get("synthetic_size", "default"),
                            int(p.get("seed", 0)))

    def label_set(self) -> TrainSet:
        """The labelled images l2019 votes against: ``label_data``, else the train set (``train_set``)."""
        p = self.params
        return load_train_set(p.get("label_data") or p.get("train_set", "synthetic"), p.get("data_root", "data"),
                              synthetic_size=p.get("synthetic_size", "default"), seed=int(p.get("seed", 0)),
                              gldv2_root=p.get("gldv2_root"))

    def split_images(self, split: str) -> tuple[str, ImageList]:
        """``(folder, images)`` of a predict split: the dataset's query / db, or ``train`` (the label set)."""
        if split == "train":
            labels = self.label_set()
            return labels.name, ImageList(labels.ids, labels.paths)
        ds = self.dataset()
        return ds.name, ds.split(split)


def _seeded_model(seed: int, params: dict[str, Any]) -> RetrievalNet:
    """`create_model` with the torch RNG seeded: randomly initialised parts are the same in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(**params)


def features_path(setting_dir: Path, dataset: str, split: str, ms: bool) -> Path:
    return setting_dir / "features" / dataset / f"{split}_{'ms' if ms else 'ss'}.h5"


def predict(exp: Experiment, checkpoint: Path | None, ms: bool, splits: Sequence[str],
            devices: Sequence[torch.device | str], batch_size: int, n_blocks: int | None = None,
            block_id: int | None = None) -> list[Path]:
    """Extract features of the dataset's ``splits`` (and ``train``: the label set), spread over ``devices``
    and ``n_blocks`` blocks (`retrieval.extract.extract_on_devices`); returns the files (the block's
    shards with ``block_id``)."""
    p = exp.params
    scales = tuple(p.get("scales", MULTI_SCALES)) if ms else (1.0,)
    make_net = exp.make_net(checkpoint)
    out = []
    for split in splits:
        folder, images = exp.split_images(split)
        path = features_path(exp.setting_dir(checkpoint), folder, split, ms)
        out.append(extract_on_devices(make_net, images, path, devices, n_blocks=n_blocks,
                                      block_id=block_id, image_size=int(p.get("image_size", 512)), scales=scales,
                                      resize=p.get("resize", "long"), batch_size=batch_size,
                                      num_workers=int(p.get("num_workers", 0))))
    return out


def _features_pair(exp: Experiment, ds: RetrievalDataset, checkpoint: Path | None, ms: bool) -> dict[str, Path]:
    paths = {split: features_path(exp.setting_dir(checkpoint), ds.name, split, ms) for split in ("query", "db")}
    for path in paths.values():
        if not path.is_file():
            flags = f"{' -m ' + str(checkpoint) if checkpoint else ''}{' --ms' if ms else ''}"
            raise FileNotFoundError(f"{path}: features not found; run `predict{flags}` first")
    return paths


def rerank_context(exp: Experiment, ds: RetrievalDataset, checkpoint: Path | None, ms: bool,
                   methods: Sequence[str], labels: bool = False) -> RerankContext:
    """What the ranking steps of ``methods`` need: the label set's features (l2019, or ``labels``), sv's cache."""
    context = RerankContext(params=exp.params, cache_dir=exp.setting_dir(checkpoint) / "local" / ds.name,
                            device=str(exp.params.get("sv_device", "cpu")))
    if labels or any(needs_labels(m) for m in methods):
        context.train_features, context.train_labels = label_features(exp, checkpoint, ms)
    return context


def evaluate(exp: Experiment, checkpoint: Path | None, ms: bool, methods: Sequence[str],
             html_queries: int = 10) -> list[dict[str, Any]]:
    """Search, re-rank and score the features ``predict`` wrote; returns the results dicts."""
    ds = exp.dataset()
    paths = _features_pair(exp, ds, checkpoint, ms)
    return evaluate_features(ds, paths["query"], paths["db"], methods, exp.setting_dir(checkpoint) / "eval",
                             feature_kind="ms" if ms else "ss", experiment=exp.name,
                             setting=exp.setting_label(checkpoint), results_csv=exp.out_root / "results.csv",
                             params=exp.params, checkpoint=str(checkpoint) if checkpoint else None,
                             html_queries=html_queries, context=rerank_context(exp, ds, checkpoint, ms, methods))


def submit(exp: Experiment, checkpoint: Path | None, ms: bool, method: str) -> dict[str, Path]:
    """Both Kaggle files for the dataset (queries = test, database = index), ranked by ``method``.

    Writes ``<setting>/<ckpt>/submit/<dataset>_<ss|ms>_<method>/{retrieval,recognition}_submission.csv``;
    landmarks are voted by the label set (`label_features`). Test images without features get
    empty rows, so every test id is listed once.
    """
    ds = exp.dataset()
    paths = _features_pair(exp, ds, checkpoint, ms)
    context = rerank_context(exp, ds, checkpoint, ms, [method], labels=True)  # recognition votes with them
    train_feats, train_labels = context.train_features, context.train_labels
    pair = load_pair(ds, paths["query"], paths["db"], context)
    ranks, _ = pair.rank(method, exp.params, k=MAX_IMAGES)
    labels = np.full(len(ds.queries), None, dtype=object)
    confidences = np.zeros(len(ds.queries), np.float32)
    labels[pair.q_ok], confidences[pair.q_ok] = knn_vote(pair.q_feats, train_feats, train_labels,
                                                         int(exp.params.get("l2019_k", 3)))
    out = exp.setting_dir(checkpoint) / "submit" / f"{ds.name}_{'ms' if ms else 'ss'}_{method}"
    return {"retrieval": write_retrieval_submission(out / RETRIEVAL_FILE, ds.queries.ids, ds.db.ids, ranks),
            "recognition": write_recognition_submission(out / RECOGNITION_FILE, ds.queries.ids, labels, confidences,
                                                        known_labels=np.unique(train_labels))}


def label_features(exp: Experiment, checkpoint: Path | None, ms: bool) -> tuple:
    """``(features, landmark ids)`` of the label set's images that ``predict --splits train`` described."""
    labels = exp.label_set()
    path = features_path(exp.setting_dir(checkpoint), labels.name, "train", ms)
    if not path.is_file():
        flags = f"{' -m ' + str(checkpoint) if checkpoint else ''}{' --ms' if ms else ''}"
        raise FileNotFoundError(f"{path}: label-set features not found; run `predict --splits train{flags}` first")
    ids, feats, _ = read_features(path)
    landmark_of = {i: labels.classes[c] for i, c in zip(labels.ids, labels.labels, strict=True)}
    return feats, np.asarray([landmark_of[i] for i in ids])


def run_job(exp: Experiment, devices: Sequence[torch.device | str], setting: str | None = None,
            resume: Path | None = None) -> dict[str, Any] | None:
    """Train one setting, then extract and evaluate with its best checkpoint; returns the ``job.json`` record.

    Evaluation follows ``eval_ms`` (default True) and ``eval_rerank`` (default ``["none"]``, one
    results row). Under torchrun only rank 0 extracts and evaluates (the others return None).
    """
    setting = setting or exp.setting()
    out = exp.out_root / setting
    out.mkdir(parents=True, exist_ok=True)
    main_rank = int(os.environ.get("RANK", 0)) == 0  # under torchrun every rank runs this
    if main_rank:
        write_json(out / PARAMS_JSON, exp.params)
    t0 = time.perf_counter()
    checkpoint = train(exp.params, out, devices, resume)
    if not main_rank:
        return None
    ms = bool(exp.params.get("eval_ms", True))
    methods = list(exp.params.get("eval_rerank", ["none"]))
    if "RANK" in os.environ:  # torchrun: -d is not used; extract on this rank's GPU
        local = int(os.environ.get("LOCAL_RANK", 0))
        devices = [torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")]
    splits = ("query", "db", "train") if any(needs_labels(m) for m in methods) else ("query", "db")
    predict(exp, checkpoint, ms, splits, devices,  # spread over the job's devices (multigpu-predict)
            int(exp.params.get("batch_size_eval") or exp.params.get("batch_size", 32)))
    results = evaluate(exp, checkpoint, ms, methods)
    record = {"setting": setting, "checkpoint": str(checkpoint), "seconds": round(time.perf_counter() - t0, 1),
              "results": [{"dataset": r["dataset"], "features": r["features"], "rerank": r["rerank"],
                           "metrics": r.get("metrics")} for r in results]}
    write_json(out / JOB_DONE, record)
    return record
