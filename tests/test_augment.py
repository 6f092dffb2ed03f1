"""Training images: template size, augmentation that depends only on (seed, epoch, image), bad images replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_labelled_folder
from retrieval.data.augment import AUGMENTATIONS, TrainImages, augment, collate_train, resolve_augmentation
from retrieval.data.trainset import load_train_set


@pytest.fixture()
def train_images(tmp_path):
    return load_train_set(f"folder:{write_labelled_folder(tmp_path, n_classes=2, per_class=2, size=(80, 60))}")


def test_items_have_the_template_size_and_are_reproducible(train_images):
    ds = TrainImages(train_images, [(64, 48), (48, 64)], (0.5,) * 3, (0.5,) * 3, "middle", seed=3)
    i, x, label, err = ds[(2, 1, 5)]
    assert (i, label, err) == (2, 1, None) and x.shape == (3, 64, 48)
    assert torch.equal(ds[(2, 1, 5)][1], x)  # same (seed, epoch, image): same pixels
    assert not torch.equal(ds[(2, 1, 6)][1], x)  # another epoch: another draw
    plain = TrainImages(train_images, [(64, 48), (48, 64)], (0.5,) * 3, (0.5,) * 3, "none")
    assert torch.equal(plain[(2, 1, 5)][1], plain[(2, 1, 6)][1])


def test_presets_and_overrides():
    assert resolve_augmentation("soft").scale_limit == 0.2
    assert resolve_augmentation({"preset": "middle", "shear": 2.0}).shear == 2.0
    with pytest.raises(ValueError, match="unknown augmentation"):
        resolve_augmentation("wild")
    with pytest.raises(ValueError, match="augmentation"):
        resolve_augmentation({"twirl": 1})
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    for name, aug in AUGMENTATIONS.items():
        out = augment(img, (40, 30), aug, np.random.default_rng(1))
        assert out.size == (40, 30), name


def test_collate_replaces_unreadable_images_and_keeps_the_batch_size():
    good = [(0, torch.zeros(3, 4, 4), 0, None), (2, torch.ones(3, 4, 4), 1, None)]
    x, y, skipped = collate_train([good[0], (1, None, 1, "corrupt image"), good[1]])
    assert x.shape == (3, 3, 4, 4) and y.tolist() == [0, 1, 1] and skipped == [(1, "corrupt image")]
    with pytest.raises(RuntimeError, match="every image of a training batch is unreadable"):
        collate_train([(1, None, 1, "missing file")])
