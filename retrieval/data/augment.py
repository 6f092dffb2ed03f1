"""Training images: resize to the batch's size template, augment, normalise.

Augmentation is drawn from ``np.random.default_rng([seed, epoch, index])`` (``[..., repeat]`` for
an image drawn again in the same epoch by multi-domain weights), so an image's
augmented pixels depend only on (seed, epoch, image), never on worker processes or on where a
killed run resumed: resumed training sees exactly the batches an uninterrupted run sees.

Presets follow Landmark2019 (arXiv 1906.04087, their ``soft`` / ``middle`` settings): a random
crop of up to ``scale_limit`` of each side scaled back to the template, shear, and brightness /
contrast jitter; ``hard`` adds rotation and blur.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import Dataset

from retrieval.data.images import ImageLoadError, load_image, to_tensor
from retrieval.data.trainset import TrainSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augmentation:
    scale_limit: float = 0.0  # crop each side to a random 1 - U(0, limit) of itself, then scale back
    shear: float = 0.0  # degrees, uniform in ±shear
    rotate: float = 0.0  # degrees, uniform in ±rotate
    brightness: float = 0.0  # factor uniform in 1 ± brightness
    contrast: float = 0.0
    blur_p: float = 0.0  # probability of a Gaussian blur (sigma 0.5..1.5 px)


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(),
    "soft": Augmentation(scale_limit=0.2, brightness=0.1),
    "middle": Augmentation(scale_limit=0.3, shear=4.0, brightness=0.1, contrast=0.1),
    "hard": Augmentation(scale_limit=0.4, shear=8.0, rotate=10.0, brightness=0.2, contrast=0.2, blur_p=0.2),
}


def resolve_augmentation(spec: str | dict | Augmentation) -> Augmentation:
    """A preset name, a dict of `Augmentation` fields (``{"preset": "soft", "shear": 2}``), or an instance."""
    if isinstance(spec, Augmentation):
        return spec
    if isinstance(spec, str):
        if spec not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {spec!r}; choose from {sorted(AUGMENTATIONS)}")
        return AUGMENTATIONS[spec]
    if isinstance(spec, dict):
        fields = dict(spec)
        base = resolve_augmentation(fields.pop("preset", "none"))
        try:
            return replace(base, **fields)
        except TypeError as err:
            raise ValueError(f"augmentation: {err}") from None
    raise ValueError(f"augmentation must be a preset name or a dict, got {spec!r}")


def augment(img: Image.Image, size: tuple[int, int], aug: Augmentation, rng: np.random.Generator) -> Image.Image:
    """Resize ``img`` to ``size`` = (width, height) and apply ``aug`` with draws from ``rng``."""
    w, h = size
    img = img.resize((w, h), Image.BICUBIC)
    if aug.shear or aug.rotate:
        angle = math.radians(rng.uniform(-aug.rotate, aug.rotate))
        shear = math.tan(math.radians(rng.uniform(-aug.shear, aug.shear)))
        # output → input map about the centre: rotation followed by a horizontal shear
        c, s = math.cos(angle), math.sin(angle)
        a, b, d, e = c, -s + shear * c, s, c + shear * s
        cx, cy = w / 2, h / 2
        img = img.transform((w, h), Image.Transform.AFFINE,
                            (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy), resample=Image.BILINEAR)
    if aug.brightness:
        img = ImageEnhance.Brightness(img).enhance(1.0 + rng.uniform(-aug.brightness, aug.brightness))
    if aug.contrast:
        img = ImageEnhance.Contrast(img).enhance(1.0 + rng.uniform(-aug.contrast, aug.contrast))
    if aug.blur_p and rng.random() < aug.blur_p:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    if aug.scale_limit:
        cw = max(1, round(w * (1.0 - rng.uniform(0, aug.scale_limit))))
        ch = max(1, round(h * (1.0 - rng.uniform(0, aug.scale_limit))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    return img


class TrainImages(Dataset):
    """Items for keys ``(index, template_id, epoch[, repeat])`` from `retrieval.data.samplers.TrainBatchSampler`.

    An item is ``(index, tensor | None, label, error | None)``; `collate_train` replaces
    unreadable images so batches keep their size on every rank.
    """

    def __init__(self, train: TrainSet, templates: Sequence[tuple[int, int]], mean: Sequence[float],
                 std: Sequence[float], augmentation: Any = "none", seed: int = 0) -> None:
        self.train = train
        self.templates = [tuple(t) for t in templates]
        self.mean, self.std = tuple(mean), tuple(std)
        self.aug = resolve_augmentation(augmentation)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[int, torch.Tensor | None, int, str | None]:
        index, template, epoch, *repeat = key
        label = int(self.train.labels[index])
        try:
            img = load_image(self.train.paths[index])
        except ImageLoadError as err:
            return index, None, label, str(err)
        rng = np.random.default_rng([self.seed, epoch, index, *repeat])
        img = augment(img, self.templates[template], self.aug, rng)
        return index, to_tensor(img, self.mean, self.std), label, None


def collate_train(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """``(images, labels, skipped)``; an unreadable image is replaced by a readable one of its batch.

    Replacing (rather than dropping) keeps the batch size, so every DDP rank runs the same number
    of samples per step and no batch shrinks to one image (BatchNorm needs two).
    """
    good = [item for item in batch if item[1] is not None]
    skipped = [(item[0], item[3]) for item in batch if item[1] is None]
    if not good:
        raise RuntimeError(f"every image of a training batch is unreadable: {skipped[:3]}")
    filled = [item if item[1] is not None else good[k % len(good)] for k, item in enumerate(batch)]
    x = torch.stack([item[1] for item in filled])
    y = torch.tensor([item[2] for item in filled], dtype=torch.int64)
    return x, y, skipped
