"""The trainer: DDP equivalence, kill-and-resume to the same weights, stages, validation, bad images."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_PARAMS, write_labelled_folder
from retrieval.data.trainset import heldout_split, load_train_set
from retrieval.models import load_checkpoint
from retrieval.train import final_checkpoint, head_spec, train
from retrieval.train_state import load_training_checkpoint, rng_state, set_rng_state


def _params(csv_path: Path, **over) -> dict:
    return {**TINY_TRAIN_PARAMS, "train_set": f"folder:{csv_path}", **over}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_ddp_two_processes_of_batch_b_equal_one_process_of_batch_2b(tmp_path):
    """One SGD step: 2 gloo processes × 4 images == 1 process × 8 images (DDP averages the gradients)."""
    data = write_labelled_folder(tmp_path / "data", n_classes=2, per_class=4)
    # lr 0.01: float32 sums over 4 or 8 images differ in their last bits (~1e-6 relative), so the
    # weights agree to 1e-6 after a step of this size; the relative check below is independent of it
    one = train(_params(data, epochs=1, batch_size=8, lr=0.01), tmp_path / "one", ["cpu"])
    two = train(_params(data, epochs=1, batch_size=4, lr=0.01), tmp_path / "two", ["cpu", "cpu"])
    for out in ("one", "two"):  # exactly one optimizer step over all 8 images
        rows = list(csv.DictReader((tmp_path / out / "train_log.csv").open()))
        assert len(rows) == 1 and rows[0]["images"] == "8"
        assert load_training_checkpoint(tmp_path / out / "ep1.pth")["train_state"]["step"] == 1
    a, b = _state(one), _state(two)
    torch.manual_seed(0)
    from retrieval.models import create_model

    ts = load_train_set(f"folder:{data}")
    init = create_model(**{**_params(data), "head": head_spec(_params(data), ts.n_classes, ts.class_counts())})
    init = init.state_dict()
    step_a = torch.cat([(a[k].float() - init[k].float()).flatten() for k in init])
    step_b = torch.cat([(b[k].float() - init[k].float()).flatten() for k in init])
    assert float(step_a.abs().max()) > 1e-4, "the step did not change the weights"
    assert float((step_a - step_b).norm() / step_a.norm()) < 1e-4
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


EXPERIMENT = """
from retrieval.runner import main
params = {params!r}
space = {space!r}
if __name__ == "__main__":
    main(params, space)
"""


def write_experiment(path: Path, params: dict, space: list | None = None) -> Path:
    path.write_text(EXPERIMENT.format(params=params, space=space or []))
    return path


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before the condition held")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkilled_two_process_run_resumes_to_the_same_weights(tmp_path):
    data = write_labelled_folder(tmp_path / "data", n_classes=3, per_class=16, size=(128, 96), queries=True)
    params = _params(data, dataset=f"folder:{data}", epochs=3, batch_size=4, save_every_steps=1,
                     size_templates=[[128, 96]], dropout=0.0, augmentation="soft", num_workers=1)
    exp = write_experiment(tmp_path / "exp.py", params)
    cmd = [sys.executable, str(exp), "--out-root", "{root}", "job", "-d", "0,1"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    def run(root: Path) -> subprocess.Popen:
        return subprocess.Popen([c.format(root=root) for c in cmd], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    unbroken = run(tmp_path / "a")
    assert unbroken.wait(timeout=600) == 0, unbroken.stderr.read()

    killed = run(tmp_path / "b")
    log = tmp_path / "b" / "default" / "train.log"
    _wait_for(lambda: log.is_file() and "at epoch 2, batch 2 " in log.read_text(), killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    out_b = tmp_path / "b" / "default"
    assert not (out_b / "ep3.pth").exists(), "the run finished before it was killed"
    st = load_training_checkpoint(out_b / "last.pth")["train_state"]
    assert st["epoch"] == 1 and st["batch"] >= 2, "last.pth is not a mid-epoch checkpoint"

    resumed = run(tmp_path / "b")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert "resumed from" in log.read_text()
    a, b = _state(tmp_path / "a" / "default" / "ep3.pth"), _state(out_b / "ep3.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    rows_a = list(csv.DictReader((tmp_path / "a" / "default" / "train_log.csv").open()))
    rows_b = list(csv.DictReader((out_b / "train_log.csv").open()))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert json.loads((out_b / "job.json").read_text())["results"][0]["metrics"]["easy"]["map"] > 0


def test_validation_keeps_best_and_writes_log_and_plot(tmp_path):
    data = write_labelled_folder(tmp_path / "data", n_classes=5, per_class=4)
    ckpt = train(_params(data, epochs=2, val_dataset="heldout", val_classes=2), tmp_path / "run", ["cpu"])
    out = tmp_path / "run"
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # 0: the net before training
    assert rows[0]["loss"] == "" and float(rows[0]["val_score"]) > 0
    scores = [float(r["val_score"]) for r in rows[1:]]
    assert all(0 < s <= 1 for s in scores)
    best_epoch = int(np.argmax(scores)) + 1  # the first of ties
    assert ckpt == out / "best.pth" and os.path.samefile(out / "best.pth", out / f"ep{best_epoch}.pth")
    assert (out / "train_plot.png").stat().st_size > 1000
    st = load_training_checkpoint(out / "best.pth")["train_state"]
    assert st["best"]["epoch"] == best_epoch and st["epoch"] == best_epoch
    net = load_checkpoint(ckpt)  # an ordinary net checkpoint too
    assert net.meta["head"]["name"] == "arcface" and net.meta["head"]["n_classes"] == 3
    # the held-out classes are not trained on
    assert load_training_checkpoint(ckpt)["state_dict"]["head.weight"].shape[0] == 3


def test_finished_run_is_not_retrained_and_frozen_parts_stay(tmp_path):
    data = write_labelled_folder(tmp_path / "data", n_classes=2, per_class=4)
    params = _params(data, epochs=1, stages=[{"epochs": 1, "freeze_backbone": True, "lr": 0.1},
                                             {"epochs": 1, "lr": 0.01, "freeze_head": True}])
    train(params, tmp_path / "run", ["cpu"])
    e1, e2 = _state(tmp_path / "run" / "ep1.pth"), _state(tmp_path / "run" / "ep2.pth")
    torch.manual_seed(0)
    from retrieval.models import create_model

    init = create_model(**{**params, "head": {"name": "arcface", "n_classes": 2}}).state_dict()
    backbone_weights = [k for k in e1 if k.startswith("backbone.") and "running" not in k and "num_batches" not in k]
    assert all(torch.equal(e1[k], init[k]) for k in backbone_weights), "stage 1 moved the frozen backbone"
    assert not torch.equal(e1["head.weight"], init["head.weight"])
    assert torch.equal(e2["head.weight"], e1["head.weight"]), "stage 2 moved the frozen head"
    assert any(not torch.equal(e2[k], e1[k]) for k in backbone_weights)
    mtime = (tmp_path / "run" / "ep2.pth").stat().st_mtime_ns
    assert train(params, tmp_path / "run", ["cpu"]) == tmp_path / "run" / "ep2.pth"
    assert (tmp_path / "run" / "ep2.pth").stat().st_mtime_ns == mtime


def test_unreadable_training_image_is_replaced_and_listed(tmp_path):
    data = write_labelled_folder(tmp_path / "data", n_classes=2, per_class=4)
    (data.parent / "c1_v2.jpg").write_bytes(b"not a jpeg")
    train(_params(data, epochs=1), tmp_path / "run", ["cpu"])
    rows = list(csv.DictReader((tmp_path / "run" / "train_skipped.csv").open()))
    assert [r["id"] for r in rows] == ["c1_v2"] and "not an image" in rows[0]["reason"]
    log = list(csv.DictReader((tmp_path / "run" / "train_log.csv").open()))
    assert log[0]["images"] == "8"  # the batch kept its size


def test_heldout_split_is_disjoint_by_class(tmp_path):
    data = write_labelled_folder(tmp_path / "data", n_classes=6, per_class=3)
    ts = load_train_set(f"folder:{data}")
    rest, val = heldout_split(ts, 2, seed=0)
    held = {i.split("_")[0] for i in val.queries.ids}
    assert len(held) == 2 and not held & {i.split("_")[0] for i in rest.ids}
    assert rest.n_classes == 4 and len(rest) + len(val.queries) == len(ts)
    assert all(len(g["easy"]) == 2 and len(g["junk"]) == 1 for g in val.gnd)  # leave-one-out
    with pytest.raises(ValueError, match="val_classes=6"):
        heldout_split(ts, 6, seed=0)
    assert len({i.split("_")[0] for i in heldout_split(ts, 0.34, seed=0)[1].queries.ids}) == 2  # a fraction


def test_head_spec_maps_landmark2019_params():
    counts = np.array([1, 10])
    assert head_spec({"loss": "arcface", "s": 30, "margin": 0.3}, 2, counts) == {
        "name": "arcface", "n_classes": 2, "s": 30, "m": 0.3}
    spec = head_spec({"loss": "arcface", "dynamic_margin": True}, 2, counts)
    assert spec["class_counts"] == [1, 10] and spec["dynamic_margin"] is True
    assert head_spec({"loss": "adacos", "margin": 0.3}, 2, counts) == {"name": "adacos", "n_classes": 2}
    assert head_spec({"loss": "subcenter_arcface", "subcenters": 2}, 2, counts)["k"] == 2


def test_rng_state_round_trip():
    state = rng_state()
    a = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    set_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item(), __import__("random").random()) == a


def test_final_checkpoint_without_epochs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no epoch checkpoint"):
        final_checkpoint(tmp_path)
    for n in (1, 2, 10):
        (tmp_path / f"ep{n}.pth").write_bytes(b"")
    assert final_checkpoint(tmp_path).name == "ep10.pth"


@pytest.mark.parametrize("arch, stem, blocks", [("test_efficientnet", 2, 5), ("resnet18", 4, 4), ("test_vit", 4, 6)])
def test_backbone_blocks(arch, stem, blocks):
    import timm

    from retrieval.models.backbones import backbone_blocks

    s, b = backbone_blocks(timm.create_model(arch, pretrained=False, num_classes=0))
    assert (len(s), len(b)) == (stem, blocks)
