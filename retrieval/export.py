"""Shipping a net: ONNX and TorchScript files that map an image tensor to its L2-normalised embedding.

``export_net(net, out_dir, image_size)`` writes, into ``out_dir`` (built as ``<out_dir>.tmp`` and
renamed when complete, so a killed export never leaves half a bundle):

- ``model.onnx`` (opset 17, the TorchScript-based exporter) and ``model.ts`` (``torch.jit.trace``):
  input ``image`` ``(B, 3, H, W)`` float32, already normalised; output ``embedding`` ``(B, D)``,
  L2-normalised (the net's descriptor: neck, whitening, resolution ensemble included; no head).
  The batch axis is dynamic. The spatial size is dynamic for CNNs (any H, W) and fixed at
  ``image_size`` × ``image_size`` for ViTs and resolution ensembles, whose resizing to the patch
  grid / the ensemble's sizes is computed from the traced shape;
- ``preprocess.json``: how to make that tensor from an image file (RGB, resize the whole image to
  ``size`` × ``size`` bicubic, scale to [0, 1], subtract ``mean``, divide by ``std``, NCHW), the
  output's dimension, and the parity checks run on export (max |exported − PyTorch| on a batch).

The resize rule is the library's ``resize="square"`` (`retrieval.data.images.resize_to`), so an
exported model fed as ``preprocess.json`` says gives what ``predict --set resize='"square"'`` stores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.models.net import RetrievalNet

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
PREPROCESS = "preprocess.json"
EXPORT_VERSION = 1
ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4


class EmbeddingModel(nn.Module):
    """The exported graph: a `RetrievalNet`'s descriptor, nothing else (the margin head stays behind)."""

    def __init__(self, net: RetrievalNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def dynamic_spatial(net: RetrievalNet) -> bool:
    """Whether the exported graph takes any H, W: CNNs without a resolution ensemble."""
    return not hasattr(net.backbone, "num_prefix_tokens") and not net.meta.get("resolutions")


def preprocess_record(net: RetrievalNet, image_size: int) -> dict[str, Any]:
    """What ``preprocess.json`` holds (see the module docstring)."""
    meta = net.meta
    return {
        "format": "retrieval.export", "version": EXPORT_VERSION,
        "input": {"name": "image", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                  "height": image_size, "width": image_size, "dynamic_batch": True,
                  "dynamic_spatial": dynamic_spatial(net)},
        "resize": {"mode": "square", "size": image_size, "interpolation": "bicubic"},
        "scale": 1.0 / 255.0, "mean": list(meta["mean"]), "std": list(meta["std"]),
        "output": {"name": "embedding", "dim": int(meta["dim"]), "l2_normalised": True},
        "model": {k: meta.get(k) for k in ("architecture", "pooling", "fc_dim", "resolutions", "patch_stride",
                                           "checkpoint", "pretrained")},
    }


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, spatial: bool) -> None:
    axes = {0: "batch", **({2: "height", 3: "width"} if spatial else {})}
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated in favour of dynamo (onnxscript)
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["embedding"],
                          dynamic_axes={"image": axes, "embedding": {0: "batch"}})


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))


def run_onnx(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Embeddings of a normalised ``(B, 3, H, W)`` float32 batch by an exported ``model.onnx`` (onnxruntime)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]


def run_torchscript(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Embeddings of a normalised batch by an exported ``model.ts``."""
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, which has no .ts file
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()


RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


def export_net(net: RetrievalNet, out_dir: str | os.PathLike, image_size: int,
               formats: Sequence[str] = FORMATS, seed: int = 0) -> Path:
    """Write the exported ``formats`` and ``preprocess.json`` into ``out_dir``; returns it.

    Each file is checked against the PyTorch net on a random batch of another size than the
    traced one (3 images; for a dynamic spatial size, also another H, W): the largest absolute
    difference goes into ``preprocess.json`` (``checks``) and one above 1e-4 is an error.
    """
    formats = [f.strip().lower() for f in formats]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"--format: unknown {unknown or formats}; choose from {', '.join(FORMATS)}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    net = net.cpu().eval()
    model = EmbeddingModel(net).eval()
    spatial = dynamic_spatial(net)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, image_size, image_size, generator=gen)
    checks: dict[str, float] = {}
    probes = [torch.randn(3, 3, image_size, image_size, generator=gen)]
    if spatial:
        probes.append(torch.randn(3, 3, image_size + 32, max(32, image_size - 32), generator=gen))
    for fmt in formats:
        path = tmp / FILES[fmt]
        logger.info("exporting %s (%s, image %d, dynamic spatial size: %s)", path.name, fmt, image_size, spatial)
        if fmt == "onnx":
            _export_onnx(model, example, path, spatial)
        else:
            _export_torchscript(model, example, path)
        diff = 0.0
        for x in probes:
            with torch.inference_mode():
                expected = model(x).numpy()
            diff = max(diff, float(np.abs(RUNNERS[fmt](path, x.numpy()) - expected).max()))
        checks[f"{fmt}_max_abs_diff"] = diff
        if not diff <= PARITY_TOLERANCE:
            raise RuntimeError(f"{path.name}: exported embeddings differ from PyTorch by {diff:.3g} "
                               f"(> {PARITY_TOLERANCE})")
    record = {**preprocess_record(net, image_size), "files": [FILES[f] for f in formats], "checks": checks}
    (tmp / PREPROCESS).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    logger.info("%s: %s, parity %s", out_dir, ", ".join(record["files"]), checks)
    return out_dir


def export_experiment(exp: Any, checkpoint: Path | None, formats: Sequence[str], out_dir: Path | None = None,
                      image_size: int | None = None) -> Path:
    """The ``export`` verb: the experiment's net (``-m`` checkpoint, or the pretrained net of params)
    exported at ``image_size`` (default: the params' ``image_size``) into ``out_dir`` (default
    ``<setting>/<ckpt>/export``)."""
    size = int(image_size or exp.params.get("image_size", 224))
    out = out_dir or exp.setting_dir(checkpoint) / "export"
    return export_net(exp.make_net(checkpoint)(), out, size, formats, int(exp.params.get("seed", 0)))
