"""The retrieval network (backbone → pooling → optional whitening → L2) and its checkpoints.

A checkpoint is ``{"meta": {...}, "state_dict": {...}, ...}``; ``meta`` holds everything
needed to rebuild the net (architecture, pooling, whitening, mean/std, dim), so
`load_checkpoint(path)` needs no other input (cirtorch's habit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.models.backbones import create_backbone, default_mean_std
from retrieval.models.pooling import GeM, create_pooling, l2n

CHECKPOINT_FORMAT = 1


class RetrievalNet(nn.Module):
    """Maps images ``(B, 3, H, W)`` to L2-normalised descriptors ``(B, meta['dim'])``."""

    def __init__(self, backbone: nn.Module, pool: nn.Module, whiten: nn.Linear | None, meta: dict) -> None:
        super().__init__()
        self.backbone, self.pool, self.whiten = backbone, pool, whiten
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = l2n(self.pool(self.backbone.forward_features(x)))
        if self.whiten is not None:
            v = l2n(self.whiten(v))
        return v

    @property
    def gem_p(self) -> float | None:
        """GeM's p, used as the power of multi-scale averaging; None for other poolings."""
        return self.pool.p_value if isinstance(self.pool, GeM) else None


def create_model(architecture: str = "tf_efficientnet_lite0", pooling: str = "gem", p: float | None = 3.0,
                 whitening: int | None = None, pretrained: str | None = "efficientnet_lite0",
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 **unused: Any) -> RetrievalNet:
    """Build a `RetrievalNet`. ``whitening``: output dim of a learned linear whitening, or None.

    Extra keys (e.g. a whole experiment ``params`` dict) are ignored, so
    ``create_model(**params)`` works.
    """
    backbone = create_backbone(architecture, pretrained)
    pool_kwargs = {"p": p} if pooling == "gem" else {}
    pool = create_pooling(pooling, **pool_kwargs)
    in_dim = backbone.num_features
    whiten = nn.Linear(in_dim, int(whitening), bias=True) if whitening else None
    if whiten is not None:  # start as a (truncated) identity so an untrained net behaves like no whitening
        nn.init.eye_(whiten.weight)
        nn.init.zeros_(whiten.bias)
    dmean, dstd = default_mean_std(pretrained)
    meta = {
        "architecture": architecture,
        "pooling": pooling,
        "p": p if pooling == "gem" else None,
        "whitening": int(whitening) if whitening else None,
        "pretrained": str(pretrained) if pretrained else None,
        "mean": [float(v) for v in (mean or dmean)],
        "std": [float(v) for v in (std or dstd)],
        "dim": int(whitening) if whitening else int(in_dim),
    }
    return RetrievalNet(backbone, pool, whiten, meta)


def save_checkpoint(path: str | os.PathLike, net: RetrievalNet, **extra: Any) -> Path:
    """Write ``{"meta", "state_dict", "format", **extra}`` to a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "meta": dict(net.meta), "state_dict": state, **extra}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RetrievalNet:
    """Rebuild the net from the checkpoint's own ``meta`` and load its weights (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "meta" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a retrieval checkpoint (needs 'meta' and 'state_dict')")
    meta = dict(ckpt["meta"])
    net = create_model(**{**meta, "pretrained": None})
    net.meta["pretrained"] = meta.get("pretrained")
    net.meta["checkpoint"] = str(path)
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return net
