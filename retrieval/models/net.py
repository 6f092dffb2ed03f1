"""The retrieval network and its checkpoints.

backbone → pooling → optional neck (Landmark2019: dropout → Linear to ``fc_dim`` → BatchNorm1d)
→ L2 → optional whitening → L2. A net built for training also carries a margin head
(`retrieval.models.heads`), used only by the loss: descriptors never pass through it.

A checkpoint is ``{"meta": {...}, "state_dict": {...}, ...}``; ``meta`` holds everything
needed to rebuild the net (architecture, pooling, neck, whitening, head, mean/std, dim), so
`load_checkpoint(path)` needs no other input (cirtorch's habit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.models.backbones import create_backbone, default_mean_std
from retrieval.models.heads import create_head
from retrieval.models.pooling import GeM, create_pooling, l2n

CHECKPOINT_FORMAT = 1


class Neck(nn.Module):
    """Landmark2019's embedding layer: dropout → Linear(in, fc_dim) → BatchNorm1d."""

    def __init__(self, in_features: int, fc_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(in_features, fc_dim)
        self.bn = nn.BatchNorm1d(fc_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.dropout(x)))


class RetrievalNet(nn.Module):
    """Maps images ``(B, 3, H, W)`` to L2-normalised descriptors ``(B, meta['dim'])``."""

    def __init__(self, backbone: nn.Module, pool: nn.Module, whiten: nn.Linear | None, meta: dict,
                 neck: nn.Module | None = None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.pool, self.neck, self.whiten = backbone, pool, neck, whiten
        self.head = head
        self.meta = meta

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before normalisation (pooled features, through the neck if any): the head's input."""
        v = self.pool(self.backbone.forward_features(x))
        return self.neck(v) if self.neck is not None else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = l2n(self.embed(x))
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
                 fc_dim: int | None = None, dropout: float = 0.0, head: dict | None = None,
                 **unused: Any) -> RetrievalNet:
    """Build a `RetrievalNet`.

    ``fc_dim``: width of the Landmark2019 neck (None: no neck, descriptors are the pooled
    features); ``dropout``: before the neck's Linear; ``whitening``: output dim of a learned
    linear whitening, or None; ``head``: ``{"name", "n_classes", **kwargs}`` of a margin head for
    training (`create_head`), or None. Extra keys (e.g. a whole experiment ``params`` dict) are
    ignored, so ``create_model(**params)`` works.
    """
    backbone = create_backbone(architecture, pretrained)
    pool_kwargs = {"p": p} if pooling == "gem" else {}
    pool = create_pooling(pooling, **pool_kwargs)
    in_dim = backbone.num_features
    neck = Neck(in_dim, int(fc_dim), float(dropout or 0.0)) if fc_dim else None
    embed_dim = int(fc_dim) if fc_dim else int(in_dim)
    whiten = nn.Linear(embed_dim, int(whitening), bias=True) if whitening else None
    if whiten is not None:  # start as a (truncated) identity so an untrained net behaves like no whitening
        nn.init.eye_(whiten.weight)
        nn.init.zeros_(whiten.bias)
    head_module, head_meta = None, None
    if head:
        spec = dict(head)
        name, n_classes = spec.pop("name"), int(spec.pop("n_classes"))
        head_module = create_head(name, embed_dim, n_classes, **spec)
        head_meta = {"name": name, "n_classes": n_classes, **head_module.config()}
    dmean, dstd = default_mean_std(pretrained)
    meta = {
        "architecture": architecture,
        "pooling": pooling,
        "p": p if pooling == "gem" else None,
        "fc_dim": int(fc_dim) if fc_dim else None,
        "dropout": float(dropout or 0.0),
        "whitening": int(whitening) if whitening else None,
        "head": head_meta,
        "pretrained": str(pretrained) if pretrained else None,
        "mean": [float(v) for v in (mean or dmean)],
        "std": [float(v) for v in (std or dstd)],
        "dim": int(whitening) if whitening else embed_dim,
    }
    return RetrievalNet(backbone, pool, whiten, meta, neck, head_module)


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
