"""Loading images safely, sizing them for the net, and the extraction dataset built on both.

Bad files (missing, zero-byte, truncated, not an image) never stop a run: `load_image`
raises `ImageLoadError` with a short reason and `ImageListDataset` turns it into a
skipped item that the extractor lists in ``skipped.csv``.

`InputSize` says what size an image is given to the net at: its own size scaled by a
``resize`` policy (``scale="exact"``: every image keeps its aspect ratio, so batches hold
only the images that happen to share a shape), or one of a few aspect-ratio *buckets*
(Landmark2019's size templates: ``scale="aspect"`` or a template-set name such as ``L2``),
so that real photos of mixed shapes fill whole batches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from retrieval.data.dataset import BBox, ImageList
from retrieval.data.samplers import Template, assign_templates, resolve_templates, scale_templates

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


RESIZE_MODES = ("long", "square", "cirtorch")


def resize_to(img: Image.Image, image_size: int, mode: str = "long") -> Image.Image:
    """``img`` sized for the net by ``mode``; ``image_size <= 0`` keeps the original size.

    - ``long``: the long side becomes ``image_size`` (small images are enlarged), sides rounded half-even;
    - ``square``: ``image_size`` × ``image_size``;
    - ``cirtorch``: cirtorch's ``imresize``, i.e. PIL's ``thumbnail((image_size, image_size), LANCZOS)``: fits
      in the square, never enlarges, sides rounded by PIL's own rule; the vectors of the published protocols.
    """
    if image_size <= 0:
        return img
    if mode == "square":
        return img.resize((image_size, image_size), Image.BICUBIC)
    if mode == "cirtorch":
        if img.width <= image_size and img.height <= image_size:
            return img
        out = img.copy()  # thumbnail works in place
        out.thumbnail((image_size, image_size), Image.LANCZOS)
        return out
    if mode != "long":
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    w, h = img.size
    scale = image_size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)


ASPECT_TEMPLATES = "L2"  # the aspect ratios of scale="aspect": Landmark2019's five extraction buckets
BUCKET_MULTIPLE = 8  # sides of image_size-scaled buckets are rounded to a multiple of this


def resolve_buckets(scale: str | Sequence[Sequence[int]] | None, image_size: int) -> tuple[Template, ...] | None:
    """The size templates of a ``scale`` spec; None for ``exact`` (each image its own size).

    ``aspect``: `ASPECT_TEMPLATES`' ratios with the long side ``image_size``; a template-set name
    (``L2``, ``M``, ... of `retrieval.data.samplers.SIZE_TEMPLATES`) or ``[[w, h], ...]``: those
    sizes as they are (Landmark2019's ``predict --scale L2``: 800 px, whatever ``image_size`` says).
    """
    if scale is None or scale == "exact":
        return None
    if scale == "aspect":
        if image_size <= 0:
            raise ValueError(f"scale='aspect' needs image_size > 0, got {image_size}")
        base = resolve_templates(ASPECT_TEMPLATES)
        factor = image_size / max(max(t) for t in base)
        return scale_templates(base, factor, multiple=BUCKET_MULTIPLE)
    if isinstance(scale, str) and scale.startswith("["):  # a list given on the command line
        try:
            scale = json.loads(scale)
        except json.JSONDecodeError:
            raise ValueError(f"scale {scale!r}: not a JSON list of [width, height] pairs") from None
    try:
        return resolve_templates(scale)
    except ValueError as err:
        raise ValueError(f"scale: expected 'exact', 'aspect', a template-set name or [[w, h], ...]; {err}") from None


@dataclass(frozen=True)
class InputSize:
    """The size an image goes through the net at: `resize_to` (``buckets=None``) or its aspect bucket.

    With buckets, an image is resized (BICUBIC) to the template nearest its aspect ratio in log space
    (`retrieval.data.samplers.assign_templates`): a distortion bounded by the bucket's width, no padding,
    and small images are enlarged to the template.
    """

    image_size: int = 512
    resize: str = "long"
    scale: str = "exact"  # "exact", "aspect", a template-set name, or "custom" (explicit templates)
    buckets: tuple[Template, ...] | None = None

    @classmethod
    def create(cls, image_size: int = 512, resize: str = "long",
               scale: str | Sequence[Sequence[int]] | None = "exact") -> InputSize:
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        buckets = resolve_buckets(scale, int(image_size))
        name = scale if isinstance(scale, str) and not scale.startswith("[") else "custom"
        return cls(int(image_size), resize, "exact" if buckets is None else name, buckets)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> InputSize:
        """The sizing a features file was extracted with (its ``image_size``, ``resize``, ``buckets`` attributes)."""
        buckets = attrs.get("buckets")
        if isinstance(buckets, str):
            buckets = json.loads(buckets)
        return cls(int(attrs.get("image_size") or 0), str(attrs.get("resize") or "long"),
                   str(attrs.get("scale") or "exact"), resolve_templates(buckets) if buckets else None)

    def attrs(self) -> dict[str, Any]:
        """What a features file records (and its job signature hashes) of this sizing."""
        return {"image_size": self.image_size, "resize": self.resize, "scale": self.scale,
                "buckets": None if self.buckets is None else [list(t) for t in self.buckets]}

    def apply(self, img: Image.Image) -> Image.Image:
        if self.buckets is None:
            return resize_to(img, self.image_size, self.resize)
        size = self.buckets[int(assign_templates(np.asarray([img.size]), self.buckets)[0])]
        return img if img.size == size else img.resize(size, Image.BICUBIC)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 RGB → CHW uint8 tensor (a quarter of float32's bytes to pass between processes)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` → float32 ``(x / 255 - mean) / std``, on ``x``'s device."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HWC uint8 RGB → normalised CHW float32 tensor."""
    return normalize(to_uint8_tensor(img), mean, std)


class ImageListDataset(Dataset):
    """Items ``(index, uint8 CHW tensor | None, error | None)`` for the images of an `ImageList`, sized by ``size``.

    Queries with a box are cropped to it before resizing, as in the revisitop protocol. Pixels stay
    uint8 (`normalize` runs on the extraction device). Paths are kept as one byte array: forked
    loader workers then read them without touching (and so copying) a Python object per image.
    """

    def __init__(self, images: ImageList, size: InputSize, start: int = 0) -> None:
        self.paths = np.asarray([os.fsencode(p) for p in images.paths[start:]], dtype=bytes)
        self.bbxs = None if images.bbxs is None else images.bbxs[start:]
        self.size = size
        self.start = start

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, str | None]:
        i = self.start + k
        try:
            img = load_image(os.fsdecode(self.paths[k]), None if self.bbxs is None else self.bbxs[k])
        except ImageLoadError as err:
            return i, None, str(err)
        return i, to_uint8_tensor(self.size.apply(img)), None


def collate_items(batch: list) -> list:
    """Keep items as a list: images differ in shape; the extractor groups equal shapes into batches."""
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
