"""Multi-scale, batched, resumable extraction of global descriptors into a features HDF5.

Multi-scale descriptors follow cirtorch: the image is resized by each scale, descriptors
are combined as ``(mean_s f_s^p)^(1/p)`` with p the GeM power (p = 1 for other poolings or
when the net whitens), then L2-normalised.

Batching: DataLoader workers decode and size the images (`retrieval.data.images.InputSize`)
while the net runs; the main process queues them by shape and sends a queue through the net
as soon as it holds ``batch_size`` images. Inputs are committed to the features file a
*window* at a time (a few batches' worth, in input order), so a killed run resumes at the
last committed window and memory does not grow with the number of images. With aspect
buckets (``scale="aspect"`` or ``L2``) a window has only a handful of shapes, so nearly every
batch is full; with ``scale="exact"`` only images that share a shape share a batch.

Images that cannot be read are skipped, kept in the features file (``skipped_index``) and
listed in ``skipped.csv`` beside it; the run goes on. See `retrieval.features` for how a
killed run resumes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval.data.dataset import ImageList
from retrieval.data.images import ImageListDataset, InputSize, collate_items, normalize
from retrieval.features import FeatureWriter, check_schema, merge_features, read_skipped
from retrieval.models.fold import fold_batchnorm
from retrieval.models.net import RetrievalNet
from retrieval.models.pooling import l2n
from retrieval.processes import die_with_parent

logger = logging.getLogger(__name__)

MULTI_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
SKIPPED_CSV = "skipped.csv"
LOG_FILE = "extract.log"

# Loader workers are forked where fork exists: in a process that was itself started by spawn
# (multigpu-predict's workers) they would be spawned too, each importing everything again (44 s
# instead of 1 s to start two workers on 2 busy cores). They only decode images; CUDA stays out.
LOADER_CONTEXT = "fork" if sys.platform.startswith("linux") else None

# What resize="auto" / scale="auto" mean for a dataset: the published protocols of ROxf/RPar are
# cirtorch's sizes image by image; GLDv2's million photos go through the net in aspect buckets.
AUTO_SIZING = {"roxford5k": ("cirtorch", "exact"), "rparis6k": ("cirtorch", "exact"), "gldv2": ("long", "aspect")}
DEFAULT_SIZING = ("long", "exact")


def sizing_params(params: dict[str, Any], dataset: str, scale: str | None = None) -> dict[str, Any]:
    """``image_size``, ``resize`` and ``scale`` to extract ``dataset`` (a dataset or train-set spec) with.

    ``resize`` / ``scale`` come from ``params`` (``scale`` from the argument when given); ``auto``
    (their default) picks `AUTO_SIZING`'s policy of the dataset (``gldv2*`` share GLDv2's), else
    `DEFAULT_SIZING`.
    """
    auto = AUTO_SIZING.get("gldv2" if dataset.startswith("gldv2") else dataset, DEFAULT_SIZING)
    resize = params.get("resize") or "auto"
    scale = scale or params.get("scale") or "auto"
    return {"image_size": int(params.get("image_size", 512)), "resize": auto[0] if resize == "auto" else resize,
            "scale": auto[1] if scale == "auto" else scale}


def multiscale_power(net: RetrievalNet, scales: Sequence[float]) -> float:
    """The power used to average descriptors over scales: GeM's p when the descriptor is GeM's output,
    1 (a plain mean, as Landmark2019 did) when a neck or whitening follows the pooling."""
    p = net.gem_p
    plain_gem = net.whiten is None and net.neck is None
    return p if (len(scales) > 1 and p is not None and plain_gem) else 1.0


def weights_digest(net: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the net: features are reused only for the very same weights."""
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def describe(net: RetrievalNet, x: torch.Tensor, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Descriptors ``(B, D)`` of a batch of equally-sized images ``(B, 3, H, W)``."""
    if len(scales) == 1 and scales[0] == 1.0:
        return net(x)
    power = multiscale_power(net, scales)
    acc = torch.zeros(x.shape[0], net.meta["dim"], device=x.device)
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        acc += net(xs).float().pow(power)
    return l2n((acc / len(scales)).pow(1.0 / power))


def job_signature(images: ImageList, settings: dict) -> str:
    """Hash of the input list and the settings: a partial file is resumed only by the same job."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for i, image_id in enumerate(images.ids):
        h.update(f"{image_id}\t{images.bbx(i)}\n".encode())
    return h.hexdigest()


def features_signature(net: RetrievalNet, images: ImageList, size: InputSize, scales: tuple[float, ...],
                       dtype: str) -> str:
    """The job signature of extracting ``images`` with ``net`` (its meta and weights) and these settings."""
    settings = {"meta": net.meta, "weights": weights_digest(net), "image_size": size.image_size, "scales": scales,
                "resize": size.resize, "dtype": dtype}
    if size.buckets is not None:  # exact sizing keeps the signature files had before buckets existed
        settings["buckets"] = size.buckets
    return job_signature(images, settings)


def _complete_with_signature(path: Path, signature: str) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            check_schema(f, path)
            return bool(f.attrs.get("complete", False)) and f.attrs.get("signature") == signature
    except (OSError, ValueError):
        return False


def write_skipped_csv(out_path: Path, images: ImageList, skipped: Sequence[tuple[int, str]]) -> Path:
    """Rewrite this output's rows of ``skipped.csv`` (one file per folder, a ``features_file`` column)."""
    csv_path = out_path.parent / SKIPPED_CSV
    fields = ["features_file", "index", "id", "path", "reason"]
    with FileLock(str(csv_path) + ".lock"):
        rows = []
        if csv_path.is_file():
            with csv_path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("features_file") != out_path.name]
        rows += [{"features_file": out_path.name, "index": i, "id": images.ids[i], "path": str(images.paths[i]),
                  "reason": reason} for i, reason in skipped]
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, csv_path)
    return csv_path


@contextmanager
def _log_to(path: Path):
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("retrieval")
    root.addHandler(handler)
    old_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


@dataclass
class ExtractStats:
    """What a run sent through the net: images described and forward batches (of up to ``batch_size``)."""

    batch_size: int = 0
    images: int = 0
    batches: int = 0

    @property
    def occupancy(self) -> float:
        """Mean fraction of ``batch_size`` a forward batch held (1.0: every batch full)."""
        return self.images / (self.batches * self.batch_size) if self.batches else 0.0


def default_window(batch_size: int, size: InputSize) -> int:
    """Inputs per commit: four batches per shape the sizing can produce (one shape per bucket)."""
    return 4 * int(batch_size) * (len(size.buckets) if size.buckets else 1)


def extract_features(net: RetrievalNet, images: ImageList, out_path: str | os.PathLike, *,
                     image_size: int = 512, scales: Sequence[float] = (1.0,), resize: str = "long",
                     scale: str | Sequence[Sequence[int]] = "exact", batch_size: int = 32, num_workers: int = 0,
                     window: int | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
                     progress: bool = True, stats: ExtractStats | None = None) -> Path:
    """Describe every image of ``images`` and write the features HDF5 at ``out_path``.

    ``image_size`` / ``resize`` / ``scale`` size the images (`InputSize`: ``scale="exact"`` resizes each
    image by ``resize``; ``"aspect"``, ``"L2"``, ... use aspect buckets); ``window`` inputs are
    committed at a time (default `default_window`). Returns ``out_path``. If it already holds
    this exact job, nothing is recomputed; a ``.tmp`` left by a killed run of the same job is
    resumed. ``stats``, when given, counts the images and batches of this run.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scales = tuple(float(s) for s in scales)
    size = InputSize.create(image_size, resize, scale)
    signature = features_signature(net, images, size, scales, dtype)
    if _complete_with_signature(out_path, signature):
        logger.info("%s: already complete, nothing to do", out_path)
        return out_path
    device = torch.device(device)
    net = net.to(device).eval()
    stats = stats if stats is not None else ExtractStats()
    with _log_to(out_path.parent / LOG_FILE):
        writer = FeatureWriter(out_path, len(images), net.meta["dim"], signature, dtype=dtype, attrs={
            "checkpoint": net.meta.get("checkpoint") or "", "pretrained": net.meta.get("pretrained") or "",
            "architecture": net.meta["architecture"], "pooling": net.meta["pooling"],
            "scales": list(scales), **size.attrs(), "meta": net.meta,
        })
        try:
            start = writer.cursor
            logger.info("extracting %d images into %s (scales %s, size %d, resize %s, scale %s, batch %d, "
                        "%d loader workers, device %s), starting at %d", len(images), out_path, scales,
                        size.image_size, size.resize, size.scale, batch_size, num_workers, device, start)
            bar = tqdm(total=len(images), initial=start, desc=out_path.name, unit="img", disable=not progress,
                       dynamic_ncols=True)
            for end, rows, feats, skipped in iter_descriptors(net, images, image_size=image_size, scales=scales,
                                                              resize=resize, scale=scale, batch_size=batch_size,
                                                              num_workers=num_workers, window=window,
                                                              device=device, start=start, stats=stats):
                for i, err in skipped:
                    logger.warning("skipped %s (%s): %s", images.ids[i], images.paths[i], err)
                writer.append(end, [images.ids[i] for i in rows], feats, skipped)
                bar.update(end - bar.n)
            bar.close()
            skipped = writer.skipped()
            done = writer.finish()
        finally:
            writer.close()
        write_skipped_csv(out_path, images, skipped)
        logger.info("%s: %d features written, %d images skipped%s; %d batches, mean occupancy %.2f of %d",
                    out_path, len(images) - len(skipped), len(skipped),
                    f" (listed in {out_path.parent / SKIPPED_CSV})" if skipped else "", stats.batches,
                    stats.occupancy, batch_size)
    return done


def iter_descriptors(net: RetrievalNet, images: ImageList, *, image_size: int, scales: Sequence[float] = (1.0,),
                     resize: str = "long", scale: str | Sequence[Sequence[int]] = "exact", batch_size: int = 32,
                     num_workers: int = 0, window: int | None = None, device: str | torch.device = "cpu",
                     start: int = 0, stats: ExtractStats | None = None
                     ) -> Iterator[tuple[int, list[int], np.ndarray, list[tuple[int, str]]]]:
    """Describe ``images[start:]`` a window of inputs at a time: yields ``(end, rows, feats, skipped)``.

    ``end`` is one past the last input of the window, ``rows`` the inputs described (``feats``
    row by row, in input order) and ``skipped`` ``(input, reason)`` for those that could not be
    read. ``net`` must already be on ``device`` in eval mode; it runs with its BatchNorms folded
    (`fold_batchnorm`: the same descriptors, a forward pass up to twice as fast on a CPU).
    """
    device = torch.device(device)
    net = fold_batchnorm(net)
    size = InputSize.create(image_size, resize, scale)
    window = int(window or default_window(batch_size, size))
    if window < 1 or int(batch_size) < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size} and {window}")
    dataset = ImageListDataset(images, size, start=start)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=collate_items, pin_memory=device.type == "cuda",
                        multiprocessing_context=LOADER_CONTEXT if num_workers > 0 else None)
    batcher = ShapeBatcher(net, tuple(scales), int(batch_size), device, stats, autotune=size.buckets is not None)
    end = min(len(images), start + window)
    skipped: list[tuple[int, str]] = []
    for chunk in loader:
        for i, x, err in chunk:
            if x is None:
                skipped.append((i, err))
            else:
                batcher.add(i, x)
            if i + 1 == end:
                rows, feats = batcher.flush()
                yield end, rows, feats, skipped
                skipped = []
                end = min(len(images), end + window)


# On a CPU a forward pass over more pixels than this runs slower per image, not faster: the activations
# leave the caches (EfficientNet-Lite0 at 368x480 on an EPYC core: batch 16 took 2.3x the time per image
# of batch 1; at 64x64, batches of 32 pay). CUDA takes whole batches.
CPU_FORWARD_PIXELS = 2**17


@contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """cuDNN's algorithm search (``benchmark``) on inside the block when ``enabled``; other cuDNN flags kept."""
    if not enabled:
        yield
        return
    cudnn, before = torch.backends.cudnn, torch.backends.cudnn.benchmark
    cudnn.benchmark = True
    try:
        yield
    finally:
        cudnn.benchmark = before


class ShapeBatcher:
    """Images queued by shape; a queue goes through the net when it holds ``batch_size`` images or on `flush`.

    Images arrive as uint8 CHW tensors and are normalised on ``device`` (by the net's mean/std). On a
    CPU a batch runs as forwards of at most `CPU_FORWARD_PIXELS` (at least one image), channels-last
    (oneDNN's fast layout). A partial forward is padded (with copies of its last image, whose
    outputs are dropped) to a power of two: oneDNN and cuDNN keep a plan per input shape, and
    forwards of every size would make their caches, and the process, grow with the number of images.
    ``autotune`` (for aspect buckets: a handful of input shapes) lets cuDNN time its algorithms once per
    shape and keep the fastest; with exact sizes every new shape would pay that search, so it is off.
    """

    def __init__(self, net: RetrievalNet, scales: tuple[float, ...], batch_size: int, device: torch.device,
                 stats: ExtractStats | None = None, autotune: bool = False) -> None:
        self.net, self.scales, self.batch_size, self.device = net, scales, batch_size, device
        self.autotune = autotune and device.type == "cuda"
        self.stats = stats if stats is not None else ExtractStats()
        self.stats.batch_size = batch_size
        self.queues: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        self.rows: list[int] = []
        self.feats: list[np.ndarray] = []

    def add(self, i: int, x: torch.Tensor) -> None:
        queue = self.queues.setdefault(tuple(x.shape), [])
        queue.append((i, x))
        if len(queue) == self.batch_size:
            self._run(self.queues.pop(tuple(x.shape)))

    def flush(self) -> tuple[list[int], np.ndarray]:
        """Describe what is queued; returns every row described since the last flush, in input order."""
        for queue in self.queues.values():
            self._run(queue)
        self.queues = {}
        rows = np.asarray(self.rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        feats = np.concatenate(self.feats)[order] if self.feats else np.zeros((0, self.net.meta["dim"]), np.float32)
        self.rows, self.feats = [], []
        return rows[order].tolist(), feats

    def _run(self, items: list[tuple[int, torch.Tensor]]) -> None:
        cpu = self.device.type == "cpu"
        height, width = items[0][1].shape[1:]
        step = max(1, min(self.batch_size, CPU_FORWARD_PIXELS // (height * width))) if cpu else self.batch_size
        for a in range(0, len(items), step):
            tensors = [t for _, t in items[a:a + step]]
            n = len(tensors)
            tensors += [tensors[-1]] * (min(step, 1 << (n - 1).bit_length()) - n)
            # on CUDA the pinned per-image copies overlap, then stack on the device
            x = torch.stack(tensors if cpu else [t.to(self.device, non_blocking=True) for t in tensors])
            x = normalize(x, self.net.meta["mean"], self.net.meta["std"])
            if cpu:
                x = x.contiguous(memory_format=torch.channels_last)
            with cudnn_autotune(self.autotune):
                self.feats.append(describe(self.net, x, self.scales)[:n].float().cpu().numpy())
        self.rows += [i for i, _ in items]
        self.stats.images += len(items)
        self.stats.batches += 1


def describe_images(net: RetrievalNet, images: ImageList, *, image_size: int, scales: Sequence[float] = (1.0,),
                    resize: str = "long", scale: str | Sequence[Sequence[int]] = "exact", batch_size: int = 32,
                    num_workers: int = 0, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """In-memory descriptors (used by validation): ``(rows, feats)``, rows = inputs that could be read."""
    was_training = net.training
    net.eval()
    rows: list[int] = []
    parts = []
    try:
        for _, batch_rows, feats, _ in iter_descriptors(net, images, image_size=image_size, scales=scales,
                                                        resize=resize, scale=scale, batch_size=batch_size,
                                                        num_workers=num_workers, device=device):
            rows += batch_rows
            parts.append(feats)
    finally:
        net.train(was_training)
    dim = net.meta["dim"]
    return np.asarray(rows, dtype=np.int64), (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32))


def describe_grouped(net: RetrievalNet, items: list[tuple[int, torch.Tensor]], scales: tuple[float, ...],
                     device: torch.device) -> np.ndarray:
    """Descriptors of ``items`` = ``(key, uint8 CHW tensor)`` of any sizes: one forward per shape, rows in order."""
    batcher = ShapeBatcher(net, scales, max(1, len(items)), device)
    for row, (_, x) in enumerate(items):
        batcher.add(row, x)
    return batcher.flush()[1]


def shard_path(out_path: Path, rank: int, world: int) -> Path:
    return out_path.with_name(f"{out_path.stem}.shard{rank}of{world}{out_path.suffix}")


def _shard_bounds(n: int, world: int) -> list[int]:
    return [round(n * r / world) for r in range(world + 1)]


def _slice(images: ImageList, a: int, b: int) -> ImageList:
    return ImageList(images.ids[a:b], images.paths[a:b], None if images.bbxs is None else images.bbxs[a:b])


def _extract_blocks(rank: int, make_net: Callable[[], RetrievalNet], images: ImageList, devices: list[str],
                    blocks: list[int], n_blocks: int, out_path: Path, kwargs: dict) -> None:
    """Worker ``rank``: describe its share of ``blocks`` on ``devices[rank]``, each into its shard file."""
    if not devices[rank].startswith("cuda"):  # share the cores between CPU workers
        torch.set_num_threads(max(1, torch.get_num_threads() // len(devices)))
    progress = kwargs.pop("progress", True) and rank == 0
    bounds = _shard_bounds(len(images), n_blocks)
    net = make_net()
    for b in blocks[rank::len(devices)]:
        extract_features(net, _slice(images, bounds[b], bounds[b + 1]), shard_path(out_path, b, n_blocks),
                         device=devices[rank], progress=progress, **kwargs)


def _spawned_blocks(rank: int, *args: Any) -> None:
    die_with_parent()
    _extract_blocks(rank, *args)


def extract_on_devices(make_net: Callable[[], RetrievalNet], images: ImageList, out_path: str | os.PathLike,
                       devices: Sequence[str | torch.device], *, n_blocks: int | None = None,
                       block_id: int | None = None, **kwargs) -> Path:
    """`extract_features` spread over devices and blocks (Landmark2019's ``multigpu-predict`` / ``-n -i``).

    The input list is cut into ``n_blocks`` contiguous blocks (default: one per device); each
    is described into its own shard file ``<name>.shard<b>of<n>.h5`` (resumable on its own) by
    one process per device. With ``block_id`` only that block is done and its shard returned
    (one array task of a cluster job); otherwise the shards are merged into ``out_path`` in
    input order and removed. ``make_net`` must be picklable (e.g. a ``functools.partial`` of
    `load_checkpoint`). ``kwargs`` go to `extract_features`.
    """
    out_path = Path(out_path)
    devs = [str(d) for d in devices]
    n_blocks = int(n_blocks or len(devs))
    if block_id is not None and not 0 <= block_id < n_blocks:
        raise ValueError(f"--block-id must be in [0, {n_blocks}), got {block_id}")
    if n_blocks == 1 and len(devs) == 1:
        return extract_features(make_net(), images, out_path, device=devs[0], **kwargs)
    net = make_net()
    size = InputSize.create(kwargs.get("image_size", 512), kwargs.get("resize", "long"), kwargs.get("scale", "exact"))
    signature = features_signature(net, images, size, tuple(float(s) for s in kwargs.get("scales", (1.0,))),
                                   kwargs.get("dtype", "float32"))
    if _complete_with_signature(out_path, signature):
        logger.info("%s: already complete, nothing to do", out_path)
        return out_path
    blocks = [block_id] if block_id is not None else list(range(n_blocks))
    workers = devs[: len(blocks)]
    if len(workers) == 1:
        _extract_blocks(0, lambda: net, images, workers, blocks, n_blocks, out_path, dict(kwargs))
    else:
        torch.multiprocessing.start_processes(
            _spawned_blocks, args=(make_net, images, workers, blocks, n_blocks, out_path, dict(kwargs)),
            nprocs=len(workers), join=True, start_method="spawn")
    if block_id is not None:
        return shard_path(out_path, block_id, n_blocks)
    shards = [shard_path(out_path, b, n_blocks) for b in range(n_blocks)]
    bounds = _shard_bounds(len(images), n_blocks)
    done = merge_features(shards, out_path, bounds[:-1], signature=signature, n_inputs=len(images))
    write_skipped_csv(out_path, images, read_skipped(done))
    for b, shard in enumerate(shards):  # their rows of skipped.csv now belong to the merged file
        write_skipped_csv(shard, _slice(images, bounds[b], bounds[b + 1]), [])
        shard.unlink()
    logger.info("%s: merged %d blocks", out_path, n_blocks)
    return done
