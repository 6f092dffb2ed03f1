"""Training throughput and peak memory: one process vs one process per device of ``-d 0,1`` (and AMP vs fp32 on CUDA).

Trains the default net (EfficientNet-Lite0 + GeM, ArcFace) on a generated labelled image folder for
``--epochs`` epochs in each configuration and reads the last epoch's row of ``train_log.csv`` (the
first epoch includes warm-up), so every figure comes from the trainer itself. Prints one JSON
line per configuration and one with the ratios, e.g.::

    python scripts/bench_train.py                 # CPU: 1 process vs 2 gloo processes
    python scripts/bench_train.py -d 0,1          # CUDA: 1 vs 2 GPUs, plus AMP vs fp32 on one GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from retrieval.train import train  # noqa: E402


def make_folder(root: Path, n_images: int, n_classes: int, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["id,path,landmark_id,width,height"]
    for i in range(n_images):
        c = i % n_classes
        base = np.random.default_rng(c).integers(0, 256, (8, 8, 3)).astype(np.float64)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).resize(size, Image.BILINEAR).save(root / f"{i}.jpg", quality=90)
        lines.append(f"img{i},{i}.jpg,lm{c},{size[0]},{size[1]}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def run(name: str, csv_path: Path, out: Path, devices: list[str], args: argparse.Namespace, **over) -> dict:
    params = {"architecture": args.architecture, "pretrained": None if args.pretrained == "none" else args.pretrained,
              "pooling": "gem",
              "loss": "arcface", "train_set": f"folder:{csv_path}", "epochs": args.epochs,
              "batch_size": args.batch_size, "size_templates": [list(args.size)], "augmentation": "soft",
              "num_workers": args.workers, "lr": 0.01, "freeze_bn": True, "progress": False, **over}
    train(params, out / name, devices)
    with (out / name / "train_log.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    row = {"config": name, "devices": devices, "images_per_s": float(last["images_per_s"]),
           "epoch_seconds": float(last["seconds"]), "peak_rss_mb": float(last["peak_rss_mb"]),
           "batch_size_per_process": args.batch_size, **({"amp": over["amp"]} if "amp" in over else {})}
    if last.get("peak_cuda_mb"):
        row["peak_cuda_mb"] = float(last["peak_cuda_mb"])
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-d", "--devices", default="0,1", help="the multi-process configuration [default: 0,1]")
    ap.add_argument("--architecture", default="tf_efficientnet_lite0")
    ap.add_argument("--pretrained", default="efficientnet_lite0", help="weights key or file, or none")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--classes", type=int, default=24)
    ap.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("W", "H"))
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    ids = [s for s in args.devices.split(",") if s]
    cuda = torch.cuda.is_available()
    devices = [f"cuda:{i}" for i in ids] if cuda else ["cpu"] * len(ids)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = make_folder(Path(tmp) / "data", args.images, args.classes, tuple(args.size))
        out = Path(tmp) / "runs"
        one = run("1-process", csv_path, out, devices[:1], args)
        many = run(f"{len(devices)}-processes", csv_path, out, devices, args)
        summary = {"summary": True, "device": "cuda" if cuda else "cpu", "cpu_cores": os.cpu_count(),
                   "speedup_multi_vs_one": round(many["images_per_s"] / one["images_per_s"], 3),
                   "rss_ratio_multi_vs_one": round(many["peak_rss_mb"] / one["peak_rss_mb"], 3)}
        if cuda:
            fp32 = run("1-process-fp32", csv_path, out, devices[:1], args, amp=False)
            summary["speedup_amp_vs_fp32"] = round(one["images_per_s"] / fp32["images_per_s"], 3)
            summary["cuda_memory_ratio_amp_vs_fp32"] = round(one["peak_cuda_mb"] / fp32["peak_cuda_mb"], 3)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
