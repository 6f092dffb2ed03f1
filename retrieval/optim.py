"""Optimisers, learning-rate schedules and the training stages they follow.

A training run is a list of *stages* (staged fine-tuning: e.g. the head alone with the backbone
frozen, then everything at a lower rate). Each stage is a dict of parameter overrides with its
own ``epochs``; `training_stages` builds the list from an experiment's params:

- ``stages`` given: each entry overrides the params for its epochs (keys: ``epochs``, ``lr``,
  ``backbone_lr``, ``min_lr``, ``warmup_epochs``, ``freeze_backbone``, ``freeze_head``, ``freeze_neck``,
  ``freeze_bn``, ``frozen_blocks``, ``size_templates`` (the stage's input sizes), ``augmentation``,
  ``class_cap``, ``batch_size``; and what changes the net from that stage on: ``loss`` (switch the
  head's kind, keeping its class rows), ``s`` / ``margin`` (the head's scale and margin, e.g. GUIE's
  0.55 → 0.65), ``patch_stride`` (overlapping ViT patches); ``datasets``: the names of ``train_sets``
  entries this stage draws from (datasets added stage by stage));
- otherwise one stage of ``epochs`` epochs, the last ``scaleup_epochs`` of them split off as a
  Landmark2019 "scale-up" stage at ``scaleup_templates`` with BatchNorm frozen.

The learning rate follows a cosine from ``lr`` to ``min_lr`` (Landmark2019: 1e-3 → 3e-6 over 5
epochs) after an optional linear warm-up. A stage that sets no ``lr`` of its own continues the
cosine of the stage before it (the scale-up epoch carries on the schedule, as theirs did); a
stage with its own ``lr`` starts a new one. The rate is a pure function of the position in
training, so resuming needs only the position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

STAGE_KEYS = ("epochs", "lr", "backbone_lr", "min_lr", "warmup_epochs", "freeze_backbone", "freeze_head",
              "freeze_neck", "freeze_bn", "frozen_blocks", "size_templates", "augmentation", "class_cap", "batch_size",
              "loss", "s", "margin", "patch_stride", "datasets")


@dataclass(frozen=True)
class Stage:
    """Epochs ``[start, start + epochs)`` of training with ``params`` (the experiment's, with overrides)."""

    index: int
    start: int
    epochs: int
    params: dict[str, Any]
    chain_start: int  # first epoch of the cosine this stage belongs to
    chain_epochs: int  # length of that cosine in epochs

    @property
    def end(self) -> int:
        return self.start + self.epochs


def training_stages(params: dict[str, Any]) -> list[Stage]:
    """The stages of a run (see the module docstring); a bad entry is a one-line ValueError."""
    if params.get("stages"):
        raw = [dict(s) for s in params["stages"]]
    else:
        epochs = int(params.get("epochs", 5))
        scaleup = int(params.get("scaleup_epochs", 0) or 0)
        if not 0 <= scaleup < epochs:
            raise ValueError(f"scaleup_epochs must be in [0, epochs), got {scaleup} with epochs={epochs}")
        raw = [{"epochs": epochs - scaleup}]
        if scaleup:
            raw.append({"epochs": scaleup, "size_templates": params.get("scaleup_templates", "M2"),
                        "freeze_bn": True})
    stages: list[Stage] = []
    start = 0
    for i, over in enumerate(raw):
        unknown = sorted(set(over) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(f"stages[{i}]: unknown keys {unknown}; allowed: {', '.join(STAGE_KEYS)}")
        epochs = int(over.get("epochs", 0))
        if epochs < 1:
            raise ValueError(f"stages[{i}]: epochs must be >= 1, got {over.get('epochs')!r}")
        stages.append(Stage(i, start, epochs, {**params, **over}, start, epochs))
        start += epochs
    # chain stages that set no lr of their own onto the cosine of the stage before
    chained: list[Stage] = []
    for i, st in enumerate(stages):
        if i > 0 and "lr" not in raw[i]:
            prev = chained[-1]
            rates = {k: prev.params[k] for k in ("lr", "backbone_lr", "min_lr", "warmup_epochs")
                     if k in prev.params and k not in raw[i]}
            st = Stage(st.index, st.start, st.epochs, {**st.params, **rates}, prev.chain_start, 0)
        chained.append(st)
    out = []
    for st in chained:
        length = sum(s.epochs for s in chained if s.chain_start == st.chain_start)
        out.append(Stage(st.index, st.start, st.epochs, st.params, st.chain_start, length))
    return out


def stage_of(stages: Sequence[Stage], epoch: int) -> Stage:
    for st in stages:
        if st.start <= epoch < st.end:
            return st
    raise ValueError(f"epoch {epoch} is past the last stage (training has {stages[-1].end} epochs)")


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Multiplier of the base rate at ``progress`` (epochs into the cosine, as a fraction of its length).

    Linear warm-up over the first ``warmup`` (fraction) of the cosine, then
    ``min + (1 - min)(1 + cos(pi t)) / 2`` (SGDR, Loshchilov & Hutter 2017, without restarts).
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    t = (progress - warmup) / (1.0 - warmup) if warmup < 1 else 1.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class CosineSchedule:
    """Sets each param group's ``lr`` from the position (epoch, fraction of it) in a stage's cosine."""

    def __init__(self, optimizer: torch.optim.Optimizer, stage: Stage) -> None:
        self.optimizer, self.stage = optimizer, stage
        self.base = [g["initial_lr"] for g in optimizer.param_groups]
        lr = float(stage.params.get("lr", 1e-3))
        self.min_ratio = float(stage.params.get("min_lr", 3e-6)) / lr if lr > 0 else 0.0
        warm = float(stage.params.get("warmup_epochs", 0) or 0)
        self.warmup = warm / stage.chain_epochs if stage.chain_epochs else 0.0
        self.last_progress = 0.0

    def step(self, epoch: int, fraction: float) -> float:
        """Apply the rate at ``epoch + fraction``; returns the head's (first group's) rate."""
        self.last_progress = (epoch - self.stage.chain_start + fraction) / self.stage.chain_epochs
        f = lr_factor(self.last_progress, self.warmup, self.min_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cosine", "base": list(self.base), "min_ratio": self.min_ratio, "warmup": self.warmup,
                "chain_start": self.stage.chain_start, "chain_epochs": self.stage.chain_epochs,
                "progress": self.last_progress}


def param_groups(net: nn.Module, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: head + neck + pooling at ``lr``, backbone at ``backbone_lr``.

    Frozen parameters (``requires_grad=False``) are left out; GeM's p and biases / norms get no
    weight decay.
    """
    lr = float(params.get("lr", 1e-3))
    backbone_lr = float(params.get("backbone_lr") or lr)
    wd = float(params.get("wd", 1e-5))
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = name.startswith("backbone.")
        no_decay = p.ndim <= 1
        groups.setdefault((is_backbone, no_decay), []).append(p)
    out = []
    for (is_backbone, no_decay), ps in sorted(groups.items()):
        base = backbone_lr if is_backbone else lr
        out.append({"params": ps, "lr": base, "initial_lr": base, "weight_decay": 0.0 if no_decay else wd,
                    "name": f"{'backbone' if is_backbone else 'head'}{'-no_decay' if no_decay else ''}"})
    if not out:
        raise ValueError("nothing to train: every parameter is frozen")
    return out


def create_optimizer(net: nn.Module, params: dict[str, Any]) -> torch.optim.Optimizer:
    """``optimizer``: ``sgd`` (Landmark2019: momentum 0.9, lr 1e-3, wd 1e-5) or ``adamw``."""
    name = str(params.get("optimizer", "sgd")).lower()
    groups = param_groups(net, params)
    if name in ("sgd", "momentum"):
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=float(params.get("momentum", 0.9)),
                               nesterov=bool(params.get("nesterov", False)))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(params.get("betas", (0.9, 0.999))))
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")
