"""An experiment's outputs and its verbs: predict, evaluate, and job (train → predict → evaluate).

Layout under ``out_root`` (``experiments/<name>/`` beside the experiment file)::

    results.csv                                   one row per evaluation, all settings
    pretrained/                                   the untrained net of params
    <setting>/params.json, train.log, train_log.csv, train_plot.png, epN.pth, last.pth, best.pth, job.json
    <setting>/<ckpt stem>/features/<dataset>/<split>_<ss|ms>.h5 (+ skipped.csv, extract.log)
    <setting>/<ckpt stem>/features/<label set>/train_<ss|ms>.h5   the labelled set l2019 votes against
    <setting>/<ckpt stem>/eval/<dataset>_<ss|ms>_<rerank>/{results.json, ranks.h5, ranked.html}
    <setting>/<ckpt stem>/local/<dataset>/     sv's local features and verified pairs (retrieval.verify)
    <setting>/<ckpt stem>/index/<dataset>_<ss|ms>[_w-<whiten>]_<factory>/{index.faiss, ids.h5, index.json}
    <setting>/<ckpt stem>/whiten/<name>.h5       a PCA-whitening learned on the label set (or a given file)
    ensembles/<name>/features/..., eval/..., index/..., whiten/...   an ensemble of nets: a net dir like the others

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
from retrieval.data.dataset import SPLIT_ALIASES
from retrieval.data.trainset import TrainSet, load_train_set
from retrieval.evaluate import SEARCH_PARAMS, evaluate_features, load_pair
from retrieval.extract import MULTI_SCALES, extract_on_devices, sizing_params
from retrieval.features import FeaturesReader, read_features
from retrieval.index import (
    PARAMS_FILE,
    SavedIndex,
    build_index,
    index_slug,
    load_index,
    save_index,
    search_overrides,
    set_search_params,
)
from retrieval.models import RetrievalNet, create_model, load_checkpoint
from retrieval.postprocess import Whitening, ensemble_features, learn_whitening, load_whitening, save_whitening
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
UNNAMED_KEYS = (*RUNTIME_KEYS, "tuning_params", *SEARCH_PARAMS)
ENSEMBLES = "ensembles"


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
        if ds.features:
            raise ValueError(f"{ds.name} is a features-only benchmark (no images): evaluate reads its descriptors "
                             f"{ds.features.get(split, '')} directly; there is nothing to extract")
        return ds.name, ds.split(split)

    def net_dir(self, checkpoint: Path | None, ensemble: str | None = None) -> Path:
        """Where a net's features, evaluations, indexes and whitenings live: the checkpoint's setting folder,
        or ``ensembles/<name>`` for an ensemble of nets (the ``ensemble`` verb)."""
        if ensemble is None:
            return self.setting_dir(checkpoint)
        if checkpoint is not None:
            raise ValueError("give a checkpoint (-m) or an ensemble (--ensemble), not both")
        return self.out_root / ENSEMBLES / ensemble


def _seeded_model(seed: int, params: dict[str, Any]) -> RetrievalNet:
    """`create_model` with the torch RNG seeded: randomly initialised parts are the same in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(**params)


def features_path(setting_dir: Path, dataset: str, split: str, ms: bool) -> Path:
    return setting_dir / "features" / dataset / f"{split}_{'ms' if ms else 'ss'}.h5"


SPLIT_NAMES = {**SPLIT_ALIASES, "train": "train"}  # predict's splits: the dataset's and the label set


def predict(exp: Experiment, checkpoint: Path | None, ms: bool, splits: Sequence[str],
            devices: Sequence[torch.device | str], batch_size: int, n_blocks: int | None = None,
            block_id: int | None = None, scale: str | None = None) -> list[Path]:
    """Extract features of the dataset's ``splits`` (and ``train``: the label set), spread over ``devices``
    and ``n_blocks`` blocks (`retrieval.extract.extract_on_devices`); returns the files (the block's
    shards with ``block_id``). Splits may be named as GLDv2 does (``index`` = db, ``test`` = query);
    ``scale`` overrides the params' (`retrieval.extract.sizing_params`)."""
    p = exp.params
    scales = tuple(p.get("scales", MULTI_SCALES)) if ms else (1.0,)
    make_net = exp.make_net(checkpoint)
    out = []
    for name in splits:
        if name not in SPLIT_NAMES:
            raise ValueError(f"--splits: unknown split {name!r}; expected query (test), db (index) or train")
        split = SPLIT_NAMES[name]
        folder, images = exp.split_images(split)
        spec = (p.get("label_data") or p.get("train_set", "synthetic")) if split == "train" else p["dataset"]
        path = features_path(exp.setting_dir(checkpoint), folder, split, ms)
        out.append(extract_on_devices(make_net, images, path, devices, n_blocks=n_blocks, block_id=block_id,
                                      scales=scales, batch_size=batch_size, num_workers=int(p.get("num_workers", 0)),
                                      **sizing_params(p, spec, scale)))
    return out


def _flags(checkpoint: Path | None, ms: bool, ensemble: str | None = None) -> str:
    """The options that name these features on the command line (for "run ... first" messages)."""
    return (f"{' -m ' + str(checkpoint) if checkpoint else ''}{' --ensemble ' + ensemble if ensemble else ''}"
            f"{' --ms' if ms else ''}")


def _features_pair(exp: Experiment, ds: RetrievalDataset, checkpoint: Path | None, ms: bool,
                   ensemble: str | None = None) -> dict[str, Path]:
    if ds.features:  # a features-only benchmark brings its own descriptors
        return {split: Path(ds.features[split]) for split in ("query", "db")}
    paths = {split: features_path(exp.net_dir(checkpoint, ensemble), ds.name, split, ms) for split in ("query", "db")}
    for path in paths.values():
        if not path.is_file():
            verb = f"ensemble {ensemble}" if ensemble else "predict"
            raise FileNotFoundError(f"{path}: features not found; run `{verb}{_flags(checkpoint, ms)}` first")
    return paths


def rerank_context(exp: Experiment, ds: RetrievalDataset, checkpoint: Path | None, ms: bool,
                   methods: Sequence[str], labels: bool = False, ensemble: str | None = None) -> RerankContext:
    """What the ranking steps of ``methods`` need: the label set's features (l2019, or ``labels``), sv's cache."""
    folder = exp.net_dir(checkpoint, ensemble)
    context = RerankContext(params=exp.params, cache_dir=folder / "local" / ds.name,
                            device=str(exp.params.get("sv_device", "cpu")))
    if labels or any(needs_labels(m) for m in methods):
        context.train_features, context.train_labels = label_features(exp, checkpoint, ms, ensemble)
    return context


def whitening_path(folder: Path, name: str) -> Path:
    return folder / "whiten" / f"{name}.h5"


def experiment_whitening(exp: Experiment, folder: Path) -> Whitening | None:
    """The whitening the ``whiten`` param names (learned by the ``whiten`` verb into ``folder``), or None."""
    name = exp.params.get("whiten")
    if not name:
        return None
    path = whitening_path(folder, str(name))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: whitening {name!r} not found; learn it with `whiten --name {name}` first")
    whitening = load_whitening(path)
    whitening.name = str(name)
    return whitening


def index_dir(folder: Path, dataset: str, ms: bool, factory: str, whiten: str | None = None) -> Path:
    """``<net dir>/index/<dataset>_<ss|ms>[_w-<whiten>]_<factory slug>``."""
    kind = f"{'ms' if ms else 'ss'}{'_w-' + whiten if whiten else ''}"
    return folder / "index" / f"{dataset}_{kind}_{index_slug(factory)}"


def experiment_index(exp: Experiment, folder: Path, ds: RetrievalDataset, ms: bool,
                     whitening: Whitening | None, flags: str) -> SavedIndex | None:
    """The saved index the ``index`` param names (a factory string; None: exact search), with ``nprobe`` /
    ``efsearch`` / ``k_factor`` from the params."""
    factory = exp.params.get("index")
    if not factory:
        return None
    path = index_dir(folder, ds.name, ms, str(factory), whitening.name if whitening else None)
    if not (path / PARAMS_FILE).is_file():
        raise FileNotFoundError(f"{path}: no saved index; run `index --factory {factory}{flags}` first")
    return load_index(path, **search_overrides(exp.params))


def evaluate(exp: Experiment, checkpoint: Path | None, ms: bool, methods: Sequence[str],
             html_queries: int = 10, ensemble: str | None = None) -> list[dict[str, Any]]:
    """Search, re-rank and score the features ``predict`` (or ``ensemble``) wrote; returns the results dicts.

    Params ``index`` (search a saved index), ``whiten`` (apply a learned whitening) and ``topk``
    choose how (`retrieval.evaluate`).
    """
    ds = exp.dataset()
    folder = exp.net_dir(checkpoint, ensemble)
    paths = _features_pair(exp, ds, checkpoint, ms, ensemble)
    whitening = experiment_whitening(exp, folder)
    index = experiment_index(exp, folder, ds, ms, whitening, _flags(checkpoint, ms, ensemble))
    label = f"{ENSEMBLES}/{ensemble}" if ensemble else exp.setting_label(checkpoint)
    return evaluate_features(ds, paths["query"], paths["db"], methods, folder / "eval",
                             feature_kind="ms" if ms else "ss", experiment=exp.name,
                             setting=label, results_csv=exp.out_root / "results.csv",
                             params=exp.params, checkpoint=str(checkpoint) if checkpoint else None,
                             html_queries=html_queries,
                             context=rerank_context(exp, ds, checkpoint, ms, methods, ensemble=ensemble),
                             index=index, whitening=whitening)


def build_experiment_index(exp: Experiment, checkpoint: Path | None, ms: bool, factory: str,
                           ensemble: str | None = None, train_rows: int | None = None,
                           search: dict[str, int | None] | None = None, knn_graph_k: int | None = None) -> Path:
    """The ``index`` verb: an index of the dataset's database features (whitened when ``whiten`` is set),
    saved under `index_dir`; ``search`` overrides the saved ``nprobe`` / ``efsearch`` / ``k_factor`` defaults;
    ``knn_graph_k``: also the database's kNN graph (``knn_graph_k<K>.h5`` beside it) from that index."""
    from retrieval.search import build_knn_graph_file

    ds = exp.dataset()
    folder = exp.net_dir(checkpoint, ensemble)
    db = _features_pair(exp, ds, checkpoint, ms, ensemble)["db"]
    whitening = experiment_whitening(exp, folder)
    progress = bool(exp.params.get("progress", True))
    seed = int(exp.params.get("seed", 0))
    index, stats = build_index(db, factory, train_rows=train_rows, seed=seed, transform=whitening, progress=progress)
    given = {k: int(v) for k, v in (search or {}).items() if v is not None}
    set_search_params(index, **given)  # a parameter this index lacks fails here, not at every load
    stats["search"].update(given)
    with FeaturesReader(db) as reader:
        ids = reader.ids
    stat = db.stat()
    out = save_index(index_dir(folder, ds.name, ms, factory, whitening.name if whitening else None), index, ids,
                     {**stats, "features": str(db), "features_bytes": stat.st_size,
                      "features_mtime_ns": stat.st_mtime_ns, "whiten": whitening.name if whitening else None,
                      "seed": seed})
    if knn_graph_k:
        saved = load_index(out)  # with its search defaults (and on the GPUs when present)
        build_knn_graph_file(db, out / f"knn_graph_k{int(knn_graph_k)}.h5", int(knn_graph_k), index=saved.index,
                             index_name=saved.describe(), transform=whitening, progress=progress)
    return out


def learn_experiment_whitening(exp: Experiment, checkpoint: Path | None, ms: bool, name: str,
                               source: str = "train", dim: int | None = None, shrinkage: float = 1.0,
                               ensemble: str | None = None) -> Path:
    """The ``whiten`` verb: PCA-whitening learned on ``source`` (``train``: the label set's features, a set
    apart from the benchmark; or a features file), saved as ``<net dir>/whiten/<name>.h5``."""
    folder = exp.net_dir(checkpoint, ensemble)
    if source == "train":
        path = features_path(folder, exp.label_set().name, "train", ms)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: label-set features not found; run `predict --splits train"
                                    f"{_flags(checkpoint, ms)}` first (or give --learn-on FILE)")
    else:
        path = Path(source)
    whitening = learn_whitening(path, dim, shrinkage, name=name)
    logger.info("whitening %s: %d-d → %d-d, shrinkage %.2f, learned on %d rows of %s", name, whitening.dim_in,
                whitening.dim_out, shrinkage, whitening.n_rows, path)
    return save_whitening(whitening_path(folder, name), whitening)


def make_ensemble(exp: Experiment, name: str, checkpoints: Sequence[Path | None], ms: bool,
                  weights: Sequence[float] | None = None, mode: str = "concat", splits: Sequence[str] = ("query", "db"),
                  dtype: str = "float32") -> list[Path]:
    """The ``ensemble`` verb: each split's features of the nets ``checkpoints`` (None: the pretrained net)
    combined (`retrieval.postprocess.ensemble_features`) into ``ensembles/<name>/features/``."""
    out = []
    for split in splits:
        folder_name, _ = exp.split_images(split)
        members = [features_path(exp.setting_dir(c), folder_name, split, ms) for c in checkpoints]
        for member, checkpoint in zip(members, checkpoints, strict=True):
            if not member.is_file():
                raise FileNotFoundError(f"{member}: features not found; run `predict --splits {split}"
                                        f"{_flags(checkpoint, ms)}` first")
        out.append(ensemble_features(members, features_path(exp.net_dir(None, name), folder_name, split, ms),
                                     weights, mode, dtype=dtype))
    return out


def submit(exp: Experiment, checkpoint: Path | None, ms: bool, method: str) -> dict[str, Path]:
    """Both Kaggle files for the dataset (queries = test, database = index), ranked by ``method``.

    Writes ``<setting>/<ckpt>/submit/<dataset>_<ss|ms>_<method>/{retrieval,recognition}_submission.csv``;
    landmarks are voted by the label set (`label_features`). Test images without features get
    empty rows, so every test id is listed once. A ``whiten`` param applies to every descriptor.
    """
    ds = exp.dataset()
    paths = _features_pair(exp, ds, checkpoint, ms)
    context = rerank_context(exp, ds, checkpoint, ms, [method], labels=True)  # recognition votes with them
    pair = load_pair(ds, paths["query"], paths["db"], context, experiment_whitening(exp, exp.setting_dir(checkpoint)))
    train_feats, train_labels = pair.context.train_features, pair.context.train_labels
    ranks, _ = pair.rank(method, exp.params, k=MAX_IMAGES)
    labels = np.full(len(ds.queries), None, dtype=object)
    confidences = np.zeros(len(ds.queries), np.float32)
    labels[pair.q_ok], confidences[pair.q_ok] = knn_vote(pair.q_feats, train_feats, train_labels,
                                                         int(exp.params.get("l2019_k", 3)))
    out = exp.setting_dir(checkpoint) / "submit" / f"{ds.name}_{'ms' if ms else 'ss'}_{method}"
    return {"retrieval": write_retrieval_submission(out / RETRIEVAL_FILE, ds.queries.ids, ds.db.ids, ranks),
            "recognition": write_recognition_submission(out / RECOGNITION_FILE, ds.queries.ids, labels, confidences,
                                                        known_labels=np.unique(train_labels))}


def label_features(exp: Experiment, checkpoint: Path | None, ms: bool, ensemble: str | None = None) -> tuple:
    """``(features, landmark ids)`` of the label set's images that ``predict --splits train`` described."""
    labels = exp.label_set()
    path = features_path(exp.net_dir(checkpoint, ensemble), labels.name, "train", ms)
    if not path.is_file():
        verb = f"ensemble {ensemble} --splits train" if ensemble else "predict --splits train"
        raise FileNotFoundError(f"{path}: label-set features not found; run `{verb}{_flags(checkpoint, ms)}` first")
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
