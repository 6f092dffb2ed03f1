"""The experiment runner: one small file per experiment, the same verbs for all of them.

An experiment file holds a ``params`` dict and a search ``space`` and calls `main`::

    # experiments/v2.py
    from retrieval.runner import main
    params = {"architecture": "tf_efficientnet_lite0", "pooling": "gem", "loss": "arcface", ...}
    space = [{"margin": [0.3, 0.4]}]
    if __name__ == "__main__":
        main(params, space)

This module only wires verbs to the stage modules: ``predict`` / ``multigpu-predict`` /
``evaluate`` / ``submit`` / ``job`` / ``index`` / ``whiten`` / ``ensemble`` (`retrieval.experiment`,
over `retrieval.evaluate`, `retrieval.index`, `retrieval.postprocess`), ``tuning`` (`retrieval.sweep`),
``launch-slurm`` / ``launch-qsub`` (`retrieval.launch`), ``clean`` (`retrieval.cleaning`), ``serve``
(`retrieval.api`) and ``export`` (`retrieval.export`). Outputs go under ``experiments/<name>/`` next to
the experiment file (layout in `retrieval.experiment`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import torch

from retrieval.experiment import (
    Experiment,
    build_experiment_index,
    evaluate,
    learn_experiment_whitening,
    make_ensemble,
    predict,
    run_job,
    submit,
)
from retrieval.launch import launch_qsub, launch_slurm
from retrieval.report import format_table, summary_row
from retrieval.rerank import RANKING_STEPS, VECTOR_STEPS, parse_method
from retrieval.sweep import run_sweep

logger = logging.getLogger(__name__)


def parse_devices(spec: str | None) -> list[torch.device]:
    """``-d 0,1`` → CUDA devices 0 and 1; without CUDA, that many CPU slots (all ``cpu``)."""
    if spec is None or spec.strip() in ("", "cpu"):
        return [torch.device("cpu")]
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if not parts or not all(s.isdigit() for s in parts):
        raise click.BadParameter(f"expected device ids like 0,1,2 or 'cpu', got {spec!r}", param_hint="-d")
    ids = [int(s) for s in parts]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        bad = [i for i in ids if i >= n]
        if bad:
            raise click.BadParameter(f"CUDA device(s) {bad} not present ({n} visible)", param_hint="-d")
        return [torch.device(f"cuda:{i}") for i in ids]
    return [torch.device("cpu") for _ in ids]


def _parse_overrides(values: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _split(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def _rerank_methods(value: str) -> list[str]:
    methods = _split(value)
    for method in methods:
        try:
            parse_method(method)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--rerank") from None
    return methods


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a stage; its bad-input errors become one-line CLI errors."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None


def build_cli(params: dict[str, Any], space: Sequence[dict] | None = None, name: str | None = None,
              script: Path | None = None) -> click.Group:
    """The click group of an experiment (kept separate from `main` so tests can invoke it)."""
    script = (script or Path(sys.argv[0])).resolve()
    exp_name = name or script.stem
    space = list(space or [])

    @click.group(help=f"Experiment {exp_name}: params + verbs.")
    @click.option("--out-root", type=click.Path(path_type=Path), default=None,
                  help="where outputs go [default: experiments/<name>/ beside the experiment file]")
    @click.option("--dataset", default=None, help="synthetic | roxford5k | rparis6k | gldv2 | folder:<csv>")
    @click.option("--data-root", type=click.Path(path_type=Path), default=None, help="datasets folder")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a param (JSON value)")
    @click.option("-v", "--verbose", is_flag=True)
    @click.pass_context
    def cli(cctx: click.Context, out_root: Path | None, dataset: str | None, data_root: Path | None,
            overrides: Sequence[str], verbose: bool) -> None:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        p = {**params, **_parse_overrides(overrides)}
        if dataset:
            p["dataset"] = dataset
        if data_root:
            p["data_root"] = str(data_root)
        cctx.obj = Experiment(exp_name, p, (out_root or script.parent / exp_name).resolve(), dict(params))
        # the group options again, for the command lines of sweeps and cluster jobs
        cctx.meta["group_args"] = [*(["--dataset", dataset] if dataset else []),
                                   *(["--data-root", str(data_root)] if data_root else []),
                                   *(a for o in overrides for a in ("--set", o))]

    model_opt = click.option("-m", "--model", "checkpoint", type=click.Path(path_type=Path, dir_okay=False),
                             default=None, help="checkpoint (.pth) [default: the pretrained net of params]")
    ms_opt = click.option("--ms", is_flag=True,
                          help=f"multi-scale descriptors (scales {params.get('scales', 'default')})")
    devices_opt = click.option("-d", "--devices", default=None, help="device ids, e.g. 0,1 (no CUDA: CPU processes)")

    def predict_options(fn: Any) -> Any:
        for opt in reversed([model_opt, ms_opt, click.option("-b", "--batch-size", type=int, default=None,
                                                             help="images per forward batch [default: params "
                                                                  "batch_size_eval]"),
                             devices_opt, click.option("--splits", default="query,db", show_default=True,
                                                       help="query (test), db (index), train"),
                             click.option("--scale", default=None,
                                          help="image sizing: exact (each image by params resize), aspect (aspect "
                                               "buckets, long side image_size) or a template set (L2, L, M, S, ...: "
                                               "Landmark2019's) [default: params scale, auto per dataset]"),
                             click.option("-n", "--n-blocks", type=int, default=None,
                                          help="cut the images into N blocks (shards), e.g. one per array task"),
                             click.option("-i", "--block-id", type=int, default=None,
                                          help="do only this block (0-based); without it all, then merge")]):
            fn = opt(fn)
        return fn

    def _predict(exp: Experiment, checkpoint: Path | None, ms: bool, batch_size: int | None,
                 devices: list[torch.device], splits: str, scale: str | None, n_blocks: int | None,
                 block_id: int | None) -> None:
        paths = _run(predict, exp, checkpoint, ms, _split(splits), devices,
                     batch_size or int(exp.params.get("batch_size_eval") or exp.params.get("batch_size", 32)),
                     n_blocks, block_id, scale)
        for path in paths:
            click.echo(str(path))

    @cli.command("predict", help="Extract features of the dataset's splits into HDF5 (one device).")
    @predict_options
    @click.pass_obj
    def predict_cmd(exp: Experiment, checkpoint: Path | None, ms: bool, batch_size: int | None,
                    devices: str | None, splits: str, scale: str | None, n_blocks: int | None,
                    block_id: int | None) -> None:
        devs = parse_devices(devices)
        if len(devs) > 1:
            logger.info("predict uses one device (%s); multigpu-predict spreads over all of -d", devs[0])
        _predict(exp, checkpoint, ms, batch_size, devs[:1], splits, scale, n_blocks, block_id)

    @cli.command("multigpu-predict", help="predict with one process per device of -d (CPU processes without "
                                          "CUDA), each a contiguous block into its own resumable shard; merged by id "
                                          "into predict's file.")
    @predict_options
    @click.pass_obj
    def multigpu_predict_cmd(exp: Experiment, checkpoint: Path | None, ms: bool, batch_size: int | None,
                             devices: str | None, splits: str, scale: str | None, n_blocks: int | None,
                             block_id: int | None) -> None:
        _predict(exp, checkpoint, ms, batch_size, parse_devices(devices), splits, scale, n_blocks, block_id)

    ensemble_opt = click.option("--ensemble", default=None, metavar="NAME",
                                help="the features of an ensemble (the ensemble verb) instead of one net's")

    def search_options(fn: Any) -> Any:
        for opt in reversed([
                click.option("--index", "index", default=None, metavar="FACTORY",
                             help="search the saved index of this FAISS factory string (the index verb) "
                                  "[default: params index; none: exact]"),
                click.option("--nprobe", type=int, default=None, help="IVF cells searched [default: the index's]"),
                click.option("--efsearch", type=int, default=None, help="HNSW efSearch [default: the index's]"),
                click.option("--k-factor", type=int, default=None,
                             help="a refine stage (...,RFlat): candidates re-ranked exactly per result "
                                  "[default: the index's]"),
                click.option("--whiten", default=None, metavar="NAME",
                             help="apply the whitening learned by `whiten --name NAME` [default: params whiten]")]):
            fn = opt(fn)
        return fn

    def _set_search(exp: Experiment, **values: Any) -> None:
        """Search options override the params of the same name (so results.json records them)."""
        exp.params.update({k: v for k, v in values.items() if v is not None})

    @cli.command("evaluate", help="Search, re-rank, compute metrics, write results and the HTML page.")
    @model_opt
    @ms_opt
    @click.option("--rerank", default="none", show_default=True,
                  help=f"comma-separated methods, each a chain of {', '.join((*VECTOR_STEPS, *RANKING_STEPS))} "
                       "joined by + (e.g. adba+aqe+diffusion), or none")
    @click.option("--topk", type=int, default=None,
                  help="results kept per query [default: params topk, else the whole database when small, "
                       "100 for GLDv2]")
    @search_options
    @ensemble_opt
    @click.option("--html-queries", type=int, default=10, show_default=True)
    @click.pass_obj
    def evaluate_cmd(exp: Experiment, checkpoint: Path | None, ms: bool, rerank: str, topk: int | None,
                     index: str | None, nprobe: int | None, efsearch: int | None, k_factor: int | None,
                     whiten: str | None, ensemble: str | None, html_queries: int) -> None:
        methods = _rerank_methods(rerank)
        _set_search(exp, topk=topk, index=index, nprobe=nprobe, efsearch=efsearch, k_factor=k_factor, whiten=whiten)
        if str(exp.params.get("index")).lower() in ("none", "exact"):
            exp.params["index"] = None
        results = _run(evaluate, exp, checkpoint, ms, methods, html_queries, ensemble)
        click.echo(format_table([summary_row(r) for r in results]))

    @cli.command("index", help="Build a FAISS index of the database features (factory string) and save it "
                               "for evaluate / serve.")
    @model_opt
    @ms_opt
    @click.option("--factory", required=True, help="FAISS index-factory string: Flat, IVF4096,Flat, IVF4096,PQ64, "
                                                   "HNSW32, ... (inner product on L2-normalised rows)")
    @click.option("--train-rows", type=int, default=None,
                  help="rows sampled to train it [default: 64 per IVF cell, at least 65536]")
    @click.option("--nprobe", type=int, default=None, help="saved IVF search default [default: nlist/64]")
    @click.option("--efsearch", type=int, default=None, help="saved HNSW search default [default: 64]")
    @click.option("--k-factor", type=int, default=None, help="saved refine-stage default (...,RFlat) [default: 16]")
    @click.option("--whiten", default=None, metavar="NAME", help="index the rows whitened by NAME")
    @click.option("--knn-graph", "knn_graph_k", type=int, default=None, metavar="K",
                  help="also store the database's K-NN graph (HDF5) searched in this index")
    @ensemble_opt
    @click.pass_obj
    def index_cmd(exp: Experiment, checkpoint: Path | None, ms: bool, factory: str, train_rows: int | None,
                  nprobe: int | None, efsearch: int | None, k_factor: int | None, whiten: str | None,
                  knn_graph_k: int | None, ensemble: str | None) -> None:
        _set_search(exp, whiten=whiten)
        out = _run(build_experiment_index, exp, checkpoint, ms, factory, ensemble, train_rows,
                   {"nprobe": nprobe, "efsearch": efsearch, "k_factor": k_factor}, knn_graph_k)
        click.echo(str(out))

    @cli.command("whiten", help="Learn a PCA-whitening (optional shrinkage / fewer dims) on a separate set; "
                                "evaluate --whiten NAME applies it.")
    @model_opt
    @ms_opt
    @click.option("--name", required=True, help="the whitening's name: <net dir>/whiten/<name>.h5")
    @click.option("--learn-on", default="train", show_default=True,
                  help="train (the label set's features: predict --splits train) or a features file")
    @click.option("--dim", type=int, default=None, help="components kept [default: all]")
    @click.option("--shrinkage", type=float, default=1.0, show_default=True,
                  help="power s of Λ^(-s/2): 1 full whitening, 0 PCA rotation only")
    @ensemble_opt
    @click.pass_obj
    def whiten_cmd(exp: Experiment, checkpoint: Path | None, ms: bool, name: str, learn_on: str, dim: int | None,
                   shrinkage: float, ensemble: str | None) -> None:
        click.echo(str(_run(learn_experiment_whitening, exp, checkpoint, ms, name, learn_on, dim, shrinkage,
                            ensemble)))

    @cli.command("ensemble", help="Combine several nets' features of the same images (concat with weights or "
                                  "mean) into ensembles/NAME; evaluate --ensemble NAME scores them.")
    @click.argument("name")
    @click.option("-m", "--model", "checkpoints", multiple=True, required=True,
                  help="a member net: its checkpoint (.pth), or 'pretrained'; repeat for each")
    @ms_opt
    @click.option("--weights", default=None, help="comma-separated, one per -m (Landmark2019: 0.5,1,1,0.5,1,1) "
                                                  "[default: all 1]")
    @click.option("--mode", type=click.Choice(["concat", "mean"]), default="concat", show_default=True)
    @click.option("--splits", default="query,db", show_default=True)
    @click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                  help="storage of the combined rows (read back as float32)")
    @click.pass_obj
    def ensemble_cmd(exp: Experiment, name: str, checkpoints: tuple[str, ...], ms: bool, weights: str | None,
                     mode: str, splits: str, dtype: str) -> None:
        try:
            values = [float(w) for w in _split(weights)] if weights is not None else None
        except ValueError:
            raise click.BadParameter(f"expected numbers like 0.5,1, got {weights!r}", param_hint="--weights") from None
        members = [None if c == "pretrained" else Path(c) for c in checkpoints]
        for path in _run(make_ensemble, exp, name, members, ms, values, mode, _split(splits), dtype):
            click.echo(str(path))

    @cli.command("submit", help="Write the Kaggle retrieval and recognition files (queries = test, db = index).")
    @model_opt
    @ms_opt
    @click.option("--rerank", default="none", show_default=True, help="one chain, as in evaluate")
    @click.pass_obj
    def submit_cmd(exp: Experiment, checkpoint: Path | None, ms: bool, rerank: str) -> None:
        methods = _rerank_methods(rerank)
        if len(methods) != 1:
            raise click.BadParameter("give one method", param_hint="--rerank")
        for kind, path in _run(submit, exp, checkpoint, ms, methods[0]).items():
            click.echo(f"{kind}: {path}")

    @cli.command("job", help="Train one setting, then extract and evaluate it (resumes a killed run).")
    @devices_opt
    @click.option("--params-path", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
                  help="a params.json overriding the experiment's params (what tuning writes)")
    @click.option("--resume", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
                  help="training checkpoint to continue [default: <setting>/last.pth when present]")
    @click.option("--setting", default=None, help="setting folder name [default: from the overridden params]")
    @click.pass_obj
    def job_cmd(exp: Experiment, devices: str | None, params_path: Path | None, resume: Path | None,
                setting: str | None) -> None:
        if params_path is not None:
            exp = Experiment(exp.name, {**exp.params, **json.loads(params_path.read_text())}, exp.out_root,
                             exp.defaults)
        record = _run(run_job, exp, parse_devices(devices), setting, resume)
        if record is not None:
            click.echo(json.dumps(record, indent=1))

    @cli.command("tuning", help="Sweep the experiment's search space, --n-gpu devices per job.")
    @devices_opt
    @click.option("--n-gpu", type=int, default=1, show_default=True, help="devices per job")
    @click.option("--mode", type=click.Choice(["grid", "random"]), default="grid", show_default=True)
    @click.option("--n-trials", type=int, default=10, show_default=True, help="settings drawn in random mode")
    @click.pass_context
    def tuning_cmd(cctx: click.Context, devices: str | None, n_gpu: int, mode: str, n_trials: int) -> None:
        exp: Experiment = cctx.obj
        ids = _split(devices or "0")
        status = _run(run_sweep, exp, space, script, ids, n_gpu, mode, n_trials, cctx.meta["group_args"])
        click.echo(json.dumps(status, indent=1))
        if status["failed"]:
            raise click.ClickException(f"{len(status['failed'])} setting(s) failed: {status['failed']}")

    @cli.command("clean", help="Clean a noisy training list (Landmark2019: kNN + spatial verification) into "
                               "cleaned_subsets/<name>.csv.")
    @click.option("--train-csv", "train_csv", required=True,
                  help="the noisy list: GLDv2 train.csv (id,url,landmark_id) or landmark_id,images CSV, or a "
                       "train-set name (synthetic-noisy, gldv2-full, ...)")
    @model_opt
    @click.option("--name", required=True, help="output name: <out-dir>/<name>.csv and .json")
    @click.option("--freq-threshold", type=int, default=3, show_default=True,
                  help="same-landmark (verified) neighbours an image needs")
    @click.option("--inlier-threshold", type=int, default=30, show_default=True,
                  help="RANSAC inliers that verify a neighbour")
    @click.option("--k", "k", type=int, default=100, show_default=True, help="neighbours looked at")
    @click.option("--no-verify", is_flag=True, help="embedding only: count same-landmark neighbours")
    @click.option("--image-root", type=click.Path(path_type=Path, file_okay=False), default=None,
                  help="folder holding train/<a>/<b>/<c>/<id>.jpg [default: params gldv2_root]")
    @click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("cleaned_subsets"),
                  show_default=True)
    @click.option("--workers", type=int, default=2, show_default=True, help="verification processes")
    @devices_opt
    @click.pass_obj
    def clean_cmd(exp: Experiment, train_csv: str, checkpoint: Path | None, name: str, freq_threshold: int,
                  inlier_threshold: int, k: int, no_verify: bool, image_root: Path | None, out_dir: Path,
                  workers: int, devices: str | None) -> None:
        from retrieval.cleaning import CleanSettings, clean_experiment

        settings = _run(CleanSettings, k=k, freq_threshold=freq_threshold, inlier_threshold=inlier_threshold,
                        verify=not no_verify, workers=workers)
        record = _run(clean_experiment, exp, train_csv, checkpoint, name, settings, out_dir, image_root,
                      parse_devices(devices))
        click.echo(json.dumps(record, indent=1))

    @cli.command("serve", help="Serve a features file over HTTP: search by image or id, a page, thumbnails "
                               "(the serve extra).")
    @model_opt
    @click.option("--features", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=True,
                  help="the database's features HDF5 (what predict wrote)")
    @click.option("--images", type=click.Path(path_type=Path, exists=True), default=None,
                  help="an image CSV (id,path[,landmark_id]) or folder for thumbnails and landmark ids "
                       "[default: the experiment's dataset]")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=int, default=8000, show_default=True)
    @click.option("--rerank", default="none", show_default=True,
                  help="comma-separated chains the server offers (e.g. aqe,adba+aqe+diffusion)")
    @click.option("--index", "index_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
                  help="a saved index of --features (the folder the index verb printed) [default: exact search]")
    @devices_opt
    @click.pass_obj
    def serve_cmd(exp: Experiment, checkpoint: Path | None, features: Path, images: Path | None, host: str,
                  port: int, rerank: str, index_dir: Path | None, devices: str | None) -> None:
        try:
            from retrieval.api import serve
        except ImportError as err:
            raise click.ClickException(f"serve needs the serve extra (pip install 'landmark-retrieval[serve]'): "
                                       f"{err}") from None
        exp.out_root.mkdir(parents=True, exist_ok=True)
        _run(serve, exp, checkpoint, features, images, host, port, _rerank_methods(rerank),
             parse_devices(devices)[0], index_dir)

    @cli.command("export", help="Write model.onnx / model.ts and preprocess.json: an image tensor in, the "
                                "L2-normalised embedding out (checked against PyTorch).")
    @model_opt
    @click.option("--format", "formats", default="onnx,torchscript", show_default=True,
                  help="comma-separated: onnx, torchscript")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                  help="output folder [default: <setting>/<ckpt>/export]")
    @click.option("--image-size", type=int, default=None, help="input size [default: params image_size]")
    @click.pass_obj
    def export_cmd(exp: Experiment, checkpoint: Path | None, formats: str, out_dir: Path | None,
                   image_size: int | None) -> None:
        from retrieval.export import export_experiment

        click.echo(str(_run(export_experiment, exp, checkpoint, _split(formats), out_dir, image_size)))

    cluster_verbs = click.Choice(["job", "tuning", "multigpu-predict"])

    @cli.command("launch-slurm", context_settings={"ignore_unknown_options": True},
                 help="Submit job / tuning / multigpu-predict to Slurm through submitit (one setting or block "
                      "per array task; --nodes > 1: torchrun rendezvous).")
    @click.argument("verb", type=cluster_verbs)
    @click.argument("verb_args", nargs=-1, type=click.UNPROCESSED)
    @click.option("--partition", default=None)
    @click.option("--nodes", type=int, default=1, show_default=True)
    @click.option("--gpus-per-node", type=int, default=1, show_default=True)
    @click.option("--cpus-per-task", type=int, default=8, show_default=True)
    @click.option("--timeout-min", type=int, default=1440, show_default=True)
    @click.option("--mem-gb", type=float, default=None)
    @click.option("--array-parallelism", type=int, default=None)
    @click.option("--folder", type=click.Path(path_type=Path), default=None,
                  help="submitit logs [default: <out-root>/slurm]")
    @click.option("--cluster", default=None, help="submitit cluster (local / debug run here, for trying)")
    @click.pass_context
    def launch_slurm_cmd(cctx: click.Context, verb: str, verb_args: tuple[str, ...], **options: Any) -> None:
        jobs = _run(launch_slurm, cctx.obj, space, script, cctx.meta["group_args"], verb, list(verb_args),
                    **options)
        for line in jobs:
            click.echo(line)

    @cli.command("launch-qsub", context_settings={"ignore_unknown_options": True},
                 help="Write an SGE job script for job / tuning / multigpu-predict and qsub it (printed when "
                      "qsub is absent).")
    @click.argument("verb", type=cluster_verbs)
    @click.argument("verb_args", nargs=-1, type=click.UNPROCESSED)
    @click.option("--resource", "resources", multiple=True, default=("rt_G.small=1",), show_default=True,
                  metavar="TYPE=N", help="an SGE resource request (ABCI: rt_F=1, rt_G.large=1, ...)")
    @click.option("--gpus-per-node", type=int, default=1, show_default=True, help="devices each task uses")
    @click.option("--walltime", default="24:00:00", show_default=True)
    @click.option("--template", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None)
    @click.pass_context
    def launch_qsub_cmd(cctx: click.Context, verb: str, verb_args: tuple[str, ...], **options: Any) -> None:
        for line in _run(launch_qsub, cctx.obj, space, script, cctx.meta["group_args"], verb,
                         list(verb_args), **options):
            click.echo(line)

    cli.space = space
    return cli


def main(params: dict[str, Any], space: Sequence[dict] | None = None, argv: Sequence[str] | None = None) -> None:
    """Entry point of an experiment file."""
    build_cli(params, space)(args=argv)
