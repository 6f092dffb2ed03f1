"""Loading images safely, and the extraction dataset built on it.

Bad files (missing, zero-byte, truncated, not an image) never stop a run: `load_image`
raises `ImageLoadError` with a short reason and `ImageListDataset` turns it into a
skipped item that the extractor lists in ``skipped.csv``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from retrieval.data.dataset import BBox, ImageList

# Reject decompression bombs with an error we catch, instead of a warning we ignore.
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageLoadError(Exception):
    """An image that cannot be used; ``str(err)`` is a one-line reason."""


def load_image(path: str | os.PathLike, bbx: BBox | None = None) -> Image.Image:
    """Open ``path`` as RGB, fully decoded, optionally cropped to ``bbx`` (x1, y1, x2, y2)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError("missing file") from None
    except OSError as err:
        raise ImageLoadError(f"cannot stat: {err.strerror}") from None
    if size == 0:
        raise ImageLoadError("zero-byte file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files fail here, not later in a worker
            img = img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageLoadError("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"corrupt image: {err}".splitlines()[0]) from None
    return img if bbx is None else crop_box(img, bbx)


def crop_box(img: Image.Image, bbx: BBox) -> Image.Image:
    """``img`` cropped to ``bbx`` (x1, y1, x2, y2, pixels; clipped to the image, outward to whole pixels)."""
    x1, y1, x2, y2 = (float(v) for v in bbx)
    box = (max(0, math.floor(x1)), max(0, math.floor(y1)),
           min(img.width, math.ceil(x2)), min(img.height, math.ceil(y2)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ImageLoadError(f"empty crop box {tuple(bbx)} for a {img.width}x{img.height} image")
    return img.crop(box)


def resize_to(img: Image.Image, image_size: int, mode: str = "long") -> Image.Image:
    """Resize so the long side is ``image_size`` (``mode='long'``) or to a square (``'square'``).

    ``image_size <= 0`` keeps the original size.
    """
    if image_size <= 0:
        return img
    if mode == "square":
        return img.resize((image_size, image_size), Image.BICUBIC)
    if mode != "long":
        raise ValueError(f"resize mode must be 'long' or 'square', got {mode!r}")
    w, h = img.size
    scale = image_size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HWC uint8 RGB → normalised CHW float32 tensor."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageListDataset(Dataset):
    """Items ``(index, tensor | None, error | None)`` for the images of an `ImageList`.

    Queries with a box are cropped to it before resizing, as in the revisitop protocol.
    """

    def __init__(self, images: ImageList, image_size: int, mean: Sequence[float], std: Sequence[float],
                 resize: str = "long", start: int = 0) -> None:
        self.images = images
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize = resize
        self.start = start

    def __len__(self) -> int:
        return len(self.images) - self.start

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, str | None]:
        i = self.start + k
        try:
            img = load_image(self.images.paths[i], self.images.bbx(i))
        except ImageLoadError as err:
            return i, None, str(err)
        img = resize_to(img, self.image_size, self.resize)
        return i, to_tensor(img, self.mean, self.std), None


def collate_items(batch: list) -> list:
    """Keep items as a list: images differ in shape; the extractor groups equal shapes."""
    return batch


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the image header (nothing decoded); ``(0, 0)`` when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0, 0


def read_image_sizes(paths: Sequence[str | os.PathLike], workers: int = 8, progress: bool = False) -> np.ndarray:
    """``(N, 2)`` int64 ``(width, height)`` of every image, headers read in a thread pool (I/O bound)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:
        sizes = list(tqdm(pool.map(read_image_size, paths, chunksize=256), total=len(paths), disable=not progress,
                          desc="image sizes", unit="img"))
    return np.asarray(sizes, dtype=np.int64).reshape(len(paths), 2)
