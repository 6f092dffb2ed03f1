"""Datasets: revisitop ROxf/RPar, GLDv2, image folders + CSV, the built-in synthetic benchmark."""

from __future__ import annotations

import os
from pathlib import Path

from retrieval.data.dataset import BBox, ImageList, RetrievalDataset, gnd_from_labels
from retrieval.data.folder import load_folder, read_image_csv
from retrieval.data.revisitop import UnsafePickleError, load_gnd, load_revisitop, safe_load_pickle

REVISITOP = ("roxford5k", "rparis6k")

__all__ = [
    "BBox", "ImageList", "RetrievalDataset", "UnsafePickleError", "gnd_from_labels", "load_dataset",
    "load_folder", "load_gnd", "load_revisitop", "read_image_csv", "safe_load_pickle",
]


def load_dataset(spec: str, data_root: str | os.PathLike = "data", synthetic_size: str = "default",
                 seed: int = 0) -> RetrievalDataset:
    """Load a benchmark by name.

    ``spec``: ``synthetic`` (generated under ``<data_root>/synthetic-<size>-s<seed>`` on first use),
    ``roxford5k`` / ``rparis6k`` (``<data_root>/revisitop/<name>``, see scripts/download_revisitop.sh),
    ``gldv2`` (``<data_root>/gldv2``, see scripts/download_gldv2.sh), ``folder:<csv>`` / a path to a CSV,
    or ``vectors:N[,queries=Q,dim=D,...]`` (features only, written under ``<data_root>/vectors-...``,
    see `retrieval.data.vectors`).
    """
    data_root = Path(data_root)
    if spec == "synthetic":
        from retrieval.data.synthetic import make_synthetic, synthetic_labels

        name = f"synthetic-{synthetic_size}-s{seed}"
        gnd_path = make_synthetic(data_root / name, synthetic_size, seed)
        ds = load_revisitop(gnd_path.parent, "synthetic")
        ds.name = name
        ds.labels = synthetic_labels(gnd_path.parent)
        return ds
    if spec in REVISITOP:
        return load_revisitop(data_root / "revisitop" / spec, spec)
    if spec == "gldv2":
        from retrieval.data.gldv2 import load_gldv2_retrieval

        return load_gldv2_retrieval(data_root / "gldv2")
    if spec.startswith("vectors:"):
        from retrieval.data.vectors import parse_spec

        vectors = parse_spec(spec, seed)
        return vectors.dataset(data_root / vectors.name)
    if spec.startswith("folder:") or spec.endswith(".csv"):
        return load_folder(spec.removeprefix("folder:"))
    raise ValueError(f"unknown dataset {spec!r}: expected synthetic, roxford5k, rparis6k, gldv2, folder:<csv> "
                     "or vectors:<N>")
