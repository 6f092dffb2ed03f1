"""Training embeddings with a margin head, over one or several devices (DDP).

``train(params, out_dir, devices)`` runs one process per device of ``-d``: CUDA devices with
NCCL, or — without CUDA — that many CPU processes on gloo, so the multi-process path is the
same everywhere. Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the process is one
rank of the run and uses ``cuda:LOCAL_RANK``; multi-node runs go through torchrun's own
rendezvous (``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint
HOST:29500 experiments/v3.py job``).

Each epoch, every rank takes its share of a class-balanced, aspect-ratio grouped plan
(`retrieval.data.samplers`), images are resized to their batch's size template and augmented
from (seed, epoch, image) (`retrieval.data.augment`), and the net's embedding goes through the
margin head into a cross-entropy. AMP and channels_last on CUDA, gradient accumulation, SGD or
AdamW with a per-stage cosine (`retrieval.optim`), frozen BatchNorm or backbone stages.

Outputs in ``out_dir``: ``epN.pth`` every epoch and ``last.pth`` (also every
``save_every_steps`` steps), ``best.pth`` (best validation score), ``train_log.csv``,
``train_plot.png``, ``train.log`` and ``train_skipped.csv`` (unreadable images, replaced in their
batch). A run finds ``last.pth`` and resumes from it, to the same weights as an unbroken run.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval.data.augment import TrainImages, collate_train
from retrieval.data.dataset import ImageList, RetrievalDataset
from retrieval.data.images import read_image_sizes
from retrieval.data.samplers import TrainBatchSampler, assign_templates, resolve_templates
from retrieval.data.trainset import TrainSet, domain_weights, heldout_split, load_train_set, load_train_sets
from retrieval.evaluate import validation_map
from retrieval.extract import describe_images, sizing_params
from retrieval.models.backbones import backbone_blocks
from retrieval.models.heads import SoftmaxHead
from retrieval.models.net import RetrievalNet, create_model
from retrieval.optim import CosineSchedule, Stage, create_optimizer, stage_of, training_stages
from retrieval.processes import die_with_parent, free_port
from retrieval.report import plot_training, write_csv_rows
from retrieval.rerank.pipeline import RERANK_PARAMS
from retrieval.train_state import (
    link_latest,
    load_training_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)

logger = logging.getLogger(__name__)

LAST = "last.pth"
BEST = "best.pth"
TRAIN_LOG_CSV = "train_log.csv"
TRAIN_LOG = "train.log"
SKIPPED_CSV = "train_skipped.csv"
# params that do not change what is trained: a resumed run may differ in them
RUNTIME_KEYS = ("num_workers", "batch_size_eval", "save_every_steps", "progress", "data_root", "out_root",
                "eval_ms", "eval_rerank", "html_queries", *RERANK_PARAMS)


@dataclass(frozen=True)
class Rank:
    """Where this process sits in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(params: dict[str, Any], out_dir: str | os.PathLike, devices: Sequence[torch.device | str] = ("cpu",),
          resume: str | os.PathLike | None = None) -> Path:
    """Train with ``params`` into ``out_dir``; returns the checkpoint to use (``best.pth`` or the last epoch).

    ``resume``: a training checkpoint to continue from; by default ``out_dir/last.pth`` when it exists.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    training_stages(params)  # fail on a bad stage list here, not in every worker
    resume = Path(resume) if resume else (out_dir / LAST if (out_dir / LAST).is_file() else None)
    devs = [str(d) for d in devices]
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: we are one rank
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        _run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, params, str(out_dir),
                  str(resume) if resume else None, distributed_env=True)
    elif len(devs) == 1:
        _run_rank(0, 1, devs[0], params, str(out_dir), str(resume) if resume else None, distributed_env=False)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        torch.multiprocessing.start_processes(
            _spawned_rank, args=(len(devs), devs, params, str(out_dir), str(resume) if resume else None),
            nprocs=len(devs), join=True, start_method="spawn")
    return final_checkpoint(out_dir)


def final_checkpoint(out_dir: str | os.PathLike) -> Path:
    """``best.pth`` when validation chose one, else the newest ``epN.pth``."""
    out_dir = Path(out_dir)
    if (out_dir / BEST).is_file():
        return out_dir / BEST
    epochs = sorted(out_dir.glob("ep*.pth"), key=lambda p: int(p.stem[2:]) if p.stem[2:].isdigit() else -1)
    if not epochs:
        raise FileNotFoundError(f"{out_dir}: no epoch checkpoint (training did not finish an epoch)")
    return epochs[-1]


def _spawned_rank(rank: int, world: int, devices: list[str], params: dict, out_dir: str,
                  resume: str | None) -> None:
    die_with_parent()
    _run_rank(rank, world, devices[rank], params, out_dir, resume, distributed_env=True)


def _setup_logging(out_dir: Path, rk: Rank) -> logging.Handler | None:
    root = logging.getLogger("retrieval")
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    if not logging.getLogger().handlers:  # a spawned process starts with no handlers
        logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{rk.rank} %(levelname)s: %(message)s")
    if not rk.main:
        return None
    handler = logging.FileHandler(out_dir / TRAIN_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return handler


def _run_rank(rank: int, world: int, device: str, params: dict, out_dir: str, resume: str | None,
              distributed_env: bool) -> None:
    rk = Rank(rank, world, torch.device(device))
    out = Path(out_dir)
    handler = _setup_logging(out, rk)
    if rk.device.type == "cuda":
        torch.cuda.set_device(rk.device)
    else:  # share the cores between the CPU ranks
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    if distributed_env and world > 1:
        backend = "nccl" if rk.device.type == "cuda" else "gloo"
        timeout = float(params.get("dist_timeout_min", 120))
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout))
    try:
        Trainer(params, out, rk, Path(resume) if resume else None).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if handler is not None:
            logging.getLogger("retrieval").removeHandler(handler)
            handler.close()


def _barrier(rk: Rank) -> None:
    if rk.world > 1:
        dist.barrier()


def _gather(rk: Rank, obj: Any) -> list[Any]:
    if rk.world == 1:
        return [obj]
    out: list[Any] = [None] * rk.world
    dist.all_gather_object(out, obj)
    return out


class _TrainStep(nn.Module):
    """embedding → margin head, one module so DDP sees every trained parameter in one forward."""

    def __init__(self, net: RetrievalNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.head_input(x), y)


def head_spec(params: dict[str, Any], n_classes: int, class_counts: np.ndarray) -> dict[str, Any]:
    """The ``head`` argument of `create_model` from Landmark2019-style params (``loss``, ``s``, ``margin``;
    ``head_fc_dim`` / ``head_dropout``: a training-only projection before the head)."""
    name = params.get("loss", "arcface")
    spec: dict[str, Any] = {"name": name, "n_classes": n_classes,
                            "label_smoothing": params.get("label_smoothing"),
                            "fc_dim": params.get("head_fc_dim"), "dropout": params.get("head_dropout")}
    if name in ("arcface", "subcenter_arcface", "cosface"):
        spec.update(s=params.get("s"), m=params.get("margin"))
    if name in ("arcface", "subcenter_arcface"):
        spec["easy_margin"] = params.get("easy_margin")
    if name == "subcenter_arcface":
        spec["k"] = params.get("subcenters")
    if name == "arcface" and params.get("dynamic_margin"):
        spec.update(dynamic_margin=params["dynamic_margin"], class_counts=class_counts.tolist())
    if name == "adacos":
        spec.update(dynamic=params.get("adacos_dynamic"), theta_zero=params.get("theta_zero"))
    return {k: v for k, v in spec.items() if v is not None}


class Trainer:
    """One rank's training loop (see the module docstring)."""

    def __init__(self, params: dict[str, Any], out_dir: Path, rk: Rank, resume: Path | None) -> None:
        self.out, self.rk = out_dir, rk
        ckpt = load_training_checkpoint(resume) if resume else None
        if ckpt is not None:
            params = self._resumed_params(ckpt, params, resume)
        self.params = params
        self.seed = int(params.get("seed", 0))
        self.stages = training_stages(params)
        self.cuda = rk.device.type == "cuda"
        self.amp = self.cuda and bool(params.get("amp", True))
        self.accumulate = max(1, int(params.get("accumulate", 1)))
        self.save_every = int(params.get("save_every_steps", 0) or 0)
        self.train_set, self.val = self._data()
        torch.manual_seed(self.seed)  # the same initial weights on every rank
        self.net = self._build_net()
        self.skipped: dict[int, str] = {}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "score": -math.inf}
        self.epoch, self.batch, self.step = 0, 0, 0
        self.optimizer_state = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        torch.manual_seed(self.seed * 1000 + rk.rank + 1)  # per-rank stream (dropout)
        if ckpt is not None:
            self._restore(ckpt, resume)

    # ---------------------------------------------------------------- setup
    def _resumed_params(self, ckpt: dict, params: dict, path: Path) -> dict:
        saved = dict(ckpt["params"])
        changed = sorted(k for k in set(saved) | set(params)
                         if k not in RUNTIME_KEYS and saved.get(k) != params.get(k))
        if changed and self.rk.main:
            logger.warning("%s: resuming with the checkpoint's params; ignoring new values of %s", path, changed)
        return {**saved, **{k: params[k] for k in RUNTIME_KEYS if k in params}}

    def _data(self) -> tuple[TrainSet, RetrievalDataset | None]:
        p = self.params
        where = {"synthetic_size": p.get("synthetic_size", "default"), "seed": int(p.get("seed", 0)),
                 "gldv2_root": p.get("gldv2_root"), "min_images": int(p.get("min_images_per_class", 1))}
        if p.get("train_sets"):  # several sources, classes kept apart (multi-domain training)
            train = load_train_sets(p["train_sets"], p.get("data_root", "data"), **where)
        else:
            train = load_train_set(p.get("train_set", "synthetic"), p.get("data_root", "data"), **where)
        val: RetrievalDataset | None = None
        spec = p.get("val_dataset")
        if spec == "heldout":
            train, val = heldout_split(train, float(p.get("val_classes", 10)), self.seed)
        elif spec:
            from retrieval.data import load_dataset

            val = load_dataset(spec, p.get("data_root", "data"), p.get("synthetic_size", "default"),
                               int(p.get("seed", 0)))
        if train.sizes is None:
            train = self._with_sizes(train)
        if self.rk.main:
            logger.info("train set %s: %d images, %d classes; validation: %s", train.name, len(train),
                        train.n_classes, val.name if val else "none")
        return train, val

    def _with_sizes(self, train: TrainSet) -> TrainSet:
        """Image sizes for the aspect-ratio templates: read once (rank 0), cached beside the outputs."""
        import hashlib

        key = hashlib.sha256("\n".join(map(str, train.paths)).encode()).hexdigest()[:16]
        cache = Path(self.params.get("cache_dir") or self.out) / f"image_sizes-{key}.npy"
        if self.rk.main and not cache.is_file():
            sizes = read_image_sizes(train.paths, workers=16, progress=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp.npy")
            np.save(tmp, sizes)
            os.replace(tmp, cache)
        _barrier(self.rk)
        sizes = np.load(cache)
        return replace(train, sizes=sizes)

    def _build_net(self) -> RetrievalNet:
        p = self.params
        head = head_spec(p, self.train_set.n_classes, self.train_set.class_counts())
        net = create_model(**{**p, "head": head})
        init = p.get("init_checkpoint")
        if init:  # start from another run's weights (its head is not reused: other classes)
            state = torch.load(init, map_location="cpu", weights_only=True)["state_dict"]
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("head.")]
            if bad or unexpected:
                raise ValueError(f"{init}: does not fit this net (missing {bad[:3]}, unexpected {unexpected[:3]})")
        if net.whiten is not None:  # whitening is learned after training, not by the classification loss
            net.whiten.requires_grad_(False)
        net.to(self.rk.device)
        if self.cuda and p.get("channels_last", True):
            net.to(memory_format=torch.channels_last)
        if self.cuda and self.rk.world > 1 and p.get("sync_bn"):
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return net

    def _restore(self, ckpt: dict, path: Path) -> None:
        st = ckpt["train_state"]
        saved = ckpt["meta"]
        kind = saved["head"]["name"]
        if kind != self.net.meta["head"]["name"]:  # saved after a stage switched the head's kind
            self.net.switch_head(kind, **self._head_kwargs({**self.params, "loss": kind}))
        self.net.load_state_dict(ckpt["state_dict"])
        self.epoch, self.batch, self.step = int(st["epoch"]), int(st["batch"]), int(st["step"])
        self.history, self.best = list(st["history"]), dict(st["best"])
        self.optimizer_state = st["optimizer"]
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if int(st["world_size"]) == self.rk.world:
            set_rng_state(st["rng"][self.rk.rank])
        elif self.batch:
            raise ValueError(f"{path}: saved mid-epoch by {st['world_size']} processes; resume it with as many "
                             f"(or from an epoch checkpoint epN.pth)")
        if self.rk.main:
            logger.info("resumed from %s at epoch %d, batch %d (step %d)", path, self.epoch + 1, self.batch, self.step)

    def _head_kwargs(self, p: dict[str, Any]) -> dict[str, Any]:
        spec = head_spec(p, self.train_set.n_classes, self.train_set.class_counts())
        return {k: v for k, v in spec.items() if k not in ("name", "n_classes", "fc_dim", "dropout")}

    def _stage_net(self, p: dict[str, Any]) -> None:
        """What a stage changes in the net itself: the head's kind, its s / margin, ViT patch overlap."""
        net = self.net
        name = p.get("loss", "arcface")
        if name != net.meta["head"]["name"]:
            net.switch_head(name, **self._head_kwargs(p))
            if self.rk.main:
                logger.info("head switched to %s (class rows kept)", name)
        if name in ("arcface", "subcenter_arcface", "cosface"):
            dynamic = name != "cosface" and p.get("dynamic_margin")
            net.set_scale_margin(s=p.get("s"), m=None if dynamic else p.get("margin"))
        if hasattr(net.backbone, "set_patch_stride"):
            net.set_patch_stride(p.get("patch_stride"))
        elif p.get("patch_stride"):
            raise ValueError(f"patch_stride is for ViT backbones, not {net.meta['architecture']}")

    def _configure_stage(self, stage: Stage) -> tuple[torch.optim.Optimizer, CosineSchedule]:
        p = stage.params
        self._stage_net(p)
        net = self.net
        net.requires_grad_(True)
        if net.whiten is not None:
            net.whiten.requires_grad_(False)
        if p.get("freeze_backbone"):
            net.backbone.requires_grad_(False)
        else:
            n_frozen = int(p.get("frozen_blocks", 0) or 0)
            if n_frozen:  # the stem (ViTs: with position embeddings and class token) and the first n blocks
                stem, blocks = backbone_blocks(net.backbone)
                for part in [*stem, *blocks[:n_frozen]]:
                    part.requires_grad_(False)
        if p.get("freeze_head"):
            net.head.requires_grad_(False)
            if net.head_fc is not None:
                net.head_fc.requires_grad_(False)
        if p.get("freeze_neck") and net.neck is not None:  # GUIE 1st place: the projection stays once trained
            net.neck.requires_grad_(False)
        if p.get("freeze_bn"):  # Landmark2019's freeze_bn: backbone BatchNorm neither updates statistics nor learns
            for m in net.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
        optimizer = create_optimizer(net, p)
        return optimizer, CosineSchedule(optimizer, stage)

    def _train_mode(self, stage: Stage) -> None:
        """train(), but backbone BatchNorm keeps its statistics where frozen (``freeze_bn`` or a frozen block)."""
        self.net.train()
        freeze_bn = bool(stage.params.get("freeze_bn", False))
        for m in self.net.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                trainable = any(p.requires_grad for p in m.parameters())
                if freeze_bn or not trainable:
                    m.eval()

    # ---------------------------------------------------------------- loop
    def fit(self) -> None:
        total = self.stages[-1].end
        if self.epoch == 0 and self.batch == 0 and not self.history:  # a fresh run
            if self.params.get("head_init", "random") == "centroids":
                self._init_head_from_centroids()
            if self.val is not None and self.params.get("val_at_start", True):
                row = {"epoch": 0, **self._validate()}
                if self.rk.main:
                    self.history.append(row)
                    logger.info("before training: %s", {k: round(v, 4) for k, v in row.items()})
                _barrier(self.rk)
        while self.epoch < total:
            stage = stage_of(self.stages, self.epoch)
            optimizer, schedule = self._configure_stage(stage)
            if self.optimizer_state is not None:  # resuming inside this stage
                optimizer.load_state_dict(self.optimizer_state)
                self.optimizer_state = None
            model: nn.Module = _TrainStep(self.net)
            if self.rk.world > 1:
                model = DistributedDataParallel(model, device_ids=[self.rk.device.index] if self.cuda else None)
            while self.epoch < stage.end:
                self._epoch(stage, model, optimizer, schedule)
        if self.rk.main:
            logger.info("training done: %d epochs; best %s", total, self.best)

    def _loader(self, stage: Stage) -> tuple[DataLoader, TrainBatchSampler]:
        p = stage.params
        templates = resolve_templates(p.get("size_templates", "SS2"))
        groups = assign_templates(self.train_set.sizes, templates)
        weights = None
        if self.train_set.domains is not None:
            weights = domain_weights(p["train_sets"], p.get("datasets"))
        elif p.get("datasets"):
            raise ValueError("a stage's datasets name train_sets entries; this run has one train_set")
        sampler = TrainBatchSampler(self.train_set.labels, groups, int(p.get("batch_size", 32)), rank=self.rk.rank,
                                    world_size=self.rk.world, seed=self.seed, cap=p.get("class_cap"),
                                    domains=self.train_set.domains, domain_weights=weights)
        sampler.set_epoch(self.epoch, start_batch=self.batch)
        meta = self.net.meta
        dataset = TrainImages(self.train_set, templates, meta["mean"], meta["std"], p.get("augmentation", "none"),
                              self.seed)
        workers = int(p.get("num_workers", 0))
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_train,
                            pin_memory=self.cuda, generator=torch.Generator().manual_seed(self.seed),
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        return loader, sampler

    def _epoch(self, stage: Stage, model: nn.Module, optimizer: torch.optim.Optimizer,
               schedule: CosineSchedule) -> None:
        self._train_mode(stage)
        loader, sampler = self._loader(stage)
        n_batches = sampler.batches_per_epoch
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples (this rank, since epoch start)
        if self.history and "partial_epoch" in self.history[-1]:  # resumed mid-epoch: this rank's sums so far
            partial = self.history.pop()
            if partial["partial_epoch"] == self.epoch and self.batch:
                sums += torch.tensor(partial["partial_sums"][self.rk.rank], dtype=torch.float64)
        t0, seen = time.perf_counter(), 0
        bar = tqdm(total=n_batches, initial=self.batch, desc=f"epoch {self.epoch + 1}", unit="batch",
                   disable=not (self.rk.main and self.params.get("progress", True)), dynamic_ncols=True)
        lr = schedule.step(self.epoch, self.batch / n_batches)
        head = self.net.head
        for x, y, skipped in loader:
            for i, reason in skipped:
                if i not in self.skipped:
                    logger.warning("unreadable training image %s (%s): %s; replaced in its batch",
                                   self.train_set.ids[i], self.train_set.paths[i], reason)
                self.skipped[i] = reason
            x = x.to(self.rk.device, non_blocking=True)
            y = y.to(self.rk.device, non_blocking=True)
            if self.cuda and self.params.get("channels_last", True):
                x = x.contiguous(memory_format=torch.channels_last)
            boundary = (self.batch + 1) % self.accumulate == 0 or self.batch + 1 == n_batches
            sync = model.no_sync() if (self.rk.world > 1 and not boundary) else contextlib.nullcontext()
            with sync:
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                    logits = model(x, y)
                    loss = head.loss(logits.float(), y)
                self.scaler.scale(loss / self.accumulate).backward()
            with torch.no_grad():
                sums += torch.tensor([float(loss.detach()) * len(y), float((logits.argmax(1) == y).sum()), len(y)],
                                     dtype=torch.float64)
            self.batch += 1
            seen += len(y)
            bar.update(1)
            if boundary:
                clip = self.params.get("grad_clip")
                if clip:
                    self.scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(self.net.parameters(), float(clip))
                self.scaler.step(optimizer)
                self.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                lr = schedule.step(self.epoch, self.batch / n_batches)
                if self.save_every and self.step % self.save_every == 0 and self.batch < n_batches:
                    self._save_step(optimizer, schedule, sums)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
        bar.close()
        seconds = time.perf_counter() - t0
        # loss sum, correct, samples, then peak memory: host RSS (MB, summed over ranks) and CUDA (MB, the largest)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        cuda_mb = torch.cuda.max_memory_allocated(self.rk.device) / 2**20 if self.cuda else 0.0
        totals = torch.cat([sums, torch.tensor([rss], dtype=torch.float64)])
        peak_cuda = torch.tensor([cuda_mb], dtype=torch.float64)
        if self.rk.world > 1:
            dist.all_reduce(totals)
            dist.all_reduce(peak_cuda, op=dist.ReduceOp.MAX)
        totals = torch.cat([totals, peak_cuda])
        self._end_epoch(stage, optimizer, schedule, totals, seconds, seen, lr)

    def _position(self, optimizer: torch.optim.Optimizer, schedule: CosineSchedule) -> dict[str, Any]:
        rngs = _gather(self.rk, rng_state())
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "world_size": self.rk.world,
                "optimizer": optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "scheduler": schedule.state_dict(), "rng": rngs, "history": list(self.history),
                "best": dict(self.best)}

    def _save_step(self, optimizer: torch.optim.Optimizer, schedule: CosineSchedule, sums: torch.Tensor) -> None:
        """Mid-epoch checkpoint: ``last.pth`` at this step, with this rank's running sums kept per rank."""
        partial = _gather(self.rk, sums.tolist())
        state = self._position(optimizer, schedule)
        state["history"].append({"partial_epoch": self.epoch, "partial_sums": partial})
        self._write_skipped()
        if self.rk.main:
            save_training_checkpoint(self.out / LAST, self.net, self.params, state)
            logger.info("saved %s at epoch %d, batch %d (step %d)", self.out / LAST, self.epoch + 1, self.batch,
                        self.step)

    def _end_epoch(self, stage: Stage, optimizer: torch.optim.Optimizer, schedule: CosineSchedule,
                   totals: torch.Tensor, seconds: float, seen: int, lr: float) -> None:
        loss_sum, correct, n, rss_mb, cuda_mb = totals.tolist()
        row: dict[str, Any] = {"epoch": self.epoch + 1, "stage": stage.index, "lr": lr,
                               "loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "images": int(n),
                               "seconds": round(seconds, 2),
                               "images_per_s": round(seen * self.rk.world / max(seconds, 1e-9), 2),
                               "peak_rss_mb": round(rss_mb, 1)}
        if self.cuda:
            row["peak_cuda_mb"] = round(cuda_mb, 1)
        row.update(self._validate())
        self.history.append(row)
        score = row.get("val_score")
        improved = score is not None and score > self.best["score"]
        if improved:
            self.best = {"epoch": self.epoch + 1, "score": score}
        self.epoch, self.batch = self.epoch + 1, 0
        state = self._position(optimizer, schedule)
        self._write_skipped()
        if self.rk.main:
            path = save_training_checkpoint(self.out / f"ep{self.epoch}.pth", self.net, self.params, state)
            link_latest(path, self.out / LAST)
            if improved:
                link_latest(path, self.out / BEST)
            write_csv_rows(self.out / TRAIN_LOG_CSV, self.history)
            plot_training(self.out / "train_plot.png", self.history)
            logger.info("epoch %d: %s", self.epoch, {k: (round(v, 4) if isinstance(v, float) else v)
                                                     for k, v in row.items()})
        _barrier(self.rk)

    def _describe_kwargs(self) -> dict[str, Any]:
        p = self.params
        sizing = sizing_params({**p, "image_size": p.get("val_image_size") or p.get("image_size", 512)},
                               str(p.get("val_dataset") or "heldout"))
        return {**sizing,
                "batch_size": int(p.get("batch_size_eval") or p.get("batch_size", 32)),
                "num_workers": int(p.get("num_workers", 0)), "device": self.rk.device}

    @torch.no_grad()
    def _init_head_from_centroids(self) -> None:
        """Start the head's class rows at the classes' mean descriptors ("weight imprinting",
        Qi et al., CVPR 2018): the margin loss starts low and fine-tuning refines the features
        instead of first undoing a random head. Rank 0 computes; DDP broadcasts its weights."""
        head = self.net.head
        if not self.rk.main:
            return
        if isinstance(head, SoftmaxHead):
            raise ValueError("head_init=centroids needs a cosine head (arcface, cosface, adacos, ...), not softmax")
        if self.net.whiten is not None or self.net.head_fc is not None or self.net.meta.get("resolutions"):
            raise ValueError("head_init=centroids needs the head's input to be the descriptor (no whitening, "
                             "head_fc_dim or resolutions)")
        ts = self.train_set
        rows, feats = describe_images(self.net, ImageList(ts.ids, ts.paths), **self._describe_kwargs())
        sums = torch.zeros(ts.n_classes, feats.shape[1], dtype=torch.float64)
        sums.index_add_(0, torch.from_numpy(ts.labels[rows]), torch.from_numpy(feats).double())
        centroids = torch.nn.functional.normalize(sums.float(), dim=1)
        k = head.weight.shape[0] // ts.n_classes  # sub-centres per class, rows c*k .. c*k+k-1
        w = centroids.repeat_interleave(k, dim=0)
        if k > 1:  # identical sub-centres would stay identical: spread them a little
            w = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(self.seed))
        head.weight.copy_(w.to(head.weight.device))
        logger.info("head initialised from the centroids of %d classes (%d images)", ts.n_classes, len(rows))

    def _validate(self) -> dict[str, Any]:
        """Validation mAP of the net now (rank 0 describes; the others wait at the barrier after)."""
        if self.val is None or not self.rk.main:
            return {}
        p = self.params
        net = self.net
        kw = self._describe_kwargs()
        t0 = time.perf_counter()
        q_rows, q_feats = describe_images(net, self.val.queries, **kw)
        if self.val.db is self.val.queries:
            db_rows, db_feats = q_rows, q_feats
        else:
            db_rows, db_feats = describe_images(net, self.val.db, **kw)
        maps = validation_map(self.val, q_rows, q_feats, db_rows, db_feats)
        protocol = p.get("val_protocol", "medium")
        out = {f"val_{k}": v for k, v in maps.items()}
        out["val_score"] = maps[protocol]
        out["val_seconds"] = round(time.perf_counter() - t0, 2)
        return out

    def _write_skipped(self) -> None:
        merged: dict[int, str] = {}
        for part in _gather(self.rk, self.skipped):
            merged.update(part)
        if self.rk.main and merged:
            rows = [{"index": i, "id": self.train_set.ids[i], "path": str(self.train_set.paths[i]), "reason": r}
                    for i, r in sorted(merged.items())]
            write_csv_rows(self.out / SKIPPED_CSV, rows)
