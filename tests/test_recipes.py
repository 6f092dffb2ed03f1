"""The universal-embedding experiment files run end to end (job: train → extract → evaluate) at tiny scale.

Each recipe runs as written except for ``--set`` overrides that shrink it: a tiny backbone with random
weights, one epoch per stage, small image folders under the recipe's own dataset names.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import write_labelled_folder
from retrieval.models import create_backbone, load_checkpoint
from retrieval.runner import build_cli

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP_KWARGS = {"embed_dim": 32, "layers": 1, "width": 32, "head_width": 16, "image_size": 56}


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_job(name: str, out_root: Path, overrides: dict) -> dict:
    module = recipe(name)
    args = ["--out-root", str(out_root)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    result = CliRunner().invoke(build_cli(module.params, module.space, name=name, script=REPO / "experiments" /
                                          f"{name}.py"), [*args, "job", "-d", "0", "--setting", "default"],
                                 catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{\n"):])  # the job record, printed last


def small_stages(params: dict, scale: float = 0.25) -> list[dict]:
    """The recipe's stages, one epoch each, square input sizes scaled (224 → 56, 280 → 70, 290 → 72)."""
    out = []
    for stage in params["stages"]:
        small = {**stage, "epochs": 1}
        if "size_templates" in stage:
            small["size_templates"] = [[int(w * scale), int(h * scale)] for w, h in stage["size_templates"]]
        out.append(small)
    return out


def small_sizes(params: dict, scale: float = 0.25) -> dict:
    """Top-level sizes scaled like `small_stages` (templates, the evaluation size, the resolution ensemble)."""
    out = {"image_size": int(params["image_size"] * scale)}
    if params.get("size_templates"):
        out["size_templates"] = [[int(w * scale), int(h * scale)] for w, h in params["size_templates"]]
    if params.get("resolutions"):
        out["resolutions"] = [int(r * scale) for r in params["resolutions"]]
    return out


@pytest.fixture(scope="module")
def guie_data(tmp_path_factory) -> dict:
    """A small folder per training source name the GUIE recipes use, and a 2-domain evaluation CSV."""
    root = tmp_path_factory.mktemp("guie")
    sources = {name: write_labelled_folder(root / name, n_classes=2, per_class=3, size=(64, 48), seed=i)
               for i, name in enumerate(["products", "landmarks", "fashion", "other", "gpr1200", "food"])}
    rows = []
    for d, domain in enumerate(("shops", "sights")):
        folder = write_labelled_folder(root / "val" / domain, n_classes=2, per_class=3, seed=10 + d)
        with folder.open() as f:
            rows += [{"id": f"{domain}_{r['id']}", "path": f"{domain}/{r['path']}",
                      "landmark_id": f"{domain}_{r['landmark_id']}", "domain": domain} for r in csv.DictReader(f)]
    val = root / "val" / "images.csv"
    with val.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "landmark_id", "domain"])
        writer.writeheader()
        writer.writerows(rows)
    return {"sources": sources, "val": f"folder:{val}"}


def tiny_sources(params: dict, data: dict) -> list[dict]:
    """The recipe's train_sets, same names and weights, each pointing at a tiny folder."""
    return [{**entry, "train_set": f"folder:{data['sources'][entry['name']]}"} for entry in params["train_sets"]]


def run_small_guie(name: str, out: Path, data: dict, **extra) -> dict:
    """The GUIE recipe ``name`` as a small job: a tiny CLIP tower, the tiny sources, small stages and sizes."""
    params = recipe(name).params
    return run_job(name, out, {
        "backbone_kwargs": TINY_CLIP_KWARGS, "train_sets": tiny_sources(params, data),
        "stages": small_stages(params), **small_sizes(params), "dataset": data["val"],
        "val_dataset": data["val"], "batch_size": 4, "num_workers": 0, "progress": False, **extra})


def _results(out: Path, setting: str = "default") -> dict:
    (res_dir,) = (out / setting / "best" / "eval").iterdir()
    return json.loads((res_dir / "results.json").read_text())


@pytest.mark.slow
def test_v4_hybrid_vit_trains_the_transformer_on_the_frozen_cnn_then_the_cnn_and_reports_map_and_mp5(tmp_path):
    params = recipe("v4").params
    record = run_job("v4", tmp_path / "v4", {
        "data_root": str(tmp_path / "data"), "synthetic_size": "tiny", "stages": small_stages(params),
        "backbone_kwargs": {**params["backbone_kwargs"], "img_size": 64, "depth": 1, "embed_dim": 32, "num_heads": 2},
        "batch_size": 8, "size_templates": [[64, 64]], "image_size": 64, "num_workers": 0, "progress": False})
    assert record["results"][0]["metrics"]["medium"]["map"] > 0
    res = _results(tmp_path / "v4")
    assert res["params"]["architecture"] == "hybrid:tf_efficientnet_lite0" and 0 <= res["mp@5"] <= 1
    out = tmp_path / "v4" / "default"
    log = list(csv.DictReader((out / "train_log.csv").open()))
    assert "val_mp@5" in log[0] and [r["stage"] for r in log[1:]] == ["0", "1"]
    # stage 1 trains the transformer on the frozen ImageNet CNN; stage 2 its last blocks and conv_head too
    imagenet = create_backbone("tf_efficientnet_lite0", "efficientnet_lite0").state_dict()
    e1, e2 = (torch.load(out / f"ep{i}.pth", weights_only=True)["state_dict"] for i in (1, 2))
    cnn = "backbone.vit.patch_embed.backbone."
    for key in ("blocks.0.0.conv_dw.weight", "blocks.6.0.conv_pwl.weight", "conv_head.weight"):
        assert torch.equal(e1[cnn + key], imagenet[key]), key
    assert torch.equal(e2[cnn + "blocks.3.0.conv_pw.weight"], imagenet["blocks.3.0.conv_pw.weight"])
    assert not torch.equal(e2[cnn + "blocks.6.0.conv_pwl.weight"], imagenet["blocks.6.0.conv_pwl.weight"])
    block = "backbone.vit.blocks.0.mlp.fc2.weight"
    assert not torch.equal(e1[block], e2[block])
    net = load_checkpoint(out / "ep2.pth").eval()
    with torch.inference_mode():
        assert net(torch.randn(1, 3, 96, 64)).shape == (1, 64)


@pytest.mark.slow
def test_guie1_stages_add_datasets_raise_the_margin_and_overlap_patches(tmp_path, guie_data):
    run_small_guie("guie1", tmp_path / "g1", guie_data, batch_size_eval=8)
    out = tmp_path / "g1" / "default"
    log = list(csv.DictReader((out / "train_log.csv").open()))
    # products + a tenth of landmarks, then + fashion, then every source (6 images each)
    assert [r["images"] for r in log] == ["7", "13", "19", "19"]
    meta = load_checkpoint(out / "ep4.pth").meta
    assert meta["head"]["name"] == "cosface" and meta["head"]["m"] == 0.65 and meta["head"]["s"] == 30.0
    assert meta["patch_stride"] == 10 and meta["resolutions"] == [56, 70] and meta["dim"] == 64
    assert load_checkpoint(out / "ep1.pth").meta["head"]["m"] == 0.55
    e1, e2 = (torch.load(out / f"ep{i}.pth", weights_only=True)["state_dict"] for i in (1, 2))
    assert torch.equal(e1["neck.fc.weight"], e2["neck.fc.weight"]) and torch.equal(e1["head.weight"], e2["head.weight"])
    assert not torch.equal(e1["backbone.visual.conv1.weight"], e2["backbone.visual.conv1.weight"])
    res = _results(tmp_path / "g1")
    assert set(res["domains"]) == {"shops", "sights"} and res["domains"]["shops"]["n_queries"] == 6


@pytest.mark.slow
def test_guie5_arcface_stage_then_classifier_stage(tmp_path, guie_data):
    run_small_guie("guie5", tmp_path / "g5", guie_data)
    out = tmp_path / "g5" / "default"
    assert [load_checkpoint(out / f"ep{i}.pth").meta["head"]["name"] for i in (1, 2)] == ["arcface", "softmax"]
    e1, e2 = (torch.load(out / f"ep{i}.pth", weights_only=True)["state_dict"] for i in (1, 2))
    assert "neck.bn.running_mean" in e2 and e2["head.weight"].shape == (4 * 2, 64)
    assert all(torch.equal(e1[k], e2[k]) for k in e1 if k.startswith("backbone."))  # the tower stays frozen
    assert "mp@5" in _results(tmp_path / "g5")


@pytest.mark.slow
def test_guie9_trains_through_a_256_projection_and_ships_64(tmp_path, guie_data):
    run_small_guie("guie9", tmp_path / "g9", guie_data)
    net = load_checkpoint(tmp_path / "g9" / "default" / "ep2.pth").eval()
    assert net.meta["dim"] == 64 and net.meta["head"]["fc_dim"] == 256 and net.meta["head"]["name"] == "softmax"
    assert net.head_fc[1].weight.shape == (256, 64) and net.head.weight.shape == (2 * 2, 256)
    with torch.inference_mode():
        assert net(torch.randn(2, 3, 56, 56)).shape == (2, 64)
    assert "mp@5" in _results(tmp_path / "g9")
