"""The search service's core: a net and a features file, queried by image or by indexed id.

`SearchService` loads everything once: the net (the checkpoint the features were extracted
with, or one named), the features HDF5 as an exact FAISS index (or a saved index of it, built
by the ``index`` verb: `retrieval.index`, for plain kNN requests), the re-ranking chains it
offers (their database state, e.g. αDBA vectors and kNN graphs, built at start) and an
`ImageTable` (id → image file, landmark id) for thumbnails. Queries are embedded exactly as
the database was (the file's ``image_size``, ``scales``, ``resize`` attributes).

Everything a request sends is checked here and refused with a `RequestError` naming the
problem (its ``status`` is the HTTP code the app answers with): uploads are decoded in
memory with byte and pixel limits, ids are looked up in the index's own tables, and no
request value is ever joined to a filesystem path. `retrieval.api` puts this behind HTTP.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.data.dataset import BBox, RetrievalDataset
from retrieval.data.folder import read_image_csv
from retrieval.data.images import ImageLoadError, InputSize, crop_box, load_image, to_uint8_tensor
from retrieval.extract import describe_grouped
from retrieval.features import read_features
from retrieval.index import SavedIndex, check_ids, load_index, search_overrides
from retrieval.models.fold import fold_batchnorm
from retrieval.models.net import RetrievalNet
from retrieval.rerank import RerankContext, needs_images, needs_labels, parse_method, rerank_search

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class RequestError(ValueError):
    """A request the service refuses: ``str(err)`` names the problem, ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask: upload bytes and pixels (decompression bombs), k, images per batch."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_k: int = 100
    max_batch: int = 16
    thumb_sizes: tuple[int, int] = (32, 512)


def _show(value: Any, n: int = 80) -> str:
    """A request value quoted for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def decode_image(data: bytes, limits: Limits = Limits(), name: str = "image") -> Image.Image:
    """An uploaded file's bytes as a decoded RGB image, or a `RequestError` (400 / 413) naming ``name``."""
    if len(data) == 0:
        raise RequestError(f"{name}: empty upload (0 bytes)")
    if len(data) > limits.max_bytes:
        raise RequestError(f"{name}: {len(data)} bytes, over the limit of {limits.max_bytes}", 413)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(f"{name}: not an image (no known image format)") from None
    except Image.DecompressionBombError as err:
        raise RequestError(f"{name}: {err}".splitlines()[0], 413) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"{name}: unreadable image ({err})".splitlines()[0]) from None
    w, h = img.size
    if w * h > limits.max_pixels:  # checked on the header, before anything is decoded
        raise RequestError(f"{name}: {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}", 413)
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(f"{name}: truncated or corrupt image ({err})".splitlines()[0]) from None


def parse_bbx(value: Any, size: tuple[int, int] | None = None) -> BBox | None:
    """``"x1,y1,x2,y2"`` (or a 4-list) in pixels → a box; empty → None; anything else a `RequestError`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        box = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise RequestError(f"bbx: expected four numbers x1,y1,x2,y2, got {_show(value)}")
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1 or x1 < 0 or y1 < 0:
        raise RequestError(f"bbx: need 0 <= x1 < x2 and 0 <= y1 < y2, got {_show(value)}")
    if size is not None and (x1 >= size[0] or y1 >= size[1]):
        raise RequestError(f"bbx: {_show(value)} lies outside the {size[0]}x{size[1]} image")
    return box


def parse_k(value: Any, limits: Limits = Limits()) -> int:
    """``k`` as an int in ``1..max_k`` (default 10), or a `RequestError`."""
    if value is None or value == "":
        return 10
    try:
        k = int(value)
        if isinstance(value, float) and k != value:
            raise ValueError
    except (TypeError, ValueError):
        raise RequestError(f"k: expected an integer, got {_show(value)}") from None
    if not 1 <= k <= limits.max_k:
        raise RequestError(f"k: {k} out of range 1..{limits.max_k}")
    return k


# ---------------------------------------------------------------- the indexed images' files and labels

@dataclass
class ImageTable:
    """Where each indexed id's image file is and which landmark it shows (both optional per id)."""

    paths: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def image_table(source: str | os.PathLike) -> ImageTable:
    """An `ImageTable` from an image CSV (``id,path[,landmark_id]``, the folder loader's) or a folder.

    In a folder, an image's id is its relative path without the suffix (``a/b/c123``); its file
    stem (``c123``) also finds it when no other file shares that stem.
    """
    source = Path(source)
    if source.is_file():
        rows = read_image_csv(source)
        return ImageTable({r["id"]: r["path"] for r in rows},
                          {r["id"]: r["landmark_id"] for r in rows if r["landmark_id"] is not None})
    if not source.is_dir():
        raise FileNotFoundError(f"--images: no such file or folder: {source}")
    paths: dict[str, Path] = {}
    stems: dict[str, Path | None] = {}
    for folder, _, names in os.walk(source):
        for name in names:
            path = Path(folder) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths[path.relative_to(source).with_suffix("").as_posix()] = path
                stems[path.stem] = None if path.stem in stems else path
    for stem, path in stems.items():
        if path is not None:
            paths.setdefault(stem, path)
    return ImageTable(paths)


def dataset_table(ds: RetrievalDataset) -> ImageTable:
    """The `ImageTable` of a benchmark's queries and database."""
    paths = dict(zip(ds.queries.ids, ds.queries.paths, strict=True))
    paths.update(zip(ds.db.ids, ds.db.paths, strict=True))
    return ImageTable(paths, dict(ds.labels))


class _ThumbCache:
    """JPEG thumbnails by (id, size), least recently used dropped first."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int], make: Any) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = make()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data


# ---------------------------------------------------------------- the service

class SearchService:
    """A net, an index over a features file and the re-rankers offered, shared by all requests.

    Thread-safe: the net runs under a lock (one forward at a time, requests serialised on it);
    the index and the re-rankers' database state (αDBA vectors, kNN graph, diffusion's offline
    stage; their sizes do not depend on ``k``) are built in ``__init__`` and only read afterwards.
    """

    def __init__(self, net: RetrievalNet, ids: Sequence[str], feats: np.ndarray, attrs: Mapping[str, Any], *,
                 table: ImageTable | None = None, methods: Sequence[str] = ("none",),
                 params: Mapping[str, Any] | None = None, limits: Limits = Limits(),
                 device: str | torch.device = "cpu", features_path: Path | None = None,
                 index: SavedIndex | None = None) -> None:
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.ndim != 2 or len(feats) != len(ids) or len(feats) == 0:
            raise ValueError(f"{features_path or 'features'}: need a non-empty (N, D) matrix with N ids, "
                             f"got {feats.shape} for {len(ids)} ids")
        if net.meta["dim"] != feats.shape[1]:
            raise ValueError(f"{features_path or 'features'}: {feats.shape[1]}-d features but the net gives "
                             f"{net.meta['dim']}-d descriptors ({net.meta['architecture']}); pass the checkpoint "
                             "the features were extracted with (-m)")
        self.device = torch.device(device)
        self.net = fold_batchnorm(net.to(self.device).eval())  # folded once: every query's forward is cheaper
        self.ids = list(ids)
        self.rows = {image_id: i for i, image_id in enumerate(self.ids)}
        self.feats = feats
        self.attrs = dict(attrs)
        self.size = InputSize.from_attrs(self.attrs)  # the database's sizing: exact or its aspect buckets
        self.scales = tuple(float(s) for s in (self.attrs.get("scales") or (1.0,)))
        self.table = table or ImageTable()
        self.params = dict(params or {})
        self.limits = limits
        self.features_path = features_path
        self.methods = list(dict.fromkeys(["none", *methods]))
        for method in self.methods:
            parse_method(method)
            if needs_labels(method) or needs_images(method):
                raise ValueError(f"--rerank {method}: the service offers adba, qe, aqe, diffusion and kreciprocal "
                                 "(l2019 and sv need a label set or local features of each query)")
        if index is not None:
            check_ids(index, self.ids, features_path or "the features")
            if index.params.get("whiten"):
                raise ValueError(f"{index.folder}: built on rows whitened by {index.params['whiten']!r}; the service "
                                 "searches the features as stored (build the index without --whiten)")
        self.index = index  # plain kNN requests search it; re-ranking chains search the vectors exactly
        self._net_lock = threading.Lock()
        self._thumbs = _ThumbCache()
        self._cache: dict = {}
        self._context = RerankContext(params=self.params)
        start = time.perf_counter()
        for method in self.methods:  # build every chain's database state now: requests only read it
            if method != "none" or index is None:
                self._rank(method, self.feats[:1], 1)
        logger.info("search service: %d images, %d-d, re-rankers %s, ready in %.1f s", len(self.ids),
                    feats.shape[1], ", ".join(self.methods), time.perf_counter() - start)

    # -- queries ----------------------------------------------------------------------------
    def embed(self, images: Sequence[tuple[Image.Image, BBox | None]], timing: dict | None = None) -> np.ndarray:
        """Descriptors ``(n, D)`` of decoded images, each cropped to its box first (revisitop's habit).

        ``timing``, when given, gets ``queue``: ms spent waiting for the net (other requests' turn).
        """
        tensors = []
        for i, (img, bbx) in enumerate(images):
            if bbx is not None:
                try:
                    img = crop_box(img, bbx)
                except ImageLoadError as err:
                    raise RequestError(f"bbx: {err}") from None
            tensors.append((i, to_uint8_tensor(self.size.apply(img))))
        asked = time.perf_counter()
        with self._net_lock:
            if timing is not None:
                timing["queue"] = 1000 * (time.perf_counter() - asked)
            return describe_grouped(self.net, tensors, self.scales, self.device)

    def vector_of(self, image_id: Any) -> np.ndarray:
        """The indexed descriptor of ``image_id`` (1, D), or a 404 `RequestError`."""
        if not isinstance(image_id, str) or image_id not in self.rows:
            raise RequestError(f"id {_show(image_id)} is not in the index ({len(self.ids)} images)", 404)
        return self.feats[self.rows[image_id]][None]

    def check_method(self, method: Any) -> str:
        method = "none" if method in (None, "") else method
        if method not in self.methods:
            raise RequestError(f"rerank {_show(method)} is not offered; this server offers "
                               f"{', '.join(self.methods)} (serve --rerank)")
        return method

    def _rank(self, method: str, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        return rerank_search(method, vectors, self.feats, k, qe_n=int(p.get("qe_n", 2)),
                             dba_n=int(p.get("dba_n", 2)), alpha=float(p.get("alpha", 3.0)), context=self._context,
                             cache=self._cache)

    def search(self, vectors: np.ndarray, k: int = 10, method: str = "none"
               ) -> tuple[list[list[dict[str, Any]]], dict[str, float]]:
        """Top-``k`` results of each descriptor and the time of the kNN search and of the re-ranking (ms).

        ``search`` times the plain kNN; ``rerank`` the chain, whose own search is included.
        """
        method = self.check_method(method)
        start = time.perf_counter()
        scores, idx = self.index.search(vectors, k) if self.index is not None else self._rank("none", vectors, k)
        searched = time.perf_counter()
        if method != "none":
            scores, idx = self._rank(method, vectors, k)
        done = time.perf_counter()
        results = [self._results(s, i) for s, i in zip(scores, idx, strict=True)]
        return results, {"search": 1000 * (searched - start), "rerank": 1000 * (done - searched)}

    def _results(self, scores: np.ndarray, idx: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for score, j in zip(scores.tolist(), idx.tolist(), strict=True):
            if j < 0:
                continue
            image_id = self.ids[j]
            item: dict[str, Any] = {"id": image_id, "score": round(float(score), 6)}
            if image_id in self.table.labels:
                item["landmark_id"] = self.table.labels[image_id]
            out.append(item)
        return out

    def search_images(self, images: Sequence[tuple[Image.Image, BBox | None]], k: int = 10,
                      method: str = "none") -> tuple[list[list[dict[str, Any]]], dict[str, float]]:
        """Embed then search decoded images: ``(results per image, timing_ms)``; ``embed`` excludes the
        ``queue`` wait for the net."""
        method = self.check_method(method)
        start = time.perf_counter()
        waited: dict[str, float] = {}
        vectors = self.embed(images, waited)
        embedded = time.perf_counter()
        results, timing = self.search(vectors, k, method)
        return results, {"embed": 1000 * (embedded - start) - waited["queue"], **timing, "queue": waited["queue"]}

    def search_ids(self, image_ids: Sequence[Any], k: int = 10, method: str = "none"
                   ) -> tuple[list[list[dict[str, Any]]], dict[str, float]]:
        vectors = np.concatenate([self.vector_of(i) for i in image_ids])
        results, timing = self.search(vectors, k, method)
        return results, {"embed": 0.0, **timing, "queue": 0.0}

    # -- thumbnails and description ---------------------------------------------------------
    def thumbnail(self, image_id: str, size: int = 160) -> bytes:
        """A JPEG thumbnail of an indexed (or listed) image, looked up by id in the table only."""
        lo, hi = self.limits.thumb_sizes
        if not lo <= size <= hi:
            raise RequestError(f"size: {size} out of range {lo}..{hi}")
        path = self.table.paths.get(image_id)
        if path is None:
            known = image_id in self.rows
            raise RequestError(f"id {_show(image_id)}: " + ("no image file is known for it (serve --images)"
                                                            if known else "not an indexed image"), 404)

        def make() -> bytes:
            try:
                img = ImageOps.contain(load_image(path), (size, size))
            except ImageLoadError as err:
                raise RequestError(f"id {_show(image_id)}: image unreadable ({err})", 404) from None
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            return buf.getvalue()

        return self._thumbs.get((image_id, size), make)

    def info(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.net.meta.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        return {
            "model": meta,
            "features": str(self.features_path) if self.features_path else None,
            "index": {"type": self.index.describe() if self.index is not None else "Flat (exact inner product, FAISS)",
                      "size": len(self.ids), "dim": int(self.feats.shape[1])},
            "embedding": {"image_size": self.size.image_size, "scales": list(self.scales), "resize": self.size.resize,
                          "scale": self.size.scale},
            "rerank": self.methods,
            "images": {"with_file": sum(i in self.table.paths for i in self.ids),
                       "with_landmark_id": sum(i in self.table.labels for i in self.ids)},
            "limits": asdict(self.limits),
            "device": str(self.device),
        }


def load_service(net: RetrievalNet, features: str | os.PathLike, *, table: ImageTable | None = None,
                 methods: Sequence[str] = ("none",), params: Mapping[str, Any] | None = None,
                 limits: Limits = Limits(), device: str | torch.device = "cpu",
                 index: str | os.PathLike | None = None) -> SearchService:
    """A `SearchService` over a features file (see `retrieval.features`) with ``net``; ``index``: a saved
    index folder of that file (`retrieval.index.save_index`) for plain kNN requests."""
    features = Path(features)
    ids, feats, attrs = read_features(features)
    extracted_with = attrs.get("checkpoint") or ""
    if extracted_with and net.meta.get("checkpoint") and Path(extracted_with) != Path(net.meta["checkpoint"]):
        logger.warning("%s was extracted with %s; serving with %s", features, extracted_with,
                       net.meta["checkpoint"])
    saved = None
    if index is not None:
        saved = load_index(index, **search_overrides(dict(params or {})))
    return SearchService(net, ids, feats, attrs, table=table, methods=methods, params=params, limits=limits,
                         device=device, features_path=features, index=saved)
