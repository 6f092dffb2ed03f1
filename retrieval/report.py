"""Results: ``results.json``, a row in ``results.csv``, a printed table, an HTML page of ranked thumbnails.

``python -m retrieval.report table results.csv [--dataset NAME]`` prints the latest row of each
setting in a results CSV.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw, ImageOps

from retrieval.data.dataset import RetrievalDataset
from retrieval.data.images import ImageLoadError, load_image

PROTOCOLS = ("easy", "medium", "hard")
# Columns that identify a setting; later rows of the same setting replace earlier ones in a table.
KEY_COLUMNS = ("experiment", "setting", "dataset", "features", "rerank")
# how re-ranking steps are printed in tables
STEP_LABELS = {"qe": "AQE", "aqe": "αQE", "adba": "αDBA", "diffusion": "diffusion", "kreciprocal": "k-reciprocal",
               "l2019": "L2019 sort+insert", "sv": "SV"}


def _write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to ``<name>.tmp``, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return _write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [None if (isinstance(x, float) and np.isnan(x)) else x for x in v.tolist()]
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")


def summary_row(results: dict) -> dict[str, Any]:
    """The flat CSV row of one evaluation (metrics as percentages, like the papers print them)."""
    row = {k: results.get(k, "") for k in ("time", *KEY_COLUMNS, "n_queries", "n_db")}
    for proto in PROTOCOLS:
        m = results.get("metrics", {}).get(proto, {})
        row[f"map_{proto[0]}"] = _pct(m.get("map"))
        row[f"mp10_{proto[0]}"] = _pct(m.get("mp@10"))
    row["mp5"] = _pct(results.get("mp@5"))  # GUIE mP@5
    row["mp5_domains"] = " ".join(f"{d}:{_pct(m.get('mp@5'))}" for d, m in results.get("domains", {}).items())
    row["map100"] = _pct(results.get("metrics", {}).get("gldv2", {}).get("map@100"))  # GLDv2's protocol
    spq = results.get("seconds_per_query")
    row["s_per_query"] = "" if spq is None else f"{float(spq):.4g}"
    row["params"] = json.dumps(results.get("params", {}), sort_keys=True, default=str)
    return row


def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.2f}"


def append_results_csv(path: str | os.PathLike, row: dict[str, Any]) -> Path:
    """Append ``row`` under a file lock (parallel jobs share one CSV); the header is written once.

    A file written by an older version with other columns is rewritten with the union of both.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        new = not path.is_file() or path.stat().st_size == 0
        if not new:
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if header != list(row):
                write_csv_rows(path, [*read_results_csv(path), row])
                return path
        with path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
    return path


def read_results_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def latest_rows(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The last row of each setting, in the order settings first appeared."""
    latest: dict[tuple, dict[str, str]] = {}
    for row in rows:
        key = tuple(row.get(k, "") for k in KEY_COLUMNS)
        latest.pop(key, None)
        latest[key] = row
    return list(latest.values())


def _setting_folder(row: dict[str, str]) -> str:
    return row.get("setting", "").split("/")[0]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: method, mAP E/M/H, mP@10 E/M/H (percent), GLDv2 mAP@100 and GUIE mP@5 when a
    row has them, seconds per query."""
    gldv2 = any(r.get("map100") for r in rows)
    guie = any(r.get("mp5") for r in rows)
    head = ["dataset", "method", "mAP E", "mAP M", "mAP H", "mP@10 E", "mP@10 M", "mP@10 H",
            *(["mAP@100"] if gldv2 else []), *(["mP@5"] if guie else []), "s/query"]
    body = [[str(r.get("dataset", "")), method_label(r), *(str(r.get(f"map_{p[0]}", "")) for p in PROTOCOLS),
             *(str(r.get(f"mp10_{p[0]}", "")) for p in PROTOCOLS), *([str(r.get("map100", ""))] if gldv2 else []),
             *([str(r.get("mp5", ""))] if guie else []),
             str(r.get("s_per_query", ""))] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def method_label(row: dict[str, Any]) -> str:
    """``GeM MS + αDBA + αQE`` style label of a results row."""
    params = row.get("params") or {}
    if isinstance(params, str):
        params = json.loads(params) if params else {}
    pooling = {"gem": "GeM", "mac": "MAC", "spoc": "SPoC", "rmac": "R-MAC", "cls": "CLS token",
               "avg_tokens": "mean of tokens", "gem_tokens": "GeM of tokens"}.get(params.get("pooling"), "")
    features = {"ss": "single-scale", "ms": "multi-scale"}.get(row.get("features", ""), row.get("features", ""))
    if params.get("fc_dim"):
        pooling += f" + FC{params['fc_dim']}"
    setting = row.get("setting", "")
    prefix = f"{row.get('experiment', '')}/{setting}: ".lstrip("/") if setting and setting != "pretrained" else ""
    steps = [s for s in str(row.get("rerank") or "none").split("+") if s != "none"]
    rerank = "".join(f" + {STEP_LABELS.get(s, s)}" for s in steps)
    return f"{prefix}{pooling} {features}{rerank}".strip()


def write_csv_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Rewrite a whole CSV atomically; columns are the union of the rows' keys, in first-seen order."""
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return _write_text_atomic(path, buf.getvalue())


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_training(path: str | os.PathLike, history: Sequence[dict[str, Any]]) -> Path:
    """A PNG of loss and accuracy, learning rate and validation mAP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    trained = [r for r in history if "loss" in r]  # epoch 0: validation before training only
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["epoch"] for r in trained], [r["loss"] for r in trained], "o-", label="loss")
    acc = axes[0].twinx()
    acc.plot([r["epoch"] for r in trained], [r["acc"] for r in trained], "s--", color="tab:orange",
             label="train accuracy")
    axes[0].set(title="training loss / accuracy", xlabel="epoch", ylabel="loss")
    acc.set_ylabel("accuracy")
    axes[1].plot([r["epoch"] for r in trained], [r["lr"] for r in trained], "o-")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
    for proto in PROTOCOLS:
        values = [_float(r.get(f"val_{proto}")) for r in history]
        if not all(np.isnan(values)):  # e.g. no Hard positives in a leave-one-out validation
            axes[2].plot(epochs, [100 * v for v in values], "o-", label=proto)
    axes[2].set(title="validation mAP (%)", xlabel="epoch")
    if axes[2].lines:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- HTML page of ranked thumbnails

COLOURS = {"positive": "#2e9e44", "negative": "#d62828", "junk": "#9a9a9a", "query": "#1f5fbf"}


def _thumb(path: Path, size: int, bbx: Sequence[float] | None = None) -> str:
    """A data-URI JPEG thumbnail (the box, if any, drawn in the query colour)."""
    try:
        img = load_image(path)
    except ImageLoadError as err:
        img = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(img).text((4, size // 2), f"unreadable: {err}"[:40], fill="black")
    if bbx is not None:
        draw = ImageDraw.Draw(img)
        draw.rectangle([float(v) for v in bbx], outline=COLOURS["query"], width=max(2, img.width // 100))
    img = ImageOps.contain(img, (size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_ranked_html(path: str | os.PathLike, dataset: RetrievalDataset, ranks: np.ndarray,
                      scores: np.ndarray | None = None, n_queries: int = 10, top: int = 10,
                      title: str = "", thumb_size: int = 160) -> Path:
    """One row per query: the query (its box drawn), then its top results framed by relevance.

    Frames: green = positive (easy or hard), grey = junk, red = negative. ``ranks`` index
    ``dataset.db`` (-1 = no result). Thumbnails are embedded, so the page is one portable file.
    """
    rows = []
    for qi in range(min(n_queries, len(dataset.queries))):
        g = dataset.gnd[qi] if dataset.gnd else {}
        pos = set(g.get("easy", [])) | set(g.get("hard", []))
        junk = set(g.get("junk", []))
        q_src = _thumb(dataset.queries.paths[qi], thumb_size, dataset.queries.bbx(qi))
        cells = [f'<td class="q"><img src="{q_src}" style="border-color:{COLOURS["query"]}">'
                 f'<div>{html.escape(dataset.queries.ids[qi])}</div></td>']
        for r, j in enumerate(ranks[qi][:top]):
            if j < 0:
                continue
            kind = "positive" if j in pos else "junk" if j in junk else "negative" if dataset.gnd else "unknown"
            colour = COLOURS.get(kind, "#cccccc")
            score = f" {scores[qi][r]:.3f}" if scores is not None else ""
            cells.append(f'<td><img src="{_thumb(dataset.db.paths[j], thumb_size)}" style="border-color:{colour}" '
                         f'title="{html.escape(dataset.db.ids[j])} ({kind})"><div>#{r + 1}{score}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    legend = " ".join(f'<span style="color:{c}">■ {k}</span>' for k, c in COLOURS.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title or dataset.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
td {{ text-align: center; vertical-align: top; font-size: 11px; padding: 3px; }}
td img {{ border: 5px solid; max-width: {thumb_size}px; max-height: {thumb_size}px; }}
td.q {{ border-right: 2px solid #444; padding-right: 8px; }}
</style></head><body>
<h2>{html.escape(title or dataset.name)}</h2><p>{legend}</p>
<table>{"".join(rows)}</table>
</body></html>
"""
    return _write_text_atomic(path, page)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m retrieval.report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print the latest row of each setting of a results.csv")
    table.add_argument("csv", type=Path, nargs="+", help="one or more results.csv (rows shown in that order)")
    table.add_argument("--dataset", default=None, help="only rows of this dataset")
    table.add_argument("--setting", default=None, metavar="SETTING,...",
                       help="only rows of these training settings (folders such as default or margin-0.4), "
                            "in this order")
    table.add_argument("--select", default=None, metavar="FEATURES:RERANK,...",
                       help="only these rows, in this order, e.g. ss:none,ms:none,ms:aqe")
    args = parser.parse_args(argv)
    wanted = [tuple(w.strip().split(":", 1)) for w in (args.select or "").split(",") if w.strip()]
    settings = [s.strip() for s in (args.setting or "").split(",") if s.strip()]
    rows = []
    for path in args.csv:
        if not path.is_file():
            print(f"error: {path}: results file not found", file=sys.stderr)
            return 2
        found = latest_rows(read_results_csv(path))
        if args.dataset:
            found = [r for r in found if r.get("dataset") == args.dataset]
        if settings:  # the column holds the setting folder, or <setting>/<checkpoint stem>
            found = sorted((r for r in found if _setting_folder(r) in settings),
                           key=lambda r: settings.index(_setting_folder(r)))
        if wanted:  # the asked rows of each setting, in the asked order
            by_key = {(r.get("setting"), r.get("features"), r.get("rerank")): r for r in found}
            chosen = []
            for setting in dict.fromkeys(r.get("setting") for r in found):
                missing = [":".join(w) for w in wanted if (setting, *w) not in by_key]
                if missing:
                    print(f"error: {path}: no rows of {setting} for {', '.join(missing)}", file=sys.stderr)
                    return 2
                chosen += [by_key[(setting, *w)] for w in wanted]
            if not chosen:
                print(f"error: {path}: no rows for {args.select}", file=sys.stderr)
                return 2
            found = chosen
        rows += found
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
