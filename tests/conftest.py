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
