"""The runner's training and scale verbs: job, tuning (parallel, killed and rerun), multigpu-predict, launchers."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY_TRAIN_PARAMS, write_labelled_folder
from retrieval.features import read_features
from retrieval.runner import build_cli

REPO = Path(__file__).resolve().parents[1]
VERBS = ("job", "tuning", "predict", "evaluate", "submit", "multigpu-predict", "launch-slurm", "launch-qsub",
         "serve", "clean", "index", "whiten", "ensemble", "export")

EXPERIMENT = """
from retrieval.runner import main
params = {params!r}
space = {space!r}
if __name__ == "__main__":
    main(params, space)
"""


@pytest.fixture()
def tiny(tmp_path):
    """A tiny labelled folder (train set and benchmark) and an experiment file over it."""
    data = write_labelled_folder(tmp_path / "data", n_classes=3, per_class=4, queries=True)
    params = {**TINY_TRAIN_PARAMS, "train_set": f"folder:{data}", "dataset": f"folder:{data}", "epochs": 1}
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT.format(params=params, space=[{"margin": [0.2, 0.3]}]))
    return exp, params, data


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_help_lists_every_verb():
    out = run(REPO / "experiments" / "v2.py", "--help")
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(VERBS)


def test_multigpu_predict_equals_predict_and_merges_blocks(tiny, tmp_path):
    _, params, _ = tiny
    cli = build_cli(params, name="exp", script=tmp_path / "exp.py")

    def invoke(*args):
        result = CliRunner().invoke(cli, ["--out-root", str(tmp_path / "out"), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout.split()

    [q1, _] = invoke("predict", "--ms", "--splits", "query,db")
    ids1, f1, attrs1 = read_features(q1)
    out2 = tmp_path / "out2"
    cli2 = build_cli(params, name="exp", script=tmp_path / "exp.py")
    r = CliRunner().invoke(cli2, ["--out-root", str(out2), "multigpu-predict", "-d", "0,1", "--ms"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    q2 = Path(r.stdout.split()[0])
    ids2, f2, attrs = read_features(q2)
    assert q2.relative_to(out2) == Path(q1).relative_to(tmp_path / "out")  # the very file predict writes
    assert ids2 == ids1 and np.abs(f1 - f2).max() <= 1e-5 and attrs["shards"] == 2
    assert {k: v for k, v in attrs.items() if k != "shards"} == attrs1  # same schema, settings and job signature
    assert not list((out2 / "pretrained" / "features").rglob("*shard*"))  # merged and removed
    # one block at a time (one array task each), then the merge
    out3 = ["--out-root", str(tmp_path / "out3"), "multigpu-predict", "-n", "3", "--ms"]
    r = CliRunner().invoke(cli2, [*out3, "-i", "1", "--splits", "query"], catch_exceptions=False)
    shard = Path(r.stdout.split()[0])
    assert shard.name == "query_ms.shard1of3.h5" and shard.is_file()
    assert read_features(shard)[0] == ids1[1:2]  # block 1 of 3 of the 3 queries
    r = CliRunner().invoke(cli2, [*out3, "--splits", "query"], catch_exceptions=False)
    ids3, f3, _ = read_features(r.stdout.split()[0])
    assert ids3 == ids1 and np.abs(f1 - f3).max() <= 1e-5 and not shard.exists()


KILLED_SHARD_EXPERIMENT = """
import os, signal
from pathlib import Path
import retrieval.data.images as images_mod
from retrieval.runner import main

params = {params!r}
real_load = images_mod.load_image


def load_or_die(path, bbx=None):  # runs in the spawned shard workers too: they import this file again
    mark = Path(os.environ.get("KILL_MARK", "-"))
    if Path(path).stem == os.environ.get("KILL_AT") and not mark.exists():
        mark.touch()
        os.kill(os.getpid(), signal.SIGKILL)  # this worker dies as if its machine went away
    return real_load(path, bbx)


images_mod.load_image = load_or_die
if __name__ == "__main__":
    main(params, [])
"""


@pytest.mark.slow
def test_sigkilled_shard_worker_resumes_and_equals_predict(tmp_path):
    data = write_labelled_folder(tmp_path / "data", n_classes=4, per_class=6, queries=True)  # 20 db images
    params = {**TINY_TRAIN_PARAMS, "dataset": f"folder:{data}", "train_set": f"folder:{data}"}
    exp = tmp_path / "killer.py"
    exp.write_text(KILLED_SHARD_EXPERIMENT.format(params=params))
    root = tmp_path / "out"
    cmd = [sys.executable, str(exp), "--out-root", str(root), "multigpu-predict", "-d", "0,1", "-b", "2",
           "--splits", "index"]
    db = sorted(p.stem for p in data.parent.glob("*.jpg") if not p.stem.endswith("_v0"))
    env = {**os.environ, "KILL_AT": db[10 + 9], "KILL_MARK": str(tmp_path / "killed")}  # shard 1's last input
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and (tmp_path / "killed").exists(), killed.stderr[-2000:]
    folder = root / "pretrained" / "features" / "data"
    with h5py.File(folder / "db_ss.shard1of2.h5.tmp", "r") as f:  # its first window (4 batches of 2) is committed
        assert f.attrs["cursor"] == 8 and f.attrs["rows"] == 8 and not f.attrs["complete"]
    assert not (folder / "db_ss.h5").exists()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "db_ss.shard1of2.h5.tmp: resuming at input 8 of 10" in (folder / "extract.log").read_text()
    ids, feats, attrs = read_features(folder / "db_ss.h5")
    cli = build_cli(params, name="exp", script=tmp_path / "exp.py")
    ref = CliRunner().invoke(cli, ["--out-root", str(tmp_path / "ref"), "predict", "-b", "2", "--splits", "db"],
                             catch_exceptions=False)
    ref_ids, ref_feats, _ = read_features(ref.stdout.split()[0])
    assert ids == ref_ids and len(set(ids)) == len(ids) == 20  # no row lost or repeated
    assert np.abs(feats - ref_feats).max() <= 1e-5 and attrs["shards"] == 2
    assert not list(folder.glob("*shard*"))


@pytest.mark.slow
def test_job_trains_extracts_and_evaluates(tiny, tmp_path):
    exp, _, _ = tiny
    out = json.loads(run(exp, "--out-root", tmp_path / "out", "--set", "margin=0.25", "job", "-d", "0"))
    setting = tmp_path / "out" / "margin-0.25"
    assert out["setting"] == "margin-0.25" and Path(out["checkpoint"]) == setting / "ep1.pth"
    for name in ("params.json", "train.log", "train_log.csv", "train_plot.png", "ep1.pth", "last.pth", "job.json"):
        assert (setting / name).is_file(), name
    assert json.loads((setting / "params.json").read_text())["margin"] == 0.25
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["setting"] == "margin-0.25/ep1" and float(rows[0]["map_e"]) > 0
    assert (setting / "ep1" / "eval" / "data_ss_none" / "ranked.html").is_file()


def _results(root: Path) -> list[dict]:
    path = root / "results.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []


@pytest.mark.slow
def test_tuning_runs_settings_in_parallel_and_writes_a_row_each(tiny, tmp_path):
    exp, _, _ = tiny
    status = json.loads(run(exp, "--out-root", tmp_path / "out", "tuning", "-d", "0,1", "--n-gpu", "1"))
    assert sorted(status["done"]) == ["margin-0.2", "margin-0.3"] and not status["failed"]
    rows = _results(tmp_path / "out")
    assert sorted(r["setting"] for r in rows) == ["margin-0.2/ep1", "margin-0.3/ep1"]
    spans = []
    for name in ("margin-0.2", "margin-0.3"):
        log = (tmp_path / "out" / name / "train.log").stat()
        params = (tmp_path / "out" / name / "params.json").stat()
        spans.append((params.st_mtime, log.st_mtime))
        assert json.loads((tmp_path / "out" / name / "params.json").read_text())["tuning_params"] == ["margin"]
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, "the two jobs did not overlap in time"


@pytest.mark.slow
def test_killed_tuning_reruns_only_what_is_missing(tiny, tmp_path):
    exp, _, _ = tiny
    root = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(exp), "--out-root", str(root), "tuning", "-d", "0"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = [root / "margin-0.2" / "job.json", root / "margin-0.3" / "job.json"]
    t0 = time.time()
    while not any(p.is_file() for p in done):
        assert proc.poll() is None and time.time() - t0 < 300, "tuning ended or hung before a setting finished"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = next(p for p in done if p.is_file())
    other = next(p for p in done if p != first)
    assert not other.is_file(), "both settings finished before the kill"
    mtime = first.stat().st_mtime_ns
    status = json.loads(run(exp, "--out-root", root, "tuning", "-d", "0"))
    assert status["skipped"] == [first.parent.name] and status["done"] == [other.parent.name]
    assert first.stat().st_mtime_ns == mtime and other.is_file()
    assert sorted(r["setting"] for r in _results(root)) == ["margin-0.2/ep1", "margin-0.3/ep1"]


def test_launch_qsub_renders_an_array_job_of_the_missing_settings(tiny, tmp_path, monkeypatch):
    exp, params, _ = tiny
    root = tmp_path / "out"
    (root / "margin-0.2").mkdir(parents=True)
    (root / "margin-0.2" / "job.json").write_text("{}")  # already done: not submitted again
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = run(exp, "--out-root", root, "launch-qsub", "tuning", "--resource", "rt_G.large=1", "--walltime", "2:00:00")
    assert "qsub not found: submit it with `qsub " in out
    script = next((root / "qsub").glob("tuning-*.sh")).read_text()
    assert "#$ -l rt_G.large=1" in script and "#$ -l h_rt=2:00:00" in script and "#$ -t" not in script
    assert "job -d 0 --params-path" in script and "margin-0.3/params.json --setting margin-0.3" in script
    assert "margin-0.2/params.json" not in script
    # a fake qsub on PATH takes it, for an array of two block tasks
    fake = tmp_path / "bin" / "qsub"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "Your job-array 4242.1-2:1 (\\"x\\") has been submitted"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    out = run(exp, "--out-root", root, "launch-qsub", "multigpu-predict", "-n", "2", "--ms")
    assert "submitted SGE job 4242" in out and "merge the blocks" in out
    script = sorted((root / "qsub").glob("multigpu-predict-*.sh"))[-1].read_text()
    assert "#$ -t 1-2" in script and "--n-blocks 2 --block-id 1" in script and "--ms" in script


def test_launch_slurm_without_slurm_is_a_clean_error(tiny, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    exp, _, _ = tiny
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no srun
    proc = subprocess.run([sys.executable, str(exp), "--out-root", str(tmp_path / "out"), "launch-slurm", "job"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Error: no Slurm found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_launch_slurm_runs_blocks_through_submitit(tiny, tmp_path):
    pytest.importorskip("submitit")
    exp, _, _ = tiny
    root = tmp_path / "out"
    out = run(exp, "--out-root", root, "launch-slurm", "multigpu-predict", "-n", "2", "--splits", "query",
              "--gpus-per-node", "0", "--cluster", "local")
    assert out.count("submitted") == 2
    shards = [root / "pretrained" / "features" / "data" / f"query_ss.shard{i}of2.h5" for i in range(2)]
    t0 = time.time()
    while not all(s.is_file() for s in shards):
        assert time.time() - t0 < 300, list((root / "slurm").glob("*"))
        time.sleep(0.2)
    run(exp, "--out-root", root, "multigpu-predict", "-n", "2", "--splits", "query")
    ids, feats, attrs = read_features(root / "pretrained" / "features" / "data" / "query_ss.h5")
    assert len(ids) == 3 and attrs["shards"] == 2


@pytest.mark.slow
def test_job_under_torchrun_equals_job_with_two_devices(tiny, tmp_path):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the same job runs as one of its ranks."""
    import torch

    exp, _, _ = tiny
    run(exp, "--out-root", tmp_path / "spawned", "job", "-d", "0,1")
    run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", exp, "--out-root",
        tmp_path / "torchrun", "job")
    a = torch.load(tmp_path / "spawned" / "default" / "ep1.pth", weights_only=True)
    b = torch.load(tmp_path / "torchrun" / "default" / "ep1.pth", weights_only=True)
    assert a["train_state"]["world_size"] == b["train_state"]["world_size"] == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (tmp_path / "torchrun" / "default" / "job.json").is_file()
    assert len(_results(tmp_path / "torchrun")) == 1  # rank 0 alone evaluated


def test_sweep_settings_are_named_by_overrides_and_candidate(tmp_path):
    from retrieval.experiment import Experiment
    from retrieval.sweep import candidates, device_slots, prepare_settings

    defaults = {"margin": 0.3, "epochs": 3, "num_workers": 2}
    exp = Experiment("x", {**defaults, "epochs": 1, "num_workers": 0}, tmp_path, defaults)
    todo, done = prepare_settings(exp, [{"margin": [0.2, 0.4]}])
    assert [name for name, _ in todo] == ["epochs-1_margin-0.2", "epochs-1_margin-0.4"] and not done
    params = json.loads((tmp_path / "epochs-1_margin-0.4" / "params.json").read_text())
    assert params["margin"] == 0.4 and params["epochs"] == 1 and params["tuning_params"] == ["margin"]
    (tmp_path / "epochs-1_margin-0.2" / "job.json").write_text("{}")
    todo, done = prepare_settings(exp, [{"margin": [0.2, 0.4]}])
    assert done == ["epochs-1_margin-0.2"] and [n for n, _ in todo] == ["epochs-1_margin-0.4"]
    assert len(candidates([{"a": [1, 2, 3], "b": [0, 1]}], "random", n_trials=4, seed=0)) == 4
    assert device_slots(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="--n-gpu"):
        device_slots(["0"], 2)
