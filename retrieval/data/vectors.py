"""A features-only benchmark: clustered unit vectors with landmark labels, any size, drawn from a seed.

It stands in for a network's descriptors of a GLDv2-like collection, so search and evaluation
run at a million database rows (and more) without images or a net, in the interface of
faiss.contrib's ``datasets.py``: `SyntheticVectors.get_queries`, `database_iterator` /
`get_database`, `get_groundtruth` (exact kNN), plus the labels (`positives`) that make it a
retrieval benchmark (GLDv2 protocol: mAP@100 over the database images of the query's landmark).

The model: landmark centres are grouped in families (similar-looking landmarks): centre =
normalise(family + spread · g), g ~ N(0, I/D); an image of a landmark is normalise(centre + s · g)
with its own noise level s log-uniform in [noise/2, 2·noise] (easy and hard views). Database
images draw their landmark uniformly (about ``cluster_size`` images each); queries are new
images of landmarks that have database images. Rows are generated in fixed blocks from
``(seed, block)`` streams, so any reader sees the same rows whatever block size it reads in.

``load_dataset("vectors:1000000")`` (options ``vectors:N,queries=Q,dim=D,cluster_size=C,noise=S``)
writes ``query.h5`` / ``db.h5`` features files once under the data root and returns a
`RetrievalDataset` whose ``features`` name them; ``evaluate`` reads those instead of extracting.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from retrieval.data.dataset import ImageList, RetrievalDataset

GENERATION_BLOCK = 65536  # rows per random stream: fixed, so the data does not depend on how it is read
FAMILY_SIZE = 10  # landmarks per family of look-alikes


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class SyntheticVectors:
    """The benchmark of ``n_db`` database and ``n_queries`` query vectors of dimension ``dim``."""

    n_db: int
    n_queries: int = 10_000
    dim: int = 512
    cluster_size: int = 20
    noise: float = 1.0
    spread: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_db", "n_queries", "dim", "cluster_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"vectors: {name} must be >= 1, got {getattr(self, name)}")
        if self.noise < 0 or self.spread < 0:
            raise ValueError(f"vectors: noise and spread must be >= 0, got {self.noise}, {self.spread}")

    @property
    def name(self) -> str:
        return f"vectors-{self.n_db}-q{self.n_queries}-d{self.dim}-s{self.seed}"

    @property
    def n_clusters(self) -> int:
        return max(1, math.ceil(self.n_db / self.cluster_size))

    @functools.cached_property
    def centres(self) -> np.ndarray:
        """``(n_clusters, dim)`` landmark centres, unit rows."""
        rng = np.random.default_rng([self.seed, 0])
        families = _unit(rng.standard_normal((-(-self.n_clusters // FAMILY_SIZE), self.dim), dtype=np.float32))
        family = np.arange(self.n_clusters) // FAMILY_SIZE
        g = rng.standard_normal((self.n_clusters, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        return _unit(families[family] + self.spread * g)

    @functools.cached_property
    def db_labels(self) -> np.ndarray:
        """``(n_db,)`` landmark of each database row."""
        return np.random.default_rng([self.seed, 1]).integers(0, self.n_clusters, self.n_db)

    @functools.cached_property
    def query_labels(self) -> np.ndarray:
        """``(n_queries,)`` landmark of each query, among landmarks with database images."""
        present = np.unique(self.db_labels)
        return present[np.random.default_rng([self.seed, 2]).integers(0, len(present), self.n_queries)]

    def _images(self, labels: np.ndarray, stream: Sequence[int]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *stream])
        level = self.noise * np.exp(rng.uniform(np.log(0.5), np.log(2.0), (len(labels), 1))).astype(np.float32)
        g = rng.standard_normal((len(labels), self.dim), dtype=np.float32) / np.float32(np.sqrt(self.dim))
        return _unit(self.centres[labels] + level * g).astype(np.float32)

    def _db_rows(self, lo: int, hi: int) -> Iterator[np.ndarray]:
        """Database rows ``lo:hi`` as the generation blocks hold them (cut at both ends)."""
        for b in range(lo // GENERATION_BLOCK, -(-hi // GENERATION_BLOCK)):
            s = b * GENERATION_BLOCK
            labels = self.db_labels[s:s + GENERATION_BLOCK]
            yield self._images(labels, (3, b))[max(lo - s, 0):hi - s]

    def database_iterator(self, bs: int = GENERATION_BLOCK, split: tuple[int, int] = (1, 0)) -> Iterator[np.ndarray]:
        """Consecutive database blocks of ``bs`` rows; ``split = (n, i)``: only the i-th of n contiguous parts."""
        n_split, rank = split
        lo, hi = self.n_db * rank // n_split, self.n_db * (rank + 1) // n_split
        parts: list[np.ndarray] = []
        held = 0
        for part in self._db_rows(lo, hi):
            parts.append(part)
            held += len(part)
            while held >= bs:
                joined = np.concatenate(parts)
                yield joined[:bs]
                parts, held = [joined[bs:]], held - bs
        if held:
            yield np.concatenate(parts)

    def get_database(self) -> np.ndarray:
        return np.concatenate(list(self.database_iterator()))

    def get_queries(self) -> np.ndarray:
        return self._images(self.query_labels, (4,))

    def get_groundtruth(self, k: int = 100) -> np.ndarray:
        """``(n_queries, k)`` database rows of each query's exact k nearest neighbours (inner product)."""
        from retrieval.search import knn_blocked

        return knn_blocked(self.get_queries(), self.database_iterator(), min(k, self.n_db))[1]

    def positives(self) -> list[np.ndarray]:
        """Database rows of each query's landmark (what the mAP counts as relevant)."""
        order = np.argsort(self.db_labels, kind="stable")
        bounds = np.searchsorted(self.db_labels[order], np.arange(self.n_clusters + 1))
        return [order[bounds[c]:bounds[c + 1]] for c in self.query_labels]

    def ids(self, split: str) -> list[str]:
        if split == "query":
            return [f"q{i:07d}" for i in range(self.n_queries)]
        return [f"db{i:08d}" for i in range(self.n_db)]

    def write(self, folder: str | os.PathLike, dtype: str = "float32") -> dict[str, Path]:
        """``query.h5`` and ``db.h5`` features files (written once, block by block, resumable)."""
        from retrieval.features import FeatureWriter

        folder = Path(folder)
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        signature = f"vectors-v1 {sorted(settings.items())} {dtype}"
        out = {}
        for split, n in (("query", self.n_queries), ("db", self.n_db)):
            path = out[split] = folder / f"{split}.h5"
            if path.is_file():
                continue
            writer = FeatureWriter(path, n, self.dim, signature, dtype, attrs={"source": "vectors", **settings})
            try:
                ids, start = self.ids(split), writer.cursor
                blocks = [self.get_queries()[start:]] if split == "query" else self._db_rows(start, n)
                for block in blocks:
                    writer.append(start + len(block), ids[start:start + len(block)], block)
                    start += len(block)
                writer.finish()
            finally:
                writer.close()
        return out

    def dataset(self, folder: str | os.PathLike) -> RetrievalDataset:
        """The benchmark as a features-only `RetrievalDataset` (GLDv2 protocol), its files under ``folder``."""
        paths = self.write(folder)
        gnd = [{"easy": p.tolist(), "hard": [], "junk": []} for p in self.positives()]
        return RetrievalDataset(self.name, _without_images(self.ids("query")), _without_images(self.ids("db")), gnd,
                                protocol="gldv2", features=paths)


class _NoImagePaths(Sequence):
    """The ``paths`` of a features-only split: there are no image files; indexing names a placeholder."""

    def __init__(self, ids: Sequence[str]) -> None:
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int | slice) -> Path | list[Path]:
        if isinstance(i, slice):
            return [Path("<no image>") / image_id for image_id in self._ids[i]]
        return Path("<no image>") / self._ids[i]


def _without_images(ids: list[str]) -> ImageList:
    return ImageList(ids, _NoImagePaths(ids))  # type: ignore[arg-type]


def parse_spec(spec: str, seed: int = 0) -> SyntheticVectors:
    """``vectors:N[,queries=Q,dim=D,cluster_size=C,noise=S,spread=F]`` → `SyntheticVectors`."""
    body = spec.removeprefix("vectors:")
    head, *options = [p.strip() for p in body.split(",") if p.strip()]
    kwargs: dict = {"seed": seed}
    try:
        kwargs["n_db"] = int(float(head))
        for option in options:
            key, _, value = option.partition("=")
            key = {"q": "n_queries", "queries": "n_queries", "d": "dim"}.get(key, key)
            if key not in ("n_queries", "dim", "cluster_size", "noise", "spread", "seed"):
                raise ValueError(f"unknown option {key!r}")
            kwargs[key] = float(value) if key in ("noise", "spread") else int(float(value))
    except ValueError as err:
        raise ValueError(f"dataset {spec!r}: expected vectors:N[,queries=Q,dim=D,cluster_size=C,noise=S,"
                         f"spread=F] ({err})") from None
    return SyntheticVectors(**kwargs)
