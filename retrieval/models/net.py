"""The retrieval network and its checkpoints.

backbone → pooling → optional neck (dropout → Linear to ``fc_dim`` → BatchNorm1d, Landmark2019;
without the BatchNorm, ``neck_bn=False``: the GUIE 2022 projection to 64) → L2 → optional
whitening → L2. CNNs pool feature maps, ViTs / open_clip towers pool tokens (`retrieval.models.vit`);
``resolutions`` makes the descriptor a resolution ensemble of the same net (GUIE 1st place: 224 + 280).
A net built for training also carries a margin head (`retrieval.models.heads`), optionally behind a
training-only projection ``head_fc`` (dropout → Linear); descriptors never pass through either.

A checkpoint is ``{"meta": {...}, "state_dict": {...}, ...}``; ``meta`` holds everything
needed to rebuild the net (architecture, backbone kwargs, pooling, neck, whitening, head,
resolutions, mean/std, dim), so `load_checkpoint(path)` needs no other input (cirtorch's habit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.models.backbones import create_backbone, default_mean_std
from retrieval.models.heads import MarginHead, convert_head, create_head
from retrieval.models.pooling import GEM_POOLINGS, TOKEN_POOLINGS, GeM, create_pooling, l2n

CHECKPOINT_FORMAT = 1
RESOLUTION_COMBINE = ("concat", "mean")


class Neck(nn.Module):
    """The embedding layer: dropout → Linear(in, fc_dim) → BatchNorm1d (Landmark2019); ``bn=False``: no BatchNorm."""

    def __init__(self, in_features: int, fc_dim: int, dropout: float = 0.0, bn: bool = True) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(in_features, fc_dim)
        self.bn = nn.BatchNorm1d(fc_dim) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.dropout(x)))


def resize_long_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` resized (bilinear) so its long side is ``size``, aspect ratio kept."""
    h, w = (int(v) for v in x.shape[-2:])  # plain ints: a traced export fixes the input size
    scale = size / max(h, w)
    target = (max(1, round(h * scale)), max(1, round(w * scale)))
    return x if target == (h, w) else F.interpolate(x, size=target, mode="bilinear", align_corners=False)


class RetrievalNet(nn.Module):
    """Maps images ``(B, 3, H, W)`` to L2-normalised descriptors ``(B, meta['dim'])``."""

    def __init__(self, backbone: nn.Module, pool: nn.Module, whiten: nn.Linear | None, meta: dict,
                 neck: nn.Module | None = None, head: nn.Module | None = None,
                 head_fc: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.pool, self.neck, self.whiten = backbone, pool, neck, whiten
        self.head, self.head_fc = head, head_fc
        self.meta = meta

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before normalisation (pooled features, through the neck if any)."""
        v = self.pool(self.backbone.forward_features(x))
        return self.neck(v) if self.neck is not None else v

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the margin head sees in training: the embedding, through ``head_fc`` if any."""
        v = self.embed(x)
        return self.head_fc(v) if self.head_fc is not None else v

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """The descriptor of ``x`` at the size it comes in."""
        v = l2n(self.embed(x))
        if self.whiten is not None:
            v = l2n(self.whiten(v))
        return v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self.meta.get("resolutions")
        if not sizes:
            return self.describe(x)
        parts = [self.describe(resize_long_side(x, int(s))) for s in sizes]
        if self.meta.get("resolution_combine", "concat") == "mean":
            return l2n(torch.stack(parts).mean(dim=0))
        return l2n(torch.cat(parts, dim=1))

    @property
    def gem_p(self) -> float | None:
        """GeM's p, used as the power of multi-scale averaging; None for other poolings."""
        return self.pool.p_value if isinstance(self.pool, GeM) else None

    def set_patch_stride(self, stride: int | None) -> None:
        """Overlapping ViT patches from now on (a training stage's ``patch_stride``); kept in ``meta``."""
        if not hasattr(self.backbone, "set_patch_stride"):
            raise ValueError(f"patch_stride is for ViT backbones, not {self.meta['architecture']}")
        self.backbone.set_patch_stride(stride)
        self.meta["patch_stride"] = None if self.backbone.patch_stride == self.backbone.patch_size \
            else self.backbone.patch_stride

    def switch_head(self, name: str, **kwargs: Any) -> None:
        """A head of kind ``name`` starting from the current class rows (`convert_head`)."""
        new = convert_head(self.head, name, **kwargs)
        self.head = new
        self.meta["head"] = head_meta(name, new, self.meta["head"])

    def set_scale_margin(self, s: float | None = None, m: float | None = None) -> None:
        """The head's scale / margin from now on (a stage's ``s`` / ``margin``); kept in ``meta``."""
        self.head.set_scale_margin(s=s, m=m)
        self.meta["head"] = head_meta(self.meta["head"]["name"], self.head, self.meta["head"])


def head_meta(name: str, head: MarginHead, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``meta['head']`` record of ``head``: name, classes, its training projection, its config."""
    fc = {k: previous[k] for k in ("fc_dim", "dropout") if previous and previous.get(k) is not None}
    return {"name": name, "n_classes": head.n_classes, **fc, **head.config()}


def create_model(architecture: str = "tf_efficientnet_lite0", pooling: str = "gem", p: float | None = 3.0,
                 whitening: int | None = None, pretrained: str | None = "efficientnet_lite0",
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 fc_dim: int | None = None, dropout: float = 0.0, neck_bn: bool = True, head: dict | None = None,
                 backbone_kwargs: dict | None = None, patch_stride: int | None = None,
                 resolutions: Sequence[int] | None = None, resolution_combine: str = "concat",
                 **unused: Any) -> RetrievalNet:
    """Build a `RetrievalNet`: one path for CNNs, timm ViTs and open_clip towers.

    ``architecture``: a timm name or ``open_clip:<model>``; ``backbone_kwargs``: its constructor
    kwargs (timm) or config overrides (open_clip); ``patch_stride``: overlapping ViT patches.
    ``pooling``: ``gem`` / ``mac`` / ``spoc`` / ``rmac`` for CNNs, ``cls`` / ``avg_tokens`` /
    ``gem_tokens`` for ViTs. ``fc_dim``: width of the neck (None: no neck, descriptors are the
    pooled features); ``dropout``: before the neck's Linear; ``neck_bn``: the neck's BatchNorm;
    ``whitening``: output dim of a learned linear whitening, or None; ``head``: ``{"name",
    "n_classes", ["fc_dim", "dropout"], **kwargs}`` of a margin head for training (`create_head`;
    ``fc_dim`` / ``dropout`` put a training-only projection before it), or None; ``resolutions``:
    long-side sizes whose descriptors are combined (``resolution_combine``: ``concat`` or ``mean``)
    into the net's descriptor. Extra keys (e.g. a whole experiment ``params`` dict) are ignored,
    so ``create_model(**params)`` works.
    """
    backbone = create_backbone(architecture, pretrained, backbone_kwargs, patch_stride)
    tokens = hasattr(backbone, "num_prefix_tokens")
    if tokens != (pooling in TOKEN_POOLINGS):
        kind, choices = ("a ViT", TOKEN_POOLINGS) if tokens else ("a CNN", ("gem", "mac", "spoc", "rmac"))
        raise ValueError(f"pooling {pooling!r} does not fit {architecture} ({kind}); choose from {', '.join(choices)}")
    pool_kwargs: dict[str, Any] = {"p": p} if pooling in GEM_POOLINGS else {}
    if tokens:
        pool_kwargs["num_prefix_tokens"] = backbone.num_prefix_tokens
    pool = create_pooling(pooling, **pool_kwargs)
    in_dim = backbone.num_features
    neck = Neck(in_dim, int(fc_dim), float(dropout or 0.0), bool(neck_bn)) if fc_dim else None
    embed_dim = int(fc_dim) if fc_dim else int(in_dim)
    whiten = nn.Linear(embed_dim, int(whitening), bias=True) if whitening else None
    if whiten is not None:  # start as a (truncated) identity so an untrained net behaves like no whitening
        nn.init.eye_(whiten.weight)
        nn.init.zeros_(whiten.bias)
    head_module, head_fc, head_record = None, None, None
    if head:
        spec = dict(head)
        name, n_classes = spec.pop("name"), int(spec.pop("n_classes"))
        fc, head_dropout = spec.pop("fc_dim", None), float(spec.pop("dropout", 0.0) or 0.0)
        if fc:
            head_fc = nn.Sequential(nn.Dropout(head_dropout) if head_dropout else nn.Identity(),
                                    nn.Linear(embed_dim, int(fc)))
        head_module = create_head(name, int(fc) if fc else embed_dim, n_classes, **spec)
        head_record = head_meta(name, head_module, {"fc_dim": int(fc), "dropout": head_dropout} if fc else None)
    if resolution_combine not in RESOLUTION_COMBINE:
        raise ValueError(f"resolution_combine must be one of {RESOLUTION_COMBINE}, got {resolution_combine!r}")
    sizes = [int(s) for s in resolutions] if resolutions else None
    dim = int(whitening) if whitening else embed_dim
    dmean, dstd = default_mean_std(pretrained, architecture)
    meta = {
        "architecture": architecture,
        "backbone_kwargs": dict(backbone_kwargs) if backbone_kwargs else None,
        "patch_stride": None if not tokens or backbone.patch_stride == backbone.patch_size else backbone.patch_stride,
        "pooling": pooling,
        "p": p if pooling in GEM_POOLINGS else None,
        "fc_dim": int(fc_dim) if fc_dim else None,
        "dropout": float(dropout or 0.0),
        "neck_bn": bool(neck_bn),
        "whitening": int(whitening) if whitening else None,
        "head": head_record,
        "resolutions": sizes,
        "resolution_combine": resolution_combine,
        "pretrained": str(pretrained) if pretrained else None,
        "mean": [float(v) for v in (mean or dmean)],
        "std": [float(v) for v in (std or dstd)],
        "dim": dim * len(sizes) if sizes and resolution_combine == "concat" else dim,
    }
    return RetrievalNet(backbone, pool, whiten, meta, neck, head_module, head_fc)


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
