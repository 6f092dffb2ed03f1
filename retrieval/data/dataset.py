"""The in-memory form every retrieval benchmark is loaded into.

A benchmark is a list of query images, a list of database images and, per query, the
revisitop ground-truth record (``easy``, ``hard``, ``junk`` index lists into the database,
optional ``bbx``). ROxf/RPar, the built-in synthetic benchmark and user image folders all
load into this one form, so one evaluation path serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BBox = tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels


@dataclass(frozen=True)
class ImageList:
    """Images of one split: ids, file paths and optional crop boxes, aligned by row."""

    ids: list[str]
    paths: list[Path]
    bbxs: list[BBox | None] | None = None

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.paths):
            raise ValueError(f"ImageList: {len(self.ids)} ids but {len(self.paths)} paths")
        if self.bbxs is not None and len(self.bbxs) != len(self.ids):
            raise ValueError(f"ImageList: {len(self.ids)} ids but {len(self.bbxs)} boxes")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ImageList: ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def bbx(self, i: int) -> BBox | None:
        return None if self.bbxs is None else self.bbxs[i]


# a split's names -> its canonical name (GLDv2 calls the queries "test" and the database "index")
SPLIT_ALIASES = {"query": "query", "queries": "query", "test": "query",
                 "db": "db", "database": "db", "index": "db"}


@dataclass
class RetrievalDataset:
    """Queries, database and revisitop-style ground truth (``gnd[i]`` belongs to query ``i``).

    ``labels``: the landmark id of an image id, where the benchmark knows it (folder CSVs with a
    ``landmark_id`` column, the built-in benchmark); shown by the search service. ``domains``: the
    domain of an image id (folder CSVs with a ``domain`` column), for per-domain evaluation.
    ``protocol``: how rankings are scored, ``revisitop`` (mAP / mP@k of the Easy, Medium, Hard
    protocols over the whole ranking) or ``gldv2`` (mAP@100 of the ``easy`` positives).
    ``features``: a features-only benchmark's descriptor files by split (``query``, ``db``);
    evaluation reads them instead of what ``predict`` extracts (it has no images).
    """

    name: str
    queries: ImageList
    db: ImageList
    gnd: list[dict] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)
    protocol: str = "revisitop"
    features: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gnd and len(self.gnd) != len(self.queries):
            raise ValueError(f"{self.name}: {len(self.queries)} queries but {len(self.gnd)} gnd records")
        if self.protocol not in ("revisitop", "gldv2"):
            raise ValueError(f"{self.name}: unknown protocol {self.protocol!r}; expected revisitop or gldv2")

    def split(self, name: str) -> ImageList:
        """``query`` or ``db`` (aliases: ``queries``, ``test`` / ``index``, ``database``)."""
        split = SPLIT_ALIASES.get(name)
        if split == "query":
            return self.queries
        if split == "db":
            return self.db
        raise ValueError(f"{self.name}: unknown split {name!r}; expected 'query' or 'db'")


def gnd_from_labels(query_labels: Sequence, db_labels: Sequence, query_ids: Sequence[str] = (),
                    db_ids: Sequence[str] = ()) -> list[dict]:
    """Ground truth for a labelled image set: positives share the query's label.

    Positives go to ``easy`` (so the Easy and Medium protocols score them; Hard has none).
    A database image with the query's own id is put in ``junk``, which makes leave-one-out
    evaluation (queries drawn from the database) ignore the query itself.
    """
    by_label: dict = {}
    for j, label in enumerate(db_labels):
        by_label.setdefault(label, []).append(j)
    db_pos = {d: j for j, d in enumerate(db_ids)}
    gnd = []
    for i, label in enumerate(query_labels):
        self_idx = db_pos.get(query_ids[i]) if len(query_ids) else None
        easy = [j for j in by_label.get(label, []) if j != self_idx]
        gnd.append({"easy": easy, "hard": [], "junk": [] if self_idx is None else [self_idx]})
    return gnd
