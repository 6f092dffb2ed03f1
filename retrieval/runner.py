"""The experiment runner: one small file per experiment, the same verbs for all of them.

An experiment file holds a ``params`` dict and a search ``space`` and calls `main`::

    # experiments/v1.py
    from retrieval.runner import main
    params = {"architecture": "tf_efficientnet_lite0", "pooling": "gem", ...}
    space = [{"pooling": ["gem", "mac"]}]
    if __name__ == "__main__":
        main(params, space)

Verbs: ``predict`` (extract query/db features into HDF5) and ``evaluate`` (search, re-rank,
metrics, report). Outputs go under ``experiments/<name>/`` next to the experiment file:
``<setting>/features/<dataset>/<split>_<ss|ms>.h5``,
``<setting>/eval/<dataset>_<ss|ms>_<rerank>/{results.json, ranks.h5, ranked.html}`` and one
``results.csv`` per experiment. ``<setting>`` is ``pretrained`` for the default net, or the
checkpoint's folder/stem for ``-m``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from retrieval.data import RetrievalDataset, load_dataset
from retrieval.extract import MULTI_SCALES, extract_features
from retrieval.features import read_features
from retrieval.metrics import revisitop_map
from retrieval.models import RetrievalNet, create_model, load_checkpoint
from retrieval.report import append_results_csv, format_table, summary_row, write_json, write_ranked_html
from retrieval.rerank import RERANKERS, rerank_search
from retrieval.search import write_ranks

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


@dataclass
class Context:
    """What every verb needs: the experiment's params and where its outputs live."""

    name: str
    params: dict[str, Any]
    out_root: Path

    def setting_dir(self, checkpoint: Path | None) -> Path:
        if checkpoint is None:
            return self.out_root / "pretrained"
        return checkpoint.parent / checkpoint.stem

    def load_net(self, checkpoint: Path | None) -> RetrievalNet:
        if checkpoint is not None:
            return load_checkpoint(checkpoint)
        return create_model(**self.params)

    def dataset(self) -> RetrievalDataset:
        p = self.params
        return load_dataset(p["dataset"], p.get("data_root", "data"), p.get("synthetic_size", "default"),
                            int(p.get("seed", 0)))


def features_path(setting_dir: Path, dataset: str, split: str, ms: bool) -> Path:
    return setting_dir / "features" / dataset / f"{split}_{'ms' if ms else 'ss'}.h5"


def predict(ctx: Context, checkpoint: Path | None, ms: bool, splits: Sequence[str], device: torch.device,
            batch_size: int) -> list[Path]:
    """Extract features of the dataset's ``splits``; returns the features files."""
    p = ctx.params
    ds = ctx.dataset()
    net = ctx.load_net(checkpoint)
    scales = tuple(p.get("scales", MULTI_SCALES)) if ms else (1.0,)
    out = []
    for split in splits:
        path = features_path(ctx.setting_dir(checkpoint), ds.name, split, ms)
        extract_features(net, ds.split(split), path, image_size=int(p.get("image_size", 512)), scales=scales,
                         resize=p.get("resize", "long"), batch_size=batch_size,
                         num_workers=int(p.get("num_workers", 0)), device=device)
        out.append(path)
    return out


def align_features(ids: Sequence[str], feats: np.ndarray, wanted: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``feats`` for ``wanted`` ids: ``(rows, present)``; ids without features are absent."""
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    unknown = set(ids) - set(wanted)
    if unknown:
        raise ValueError(f"features hold {len(unknown)} ids not in the dataset, e.g. {sorted(unknown)[:3]}")
    rows = np.array([row_of.get(w, -1) for w in wanted], dtype=np.int64)
    return rows, rows >= 0


def evaluate(ctx: Context, checkpoint: Path | None, ms: bool, rerankers: Sequence[str], html_queries: int = 10
             ) -> list[dict[str, Any]]:
    """Search + re-rank + metrics + report for each re-ranking method; returns the results dicts."""
    p = ctx.params
    ds = ctx.dataset()
    setting_dir = ctx.setting_dir(checkpoint)
    loaded = {}
    for split in ("query", "db"):
        path = features_path(setting_dir, ds.name, split, ms)
        if not path.is_file():
            flags = f"{' -m ' + str(checkpoint) if checkpoint else ''}{' --ms' if ms else ''}"
            raise click.ClickException(f"{path}: features not found; run `predict{flags}` first")
        loaded[split] = read_features(path)
    (q_ids, q_feats, _), (db_ids, db_feats, _) = loaded["query"], loaded["db"]
    q_rows, q_ok = align_features(q_ids, q_feats, ds.queries.ids)
    db_rows, db_ok = align_features(db_ids, db_feats, ds.db.ids)
    if not db_ok.any():
        raise click.ClickException("no database image has features")
    db_index = np.flatnonzero(db_ok)  # dataset db index of each searchable row
    db_matrix = db_feats[db_rows[db_ok]]
    k = int(p.get("topk") or len(db_index))
    results = []
    for method in rerankers:
        scores_q, ranks_q = rerank_search(method, q_feats[q_rows[q_ok]], db_matrix, k, qe_n=int(p.get("qe_n", 2)),
                                          dba_n=int(p.get("dba_n", 2)), alpha=float(p.get("alpha", 3.0)))
        # Back to dataset indices; queries without features rank nothing (AP 0).
        ranks = np.full((len(ds.queries), ranks_q.shape[1]), -1, dtype=np.int64)
        scores = np.full(ranks.shape, np.nan, dtype=np.float32)
        ranks[q_ok] = np.where(ranks_q >= 0, db_index[ranks_q], -1)
        scores[q_ok] = scores_q
        features = "ms" if ms else "ss"
        out_dir = setting_dir / "eval" / f"{ds.name}_{features}_{method}"
        write_ranks(out_dir / "ranks.h5", ds.queries.ids, ds.db.ids, ranks, scores)
        res: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "experiment": ctx.name, "setting": setting_dir.name,
            "dataset": ds.name, "features": features, "rerank": method, "n_queries": len(ds.queries),
            "n_db": len(ds.db), "n_queries_missing": int((~q_ok).sum()), "n_db_missing": int((~db_ok).sum()),
            "checkpoint": str(checkpoint) if checkpoint else None, "params": ctx.params,
        }
        if ds.gnd:
            metrics = revisitop_map(ranks, ds.gnd)
            res["metrics"] = {proto: {k_: v for k_, v in m.items() if k_ != "aps"} for proto, m in metrics.items()}
            res["per_query_ap"] = {proto: m["aps"] for proto, m in metrics.items()}
        write_json(out_dir / "results.json", res)
        write_ranked_html(out_dir / "ranked.html", ds, ranks, scores, n_queries=html_queries,
                          title=f"{ctx.name}/{setting_dir.name}: {ds.name}, {features}, {method}")
        append_results_csv(ctx.out_root / "results.csv", summary_row(res))
        logger.info("%s: %s", out_dir, {p_: round(m["map"], 4) for p_, m in res.get("metrics", {}).items()})
        results.append(res)
    return results


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


def build_cli(params: dict[str, Any], space: Sequence[dict] | None = None, name: str | None = None) -> click.Group:
    """The click group of an experiment (kept separate from `main` so tests can invoke it)."""
    script = Path(sys.argv[0]).resolve()
    exp_name = name or script.stem

    @click.group(help=f"Experiment {exp_name}: params + verbs (predict, evaluate).")
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
        cctx.obj = Context(exp_name, p, out_root or script.parent / exp_name)

    model_opt = click.option("-m", "--model", "checkpoint", type=click.Path(path_type=Path, dir_okay=False),
                             default=None, help="checkpoint (.pth) [default: the pretrained net of params]")
    ms_opt = click.option("--ms", is_flag=True,
                          help=f"multi-scale descriptors (scales {params.get('scales', 'default')})")

    @cli.command("predict", help="Extract features of the dataset's splits into HDF5.")
    @model_opt
    @ms_opt
    @click.option("-b", "--batch-size", type=int, default=None)
    @click.option("-d", "--devices", default=None, help="device ids, e.g. 0 (no CUDA: CPU)")
    @click.option("--splits", default="query,db", show_default=True)
    @click.pass_obj
    def predict_cmd(ctx: Context, checkpoint: Path | None, ms: bool, batch_size: int | None, devices: str | None,
                    splits: str) -> None:
        devs = parse_devices(devices)
        if len(devs) > 1:
            logger.info("predict uses one device (%s); use multigpu-predict to spread over several", devs[0])
        paths = predict(ctx, checkpoint, ms, [s.strip() for s in splits.split(",") if s.strip()], devs[0],
                        batch_size or int(ctx.params.get("batch_size", 32)))
        for path in paths:
            click.echo(str(path))

    @cli.command("evaluate", help="Search, re-rank, compute metrics, write results and the HTML page.")
    @model_opt
    @ms_opt
    @click.option("--rerank", default="none", show_default=True,
                  help=f"comma-separated, from: {', '.join(RERANKERS)}")
    @click.option("--html-queries", type=int, default=10, show_default=True)
    @click.pass_obj
    def evaluate_cmd(ctx: Context, checkpoint: Path | None, ms: bool, rerank: str, html_queries: int) -> None:
        methods = [m.strip() for m in rerank.split(",") if m.strip()]
        bad = [m for m in methods if m not in RERANKERS]
        if bad:
            raise click.BadParameter(f"unknown {bad}; choose from {', '.join(RERANKERS)}", param_hint="--rerank")
        results = evaluate(ctx, checkpoint, ms, methods, html_queries)
        click.echo(format_table([summary_row(r) for r in results]))

    cli.space = list(space or [])  # the sweep verbs (tuning) read it
    return cli


def main(params: dict[str, Any], space: Sequence[dict] | None = None, argv: Sequence[str] | None = None) -> None:
    """Entry point of an experiment file."""
    build_cli(params, space)(args=argv)
