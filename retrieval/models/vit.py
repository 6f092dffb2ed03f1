"""Vision transformers as retrieval backbones: timm ViTs and open_clip image towers, at any input size.

Both adapters give `RetrievalNet` what it needs of a backbone: ``forward_features(x)`` → tokens
``(B, P + N, C)`` (``P = num_prefix_tokens`` class / register tokens, then the N patch tokens in
row-major grid order), ``num_features`` = C, and ``stem_and_blocks()`` for ``frozen_blocks``
(the stem holds the position embedding and class token, which are parameters, not modules).
The token poolings of `retrieval.models.pooling` (``cls``, ``avg_tokens``, ``gem_tokens``) reduce them.

Any input size: the image is resized to the nearest size the patch grid covers exactly
(`fit_to_grid`: a multiple of the patch size, or ``patch + k · stride`` with overlapping patches),
and the position embeddings learned for the pretraining grid are resampled to the image's grid
(`resample_pos_embed`, bicubic, as ViT / DeiT fine-tuning at higher resolution does). A
``patch_stride`` below the patch size makes patches overlap (GUIE 2022 1st place: stride 10 for
patch 14 in its last 290-px stage); it only changes the patch convolution's stride.

Hybrid ViTs (Dosovitskiy et al., ICLR 2021, "R50+ViT-B/16"): timm's ``HybridEmbed`` makes the
patches from a CNN's feature map (a 1x1 or p x p convolution on it), so a patch is the CNN's whole
reduction (32 px for EfficientNet, ResNet-26) and the image is fitted to that grid; their patches
cannot overlap (``patch_stride`` is refused). `create_hybrid_vit` builds one over any timm CNN
(``hybrid:<cnn>``, the CNN's ImageNet weights from `retrieval.models.backbones`); timm's own
hybrids (``vit_small_r26_s32_224``, ...) go through the same adapter.

open_clip towers are projected token by token: ``ln_post`` then ``proj`` on every token, so
``cls`` pooling gives exactly the CLIP image embedding and the other poolings live in that space.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OPEN_CLIP_PREFIX = "open_clip:"
# the normalisation CLIP / open_clip image towers are trained with (OpenAI's dataset statistics)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def grid_length(length: int, patch: int, stride: int) -> int:
    """Patches along a side of ``length`` pixels after `fit_to_grid` (the nearest whole grid, at least 1)."""
    return max(1, round((length - patch) / stride) + 1)


def fit_to_grid(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` resized (bilinear) so the patch grid covers it exactly: ``patch + (g − 1) · stride``."""
    h, w = (int(v) for v in x.shape[-2:])  # plain ints: a traced export fixes the input size
    th, tw = (patch + (grid_length(s, patch, stride) - 1) * stride for s in (h, w))
    if (th, tw) == (h, w):
        return x
    return F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)


def resample_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                       n_prefix: int) -> torch.Tensor:
    """Position embeddings ``(1, n_prefix + gh·gw, C)`` of ``old_grid`` resampled (bicubic) to ``new_grid``.

    The prefix rows (class / register tokens) are kept as they are. No antialiasing, so the
    graph exports to ONNX; the grids of retrieval inputs are near the pretraining grid.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


class _TokenBackbone(nn.Module):
    """What both adapters share: the patch geometry and its stride."""

    patch_size: int
    patch_stride: int
    num_features: int
    num_prefix_tokens: int

    def _patch_conv(self) -> nn.Conv2d:
        raise NotImplementedError

    def set_patch_stride(self, stride: int | None) -> None:
        """Patch convolution stride (None: the patch size, no overlap)."""
        stride = int(stride or self.patch_size)
        if not 1 <= stride <= self.patch_size:
            raise ValueError(f"patch_stride must be in [1, patch size {self.patch_size}], got {stride}")
        self._patch_conv().stride = (stride, stride)
        self.patch_stride = stride


class TimmViT(_TokenBackbone):
    """A timm ``VisionTransformer`` (class / register tokens, learned absolute position embeddings),
    with a plain patch embedding or a hybrid one (``HybridEmbed``: patches from a CNN's feature map)."""

    def __init__(self, vit: nn.Module, patch_stride: int | None = None) -> None:
        from timm.layers import HybridEmbed

        super().__init__()
        self.vit = vit
        self.hybrid = isinstance(vit.patch_embed, HybridEmbed)
        # a hybrid's patch is the CNN's reduction times the patch of the projection on its map
        self.patch_size = int(vit.patch_embed.feat_ratio() if self.hybrid else vit.patch_embed.patch_size[0])
        self.pos_grid = tuple(vit.patch_embed.grid_size)
        self.num_features = int(vit.num_features)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.set_patch_stride(patch_stride)

    def _patch_conv(self) -> nn.Conv2d:
        return self.vit.patch_embed.proj

    def set_patch_stride(self, stride: int | None) -> None:
        if not self.hybrid:
            return super().set_patch_stride(stride)
        if stride not in (None, self.patch_size):
            raise ValueError(f"patch_stride is not supported for hybrid ViTs (their patches are CNN features at "
                             f"stride {self.patch_size}), got {stride}")
        self.patch_stride = self.patch_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v, embed = self.vit, self.vit.patch_embed
        x = fit_to_grid(x, self.patch_size, self.patch_stride)
        if self.hybrid:
            x = embed.backbone(x)
            x = embed.proj(x[-1] if isinstance(x, list | tuple) else x)  # the last map of a feature list
        else:
            x = embed.proj(x)
        grid = tuple(int(g) for g in x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        if not self.hybrid:
            x = embed.norm(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (v.cls_token, v.reg_token) if t is not None]
        if v.pos_embed is None:
            x = torch.cat([*prefix, x], dim=1)
        elif v.no_embed_class:  # position embeddings for the patches only (DeiT-3, big_vision)
            x = torch.cat([*prefix, x + resample_pos_embed(v.pos_embed, self.pos_grid, grid, 0)], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1)
            x = x + resample_pos_embed(v.pos_embed, self.pos_grid, grid, self.num_prefix_tokens)
        x = v.norm_pre(v.patch_drop(v.pos_drop(x)))
        return v.norm(v.blocks(x))

    def stem_and_blocks(self) -> tuple[list[nn.Module | nn.Parameter], list[nn.Module]]:
        """Plain: the patch embedding, position embeddings and class token, then the blocks. Hybrid: the
        CNN's stem, then its blocks (the last one with what follows it in the CNN, e.g. EfficientNet's
        conv_head, so ``frozen_blocks`` = its block count freezes the whole CNN), then the transformer's
        blocks; the patch projection and position embeddings train unless ``freeze_backbone``."""
        v = self.vit
        params = [p for p in (v.cls_token, v.reg_token, v.pos_embed) if isinstance(p, nn.Parameter)]
        if not self.hybrid:
            return [v.patch_embed, *params, v.norm_pre], list(v.blocks)
        stem, cnn_blocks = cnn_stem_and_blocks(v.patch_embed.backbone)
        return stem, [*cnn_blocks, *v.blocks]


class OpenClipViT(_TokenBackbone):
    """An open_clip ``VisionTransformer`` image tower; tokens leave through ``ln_post`` and ``proj``."""

    def __init__(self, visual: nn.Module, patch_stride: int | None = None) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise ValueError("open_clip towers with attentional pooling or final_ln_after_pool are not supported")
        self.visual = visual
        self.patch_size = int(visual.patch_size[0])
        self.pos_grid = tuple(visual.grid_size)
        self.num_features = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.ln_post.weight.numel())
        self.num_prefix_tokens = 1
        self.set_patch_stride(patch_stride)

    def _patch_conv(self) -> nn.Conv2d:
        return self.visual.conv1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(fit_to_grid(x, self.patch_size, self.patch_stride))
        grid = tuple(int(g) for g in x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + resample_pos_embed(v.positional_embedding.unsqueeze(0), self.pos_grid, grid, 1).to(x.dtype)
        x = v.ln_post(v.transformer(v.ln_pre(v.patch_dropout(x))))
        return x @ v.proj if v.proj is not None else x

    def stem_and_blocks(self) -> tuple[list[nn.Module | nn.Parameter], list[nn.Module]]:
        v = self.visual
        return [v.conv1, v.class_embedding, v.positional_embedding, v.ln_pre], list(v.transformer.resblocks)


def cnn_stem_and_blocks(cnn: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """A hybrid's CNN as ``(stem, blocks)``: its own split (`retrieval.models.backbones.backbone_blocks`)
    with the modules after its blocks joined to the last block; a CNN without blocks (a ResNet stem
    alone, as in ``vit_tiny_r_s16_p8_224``) is all stem."""
    from retrieval.models.backbones import backbone_blocks

    try:
        stem, blocks = backbone_blocks(cnn)
    except ValueError:
        return [cnn], []
    children = list(cnn.children())
    last = next(i for i, m in enumerate(children) if m is blocks[-1] or any(c is blocks[-1] for c in m.children()))
    tail = [m for m in children[last + 1:] if any(True for _ in m.parameters())]
    if tail:  # a grouping for requires_grad_, not a layer
        blocks = [*blocks[:-1], nn.ModuleList([blocks[-1], *tail])]
    return stem, blocks


def is_vit(model: nn.Module) -> bool:
    """A timm model the `TimmViT` adapter drives: a ``VisionTransformer`` with a plain patch embedding or a
    hybrid one (``HybridEmbed``); any other patch embedding is refused."""
    from timm.layers import HybridEmbed, PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return False
    if not isinstance(model.patch_embed, PatchEmbed | HybridEmbed):
        raise ValueError(f"{type(model.patch_embed).__name__}: only ViTs with timm's PatchEmbed or HybridEmbed "
                         "(a CNN's feature map as patches) are supported")
    return True


def create_hybrid_vit(cnn: nn.Module, vit_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A timm ``VisionTransformer`` whose patches are ``cnn``'s feature map (``cnn(x)``: ``(B, C, h, w)``)
    through a 1x1 projection to the transformer width (the ViT paper's hybrid, patch size 1).

    ``vit_kwargs`` go to ``VisionTransformer`` (``depth``, ``embed_dim``, ``num_heads``, ``img_size``: the
    position-embedding grid is the CNN's map of that size; ``init_values``: LayerScale, which near 0 makes
    the untrained transformer pass the projected CNN map through; ``class_token``, ``final_norm``, ...).
    ``cnn``'s weights are kept: the ViT's initialisation (of every Linear in the model) is undone for them.
    """
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {"img_size": 224, **(vit_kwargs or {})}
    for key in ("patch_size", "embed_layer", "num_classes", "in_chans"):
        if key in kwargs:
            raise ValueError(f"backbone_kwargs: {key} is fixed for a hybrid ViT (patches are the CNN's map)")
    weights = {k: v.clone() for k, v in cnn.state_dict().items()}
    vit = VisionTransformer(embed_layer=partial(HybridEmbed, backbone=cnn), patch_size=1, num_classes=0,
                            global_pool="", **kwargs)
    cnn.load_state_dict(weights)
    return vit


def open_clip_tower(name: str, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The image tower of an open_clip model config (``ViT-H-14``, ...), built alone with random weights.

    ``overrides``: ``embed_dim`` (the output width) and any ``vision_cfg`` key (``layers``, ``width``,
    ``head_width``, ``patch_size``, ``image_size``, ...), e.g. a tiny tower for tests.
    """
    try:
        import open_clip
        from open_clip.model import _build_vision_tower
    except ImportError as err:
        raise ImportError(f"architecture {OPEN_CLIP_PREFIX}{name} needs open_clip: pip install "
                          f"'landmark-retrieval[clip]' ({err})") from None
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}; e.g. {', '.join(open_clip.list_models()[:8])}, ...")
    over = dict(overrides or {})
    embed_dim = int(over.pop("embed_dim", cfg["embed_dim"]))
    vision_cfg = {**cfg["vision_cfg"], **over}
    if isinstance(vision_cfg.get("layers"), list | tuple) or vision_cfg.get("timm_model_name"):
        raise ValueError(f"open_clip {name}: only ViT image towers are supported (not ResNet / timm towers)")
    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))


def load_open_clip_weights(tower: nn.Module, path: str | os.PathLike) -> None:
    """Load an open_clip checkpoint (a whole CLIP state dict: ``visual.*`` keys are taken, or the
    tower's own state dict; ``.safetensors`` or a torch file) into ``tower``; strict on the tower."""
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    own = tower.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: {bad[0]} is {tuple(state[bad[0]].shape)}, the tower's is {tuple(own[bad[0]].shape)}"
                         " (another open_clip model or image size?)")
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: {len(missing)} image-tower tensors missing, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors are not in the image tower, e.g. {unexpected[:3]}")
