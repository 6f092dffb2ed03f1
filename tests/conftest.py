"""Shared test set-up: offline hub, few threads, the optional real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


def write_jpeg(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """A small random-pattern RGB JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised GeM EfficientNet-Lite0 saved as a checkpoint (no weights needed)."""
    import torch

    from retrieval.models import create_model, save_checkpoint

    torch.manual_seed(0)
    net = create_model(pretrained=None)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pth", net)


def write_labelled_folder(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = (64, 48),
                          seed: int = 0, queries: bool = False) -> Path:
    """A labelled image-folder CSV (``id,path,landmark_id[,query]``): each class one colour pattern, views jittered.

    With ``queries`` the first image of each class is a query, the rest the database.
    """
    import csv

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_classes):
        base = rng.integers(0, 256, (6, 8, 3)).astype(np.float64)
        for v in range(per_class):
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            path = root / f"c{c}_v{v}.jpg"
            Image.fromarray(img).resize(size, Image.BILINEAR).save(path, quality=90)
            rows.append({"id": f"c{c}_v{v}", "path": path.name, "landmark_id": f"lm{c}", "query": int(v == 0)})
    csv_path = root / "images.csv"
    with csv_path.open("w", newline="") as f:
        fields = ["id", "path", "landmark_id", *(["query"] if queries else [])]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


# A net that trains in a second on the CPU: timm's test_efficientnet, random weights, no neck.
TINY_TRAIN_PARAMS = {
    "architecture": "test_efficientnet", "pretrained": None, "pooling": "gem", "p": 3.0, "fc_dim": None,
    "whitening": None, "loss": "arcface", "s": 30.0, "margin": 0.3, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
    "wd": 1e-5, "min_lr": 1e-4, "epochs": 2, "batch_size": 4, "size_templates": [[64, 48]], "augmentation": "none",
    "freeze_bn": True, "num_workers": 0, "seed": 0, "image_size": 64, "resize": "long", "batch_size_eval": 8,
    "eval_ms": False, "eval_rerank": ["none"], "progress": False,
}

# timm's vit_tiny_patch16_224 shrunk: 2 blocks of width 64, a 4x4 grid at 64 px
TINY_VIT = {"architecture": "vit_tiny_patch16_224", "pretrained": None,
            "backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64}}
# a hybrid ViT over timm's test_efficientnet (its 256-channel map at stride 32): 2 blocks of width 32,
# LayerScale near 0 (the untrained transformer passes the projected map through), no class token
TINY_HYBRID = {"architecture": "hybrid:test_efficientnet", "pretrained": None,
               "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64, "init_values": 1e-5,
                                   "class_token": False, "final_norm": False}}
# open_clip's ViT-H-14 config shrunk: 2 layers of width 64, a 4x4 grid at 56 px, 32-d CLIP embedding
TINY_CLIP = {"architecture": "open_clip:ViT-H-14", "pretrained": None,
             "backbone_kwargs": {"embed_dim": 32, "layers": 2, "width": 64, "head_width": 32, "image_size": 56}}
