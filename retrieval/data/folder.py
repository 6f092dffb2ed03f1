"""An image folder described by a CSV: ``id,path[,landmark_id][,query][,domain]``.

- ``path`` (or ``image``) is relative to the CSV's folder unless absolute.
- ``id`` defaults to the path without its extension.
- ``landmark_id`` makes the set evaluable: images sharing it are relevant to each other.
- ``query`` (0/1) picks the queries; the other rows are the database. Without it, every
  labelled image is a query against all images (leave-one-out: the query itself is junk).
- ``domain`` (any name: ``landmarks``, ``products``, ...) groups images for per-domain evaluation
  (GUIE-style universal embeddings: mP@5 and mAP of each domain's queries).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from retrieval.data.dataset import ImageList, RetrievalDataset, gnd_from_labels

TRUE_VALUES = {"1", "true", "yes", "y", "t"}
FALSE_VALUES = {"0", "false", "no", "n", "f", ""}


def read_image_csv(csv_path: str | os.PathLike) -> list[dict]:
    """Rows as dicts with keys ``id``, ``path`` (Path), ``landmark_id`` (str or None), ``query`` (bool),
    ``domain`` (str or None)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: CSV file not found")
    base = csv_path.parent
    rows: list[dict] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        path_col = "path" if "path" in cols else "image" if "image" in cols else None
        if path_col is None:
            raise ValueError(f"{csv_path}: line 1: header needs a 'path' (or 'image') column, got {sorted(cols)}")
        seen: set[str] = set()
        for line, row in enumerate(reader, start=2):
            rel = (row.get(path_col) or "").strip()
            if not rel:
                raise ValueError(f"{csv_path}: line {line}: empty {path_col!r}")
            path = Path(rel) if Path(rel).is_absolute() else base / rel
            image_id = (row.get("id") or "").strip() or str(Path(rel).with_suffix("")).replace(os.sep, "/")
            if image_id in seen:
                raise ValueError(f"{csv_path}: line {line}: duplicate id {image_id!r}")
            seen.add(image_id)
            label = (row.get("landmark_id") or "").strip() or None
            flag = (row.get("query") or "").strip().lower()
            if flag not in TRUE_VALUES | FALSE_VALUES:
                raise ValueError(f"{csv_path}: line {line}: query must be 0 or 1, got {row.get('query')!r}")
            rows.append({"id": image_id, "path": path, "landmark_id": label, "query": flag in TRUE_VALUES,
                         "domain": (row.get("domain") or "").strip() or None})
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    return rows


def load_folder(csv_path: str | os.PathLike, name: str | None = None) -> RetrievalDataset:
    """A `RetrievalDataset` from an image CSV (see the module docstring for the rules)."""
    csv_path = Path(csv_path)
    rows = read_image_csv(csv_path)
    name = name or csv_path.parent.name
    if any(r["query"] for r in rows):
        q_rows = [r for r in rows if r["query"]]
        db_rows = [r for r in rows if not r["query"]]
    else:
        q_rows = [r for r in rows if r["landmark_id"] is not None]
        db_rows = rows
    queries = ImageList([r["id"] for r in q_rows], [r["path"] for r in q_rows])
    db = ImageList([r["id"] for r in db_rows], [r["path"] for r in db_rows])
    gnd: list[dict] = []
    if all(r["landmark_id"] is not None for r in q_rows):
        gnd = gnd_from_labels([r["landmark_id"] for r in q_rows], [r["landmark_id"] for r in db_rows],
                              queries.ids, db.ids)
    labels = {r["id"]: r["landmark_id"] for r in rows if r["landmark_id"] is not None}
    domains = {r["id"]: r["domain"] for r in rows if r["domain"] is not None}
    return RetrievalDataset(name=name, queries=queries, db=db, gnd=gnd, labels=labels, domains=domains)
