"""Exported models (ONNX via onnxruntime, TorchScript) give the PyTorch embeddings, and the README snippet works."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CLIP, TINY_HYBRID, TINY_VIT, write_jpeg
from retrieval.data import ImageList
from retrieval.export import export_net, run_onnx, run_torchscript
from retrieval.extract import describe_images
from retrieval.models import create_model, load_checkpoint, save_checkpoint
from retrieval.runner import build_cli

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def readme_snippet() -> str:
    """The README's onnxruntime-only code block (under "Universal embeddings"), as it is printed."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Universal embeddings"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return next(b for b in blocks if "import onnxruntime" in b)


def _pytorch(net, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net.eval()(torch.from_numpy(x)).numpy()


def test_export_verb_cnn_matches_pytorch_and_the_readme_snippet_embeds_like_predict(tmp_path):
    torch.manual_seed(0)
    net = create_model("test_efficientnet", pretrained=None, fc_dim=16, dropout=0.2, neck_bn=False)
    ckpt = save_checkpoint(tmp_path / "net.pth", net)
    params = {"architecture": "test_efficientnet", "pretrained": None, "image_size": 64, "seed": 0}
    out = CliRunner().invoke(build_cli(params, name="t"), ["--out-root", str(tmp_path / "exp"), "export", "-m",
                                                             str(ckpt), "--out", str(tmp_path / "bundle")],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    bundle = tmp_path / "bundle"
    cfg = json.loads((bundle / "preprocess.json").read_text())
    assert sorted(p.name for p in bundle.iterdir()) == ["model.onnx", "model.ts", "preprocess.json"]
    assert cfg["input"]["dynamic_batch"] and cfg["input"]["dynamic_spatial"] and cfg["output"]["dim"] == 16
    assert cfg["resize"] == {"mode": "square", "size": 64, "interpolation": "bicubic"}
    assert max(cfg["checks"].values()) < TOL
    net = load_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    for shape in ((3, 3, 64, 64), (1, 3, 80, 48)):  # another batch and another spatial size than traced
        x = rng.standard_normal(shape).astype(np.float32)
        ref = _pytorch(net, x)
        assert np.abs(run_onnx(bundle / "model.onnx", x) - ref).max() < TOL
        assert np.abs(run_torchscript(bundle / "model.ts", x) - ref).max() < TOL
        assert np.allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    # the README's code, run as printed, on an image file; predict's path with resize=square for reference
    image = write_jpeg(tmp_path / "photo.jpg", size=(90, 60), seed=3)
    namespace: dict = {}
    exec(readme_snippet(), namespace)
    embedding = namespace["embed"](str(image), str(bundle))
    _, ref = describe_images(net, ImageList(["photo"], [image]), image_size=64, resize="square")
    assert embedding.shape == (16,) and np.abs(embedding - ref[0]).max() < TOL


@pytest.mark.parametrize("spec, extra, size", [
    (TINY_VIT, {"pooling": "gem_tokens", "patch_stride": 12, "resolutions": [48, 64], "resolution_combine": "mean"},
     64),
    (TINY_CLIP, {"pooling": "cls", "patch_stride": 10}, 56),
    (TINY_HYBRID, {"pooling": "gem_tokens"}, 96),
], ids=["timm-vit", "open_clip", "hybrid"])
def test_vit_export_matches_pytorch(tmp_path, spec, extra, size):
    torch.manual_seed(1)
    net = create_model(**spec, **extra, fc_dim=16, dropout=0.2, neck_bn=False).eval()
    bundle = export_net(net, tmp_path / "bundle", size)
    cfg = json.loads((bundle / "preprocess.json").read_text())
    assert not cfg["input"]["dynamic_spatial"] and cfg["model"]["patch_stride"] == extra.get("patch_stride")
    x = np.random.default_rng(1).standard_normal((3, 3, size, size)).astype(np.float32)
    ref = _pytorch(net, x)
    for run, name in ((run_onnx, "model.onnx"), (run_torchscript, "model.ts")):
        assert np.abs(run(bundle / name, x) - ref).max() < TOL, name


def test_export_refuses_an_unknown_format_and_keeps_no_partial_bundle(tmp_path):
    net = create_model("test_efficientnet", pretrained=None)
    with pytest.raises(ValueError, match=r"--format: unknown \['tflite'\]"):
        export_net(net, tmp_path / "bundle", 64, ["onnx", "tflite"])
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.tmp").exists()
