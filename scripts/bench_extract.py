"""Extraction speed and memory: aspect-bucketed batches vs today's shape-grouped batches vs cirtorch's batch-1 loop.

Part ``throughput`` describes images of mixed sizes with one net, single- and multi-scale:
the real photos of ``--photos`` (``../shared/data/landmarks``: 33 photos, skipped when absent) and
the built-in benchmark's database (``--synthetic``), each repeated ``--repeat`` times, by

- ``batch1``: cirtorch's extractor, run here as the baseline: PIL ``thumbnail`` (``imresize``), a
  DataLoader of batch size 1 with ``--baseline-workers`` workers, one forward per image of the net as given;
- ``batch1-folded``: the same loop on the net with its BatchNorms folded (`fold_batchnorm`, as our
  extraction runs it), to tell the gain of folding from that of batching;
- ``shape-grouped``: today's batching: each image at its own size (resize ``long``), a batch only
  for the equal shapes among ``batch_size`` consecutive inputs (``scale="exact"``, window = batch);
- ``exact-windowed``: each image at its own size (cirtorch's), equal shapes grouped over a window;
- ``aspect``: aspect buckets (``scale="aspect"``): images resized to the nearest of five templates.

Variants take turns, ``--rounds`` times, so a busy machine slows them alike; a line per variant gives
the median images/s, CPU cores used and the mean batch occupancy, the summary the ratios.
Part ``processes``: 1 vs 2 processes (`extract_on_devices`, aspect buckets), same images.
Part ``map``: mAP (medium) on the photos of ``--photos``: aspect buckets vs today's exact sizes.
Part ``rss``: peak RSS of extracting ``--rss-sizes`` generated JPEGs (96-200 px, mixed shapes) at
``--rss-image-size`` with a small net (``--rss-architecture``), each in a fresh process, and the
growth per million images.

Prints JSON lines. Usage: python scripts/bench_extract.py [--parts throughput,processes,map,rss] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from retrieval.data import ImageList, load_dataset, load_folder  # noqa: E402
from retrieval.data.images import load_image, resize_to, to_tensor  # noqa: E402
from retrieval.evaluate import validation_map  # noqa: E402
from retrieval.extract import (  # noqa: E402
    MULTI_SCALES,
    ExtractStats,
    describe,
    describe_images,
    extract_features,
    extract_on_devices,
)
from retrieval.models import create_model  # noqa: E402
from retrieval.models.fold import fold_batchnorm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("batch1", "batch1-folded")  # cirtorch's loop on the net as given, and on the folded net
SIZINGS = {  # our variants: extract_features' sizing and window
    "shape-grouped": {"resize": "long", "scale": "exact", "window": "batch"},
    "exact-windowed": {"resize": "cirtorch", "scale": "exact"},
    "aspect": {"resize": "long", "scale": "aspect"},
}


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def proc_status_mb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (peak since the last `reset_peak_rss`) of this process, in MB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) so the peak of one stage can be read alone (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers once they are joined)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CirtorchImages(Dataset):
    """cirtorch's ``ImagesFromList``: load, ``imresize`` (thumbnail), to a normalised tensor."""

    def __init__(self, images: ImageList, image_size: int, mean, std) -> None:
        self.images, self.image_size, self.mean, self.std = images, image_size, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = resize_to(load_image(self.images.paths[i], self.images.bbx(i)), self.image_size, "cirtorch")
        return to_tensor(img, self.mean, self.std)


def batch1_loop(net, images: ImageList, image_size: int, scales, args, device: torch.device,
                fold: bool = False) -> np.ndarray:
    """cirtorch's ``extract_vectors``: one image per forward, decoding in ``--baseline-workers`` workers."""
    net = fold_batchnorm(net) if fold else net
    loader = DataLoader(CirtorchImages(images, image_size, net.meta["mean"], net.meta["std"]), batch_size=1,
                        num_workers=args.baseline_workers, shuffle=False, pin_memory=device.type == "cuda")
    vecs = np.zeros((len(images), net.meta["dim"]), np.float32)
    for i, x in enumerate(loader):
        vecs[i] = describe(net, x.to(device), scales)[0].float().cpu().numpy()
    return vecs


def image_sets(args, tmp: Path) -> dict[str, tuple[ImageList, int]]:
    """``name -> (images, image_size)``: the mixed-size sets, each repeated ``--repeat`` times (ids made unique).

    The built-in benchmark's images (long side 320) are described at ``--synthetic-image-size`` (320), so
    that no variant enlarges them (cirtorch's thumbnail never does; ``long`` and buckets would).
    """
    sets = {}
    photos = sorted(Path(args.photos).glob("images/*/*.jpg")) if args.photos else []
    if photos:
        sets["landmarks"] = (photos, args.image_size)
    if args.synthetic:
        ds = load_dataset("synthetic", tmp / "data", args.synthetic, 0)
        sets[f"synthetic-{args.synthetic}"] = (list(ds.db.paths), args.synthetic_image_size)
    return {name: (ImageList([f"{p.stem}#{k}" for k in range(args.repeat) for p in paths],
                             [p for _ in range(args.repeat) for p in paths]), size)
            for name, (paths, size) in sets.items()}


def throughput(net, sets: dict[str, tuple[ImageList, int]], args, device: torch.device, tmp: Path) -> dict:
    out: dict = {}
    runs = 0
    for name, (images, image_size) in sets.items():
        for kind, scales in (("ss", (1.0,)), ("ms", MULTI_SCALES)):
            seconds: dict[str, list[float]] = {v: [] for v in (*BASELINES, *SIZINGS)}
            cores: dict[str, list[float]] = {v: [] for v in seconds}
            occupancy: dict[str, float] = dict.fromkeys(BASELINES, 1.0)
            for _ in range(args.rounds):
                for variant in seconds:
                    cpu, t = cpu_seconds(), time.perf_counter()
                    if variant in BASELINES:
                        batch1_loop(net, images, image_size, scales, args, device, fold=variant == "batch1-folded")
                    else:
                        sizing = dict(SIZINGS[variant])
                        window = args.batch_size if sizing.pop("window", None) == "batch" else None
                        stats = ExtractStats()
                        runs += 1
                        path = extract_features(net, images, tmp / f"run{runs}.h5", image_size=image_size,
                                                scales=scales, batch_size=args.batch_size, num_workers=args.workers,
                                                window=window, device=device, progress=False, stats=stats, **sizing)
                        path.unlink()
                        occupancy[variant] = stats.occupancy
                    seconds[variant].append(time.perf_counter() - t)
                    cores[variant].append((cpu_seconds() - cpu) / seconds[variant][-1])
            for variant, times in seconds.items():
                row = {"part": "throughput", "images": name, "n": len(images), "image_size": image_size,
                       "scales": kind, "variant": variant,
                       "images_per_s": round(len(images) / statistics.median(times), 2),
                       "seconds": [round(s, 2) for s in times],
                       "cores_used": round(statistics.median(cores[variant]), 2),
                       "batch_size": 1 if variant in BASELINES else args.batch_size,
                       "mean_batch_occupancy": round(occupancy[variant], 3)}
                emit(row)
                out[(name, kind, variant)] = row
    return out


def processes(args, images: ImageList, image_size: int, devices: list[str], tmp: Path) -> dict:
    make_net = functools.partial(create_model, architecture=args.architecture, pretrained=args.pretrained)
    times: dict[int, list[float]] = {1: [], len(devices): []}
    for r in range(args.rounds):
        for n in times:
            t = time.perf_counter()
            path = extract_on_devices(make_net, images, tmp / f"proc{n}-{r}.h5", devices[:n],
                                      image_size=image_size, scale="aspect", batch_size=args.batch_size,
                                      num_workers=args.workers, progress=False)
            times[n].append(time.perf_counter() - t)
            path.unlink()
    rows = {}
    for n, t in times.items():
        rows[n] = {"part": "processes", "processes": n, "devices": devices[:n], "n": len(images),
                   "images_per_s": round(len(images) / statistics.median(t), 2), "seconds": [round(s, 2) for s in t],
                   "note": "wall time of the whole call: process start, net build, extraction, merge"}
        emit(rows[n])
    return rows


def map_on_photos(net, args, device: torch.device) -> dict | None:
    csv_path = Path(args.photos) / "ground_truth.csv" if args.photos else None
    if csv_path is None or not csv_path.is_file():
        return None
    ds = load_folder(csv_path)
    out = {}
    for kind, scales in (("ss", (1.0,)), ("ms", MULTI_SCALES)):
        for variant in ("shape-grouped", "aspect"):
            sizing = {k: v for k, v in SIZINGS[variant].items() if k != "window"}
            kw = {"image_size": args.image_size, "scales": scales, "batch_size": args.batch_size,
                  "num_workers": args.workers, "device": device, **sizing}
            q_rows, q = describe_images(net, ds.queries, **kw)
            db_rows, db = describe_images(net, ds.db, **kw)
            out[(kind, variant)] = validation_map(ds, q_rows, q, db_rows, db)["medium"]
        row = {"part": "map", "images": "landmarks", "scales": kind, "image_size": args.image_size,
               "map_today_exact": round(out[(kind, "shape-grouped")], 4), "map_aspect": round(out[(kind, "aspect")], 4),
               "diff": round(out[(kind, "aspect")] - out[(kind, "shape-grouped")], 4)}
        emit(row)
        out[kind] = row
    return out


def write_small_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` small JPEGs of mixed shapes (sides 96-200 px), 1000 per sub-folder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / f"{i:06d}.jpg"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(96, 201, 2))
            pattern = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(pattern).resize((w, h), Image.BILINEAR).save(path, quality=85)
        else:
            rng.integers(96, 201, 2), rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        paths.append(path)
    return paths


def rss_child(args) -> None:
    """One extraction of the first ``--rss-child`` generated images; prints its peak RSS."""
    folder = Path(args.rss_folder)
    paths = sorted(folder.glob("*/*.jpg"))[: args.rss_child]
    images = ImageList([p.stem for p in paths], paths)
    torch.manual_seed(0)
    net = create_model(architecture=args.rss_architecture, pretrained=None)
    before = proc_status_mb("VmRSS")
    reset = reset_peak_rss()  # the peak of the extraction alone, not of the imports before it
    t = time.perf_counter()
    extract_features(net, images, Path(args.rss_out), image_size=args.rss_image_size, scale="aspect",
                     batch_size=args.batch_size, num_workers=args.workers, progress=False)
    seconds = time.perf_counter() - t
    peak = proc_status_mb("VmHWM") if reset else None
    print(json.dumps({"images": len(images), "rss_before_extraction_mb": before and round(before, 1),
                      "peak_rss_mb": round(peak if peak is not None else peak_rss_mb(), 1),
                      "peak_is_of_extraction_alone": reset,
                      "loader_workers_peak_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
                      "seconds": round(seconds, 1), "images_per_s": round(len(images) / seconds, 1)}))


def rss(args, tmp: Path) -> list[dict]:
    folder = tmp / "small"
    write_small_jpegs(folder, max(args.rss_sizes))
    rows = []
    for n in args.rss_sizes:
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--rss-folder", str(folder),
               "--rss-out", str(tmp / f"rss{n}.h5"), "--rss-image-size", str(args.rss_image_size),
               "--rss-architecture", args.rss_architecture, "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), *(["--threads", str(args.threads)] if args.threads else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"rss child for {n} images failed:\n{proc.stderr[-3000:]}")
        row = {"part": "rss", "architecture": args.rss_architecture, "image_size": args.rss_image_size,
               **json.loads(proc.stdout.splitlines()[-1])}
        emit(row)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="throughput,processes,map,rss")
    ap.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "landmarks"),
                    help="a folder with images/<landmark>/*.jpg and ground_truth.csv ('' for none)")
    ap.add_argument("--synthetic", default="tiny", help="built-in benchmark size whose database is timed ('' for none)")
    ap.add_argument("--repeat", type=int, default=2, help="times each image set is repeated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--process-repeat", type=int, default=4, help="the processes part repeats the first set again")
    ap.add_argument("--architecture", default="tf_efficientnet_lite0")
    ap.add_argument("--pretrained", default="efficientnet_lite0", help="weights key or file, or none")
    ap.add_argument("--image-size", type=int, default=480, help="of the photos")
    ap.add_argument("--synthetic-image-size", type=int, default=320, help="of the built-in benchmark's images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of our extraction")
    ap.add_argument("--baseline-workers", type=int, default=8, help="DataLoader workers of the batch-1 loop")
    ap.add_argument("-d", "--devices", default="0,1", help="the multi-process configuration")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process [default: torch's]; 1 on a machine shared with other jobs")
    ap.add_argument("--rss-sizes", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--rss-image-size", type=int, default=64)
    ap.add_argument("--rss-architecture", default="test_efficientnet",
                    help="net of the RSS part (random weights; small, so 50k images take minutes)")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.pretrained = None if args.pretrained in ("", "none") else args.pretrained
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        rss_child(args)
        return 0
    parts = set(args.parts.split(","))
    cuda = torch.cuda.is_available()
    ids = [s for s in args.devices.split(",") if s]
    # a GPU that is not there is left out (one lent GPU: the processes part is skipped)
    devices = [f"cuda:{i}" for i in ids if int(i) < torch.cuda.device_count()] if cuda else ["cpu"] * len(ids)
    devices = devices or ["cuda:0"]
    device = torch.device(devices[0])
    summary: dict = {"summary": True, "device": "cuda" if cuda else "cpu", "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                     "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
                     "baseline_workers": args.baseline_workers}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        net = create_model(architecture=args.architecture, pretrained=args.pretrained).to(device).eval()
        sets = image_sets(args, tmp) if parts & {"throughput", "processes"} else {}
        if "throughput" in parts and sets:
            rows = throughput(net, sets, args, device, tmp)
            for name in sets:
                for kind in ("ss", "ms"):
                    speed = {v: rows[(name, kind, v)]["images_per_s"] for v in (*BASELINES, *SIZINGS)}
                    for a, b in (("aspect", "shape-grouped"), ("aspect", "batch1"), ("shape-grouped", "batch1"),
                                 ("exact-windowed", "batch1"), ("aspect", "batch1-folded"),
                                 ("batch1-folded", "batch1")):
                        key = f"{name}_{kind}_{a}_vs_{b}".replace("-", "_")
                        summary[key] = round(speed[a] / speed[b], 3)
                    summary[f"{name}_{kind}_occupancy".replace("-", "_")] = {
                        v: rows[(name, kind, v)]["mean_batch_occupancy"] for v in SIZINGS}
        if "processes" in parts and sets and len(devices) > 1:
            images, image_size = next(iter(sets.values()))
            k = max(1, args.process_repeat)  # more images: process start-up is paid once per run
            images = ImageList([f"{i}@{r}" for r in range(k) for i in images.ids], list(images.paths) * k)
            rows = processes(args, images, image_size, devices, tmp)
            summary["speedup_processes"] = round(rows[len(devices)]["images_per_s"] / rows[1]["images_per_s"], 3)
        if "map" in parts:
            maps = map_on_photos(net, args, device)
            if maps:
                summary.update({f"map_{k}_diff_aspect_vs_today": maps[k]["diff"] for k in ("ss", "ms")})
        if "rss" in parts:
            rows = rss(args, tmp)
            if len(rows) >= 2:
                small, big = rows[0], rows[-1]
                summary["rss_peak_ratio_largest_vs_smallest"] = round(big["peak_rss_mb"] / small["peak_rss_mb"], 3)
                summary["rss_mb_per_million_images"] = round(
                    (big["peak_rss_mb"] - small["peak_rss_mb"]) / (big["images"] - small["images"]) * 1e6, 1)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
