"""FAISS indexes named by index-factory strings: built once from a features file, saved, reloaded, searched.

One interface over every FAISS index (``Flat``, ``IVF4096,Flat``, ``IVF4096,PQ64``, ``HNSW32``,
``PCA256,IVF1024,SQ8`` ...), all with the inner-product metric on L2-normalised rows (= cosine),
numpy arrays in, ``(scores, ids)`` out like `retrieval.search.knn`:

- `build_index` reads a features file in blocks: a seeded random sample of rows trains the index
  (when it needs training), then every row is added block by block, so memory is the index
  itself plus one block (an IVF-PQ index of 1M rows holds ~72 MB where the vectors take 2 GB);
- `save_index` writes a folder atomically: ``index.faiss``, ``ids.h5`` (the features' ids, row
  order = index ids) and ``index.json`` (the parameters: factory, metric, dim, the features
  file, whitening, training rows, search defaults, build seconds);
- `load_index` reloads it (onto all GPUs when faiss has them, sharded), with ``nprobe`` /
  ``efsearch`` (HNSW's efSearch) / ``k_factor`` (a refine stage, ``...,RFlat``) from the saved
  defaults or the caller; `SavedIndex.search` searches queries in
  batches.

The ``index`` verb of the runner builds one for an experiment's database features
(`retrieval.experiment.build_experiment_index`); ``evaluate`` and ``serve`` search it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np

from retrieval.features import STR_DTYPE, FeaturesReader, read_strings
from retrieval.search import as_matrix, gpu_available

logger = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, PARAMS_FILE = "index.faiss", "ids.h5", "index.json"
INDEX_SCHEMA = "retrieval.index"
INDEX_SCHEMA_VERSION = 1
# our name -> FAISS ParameterSpace names tried in turn (k_factor: the refine stage of "...,RFlat" / IVFPQR)
SEARCH_PARAMS = {"nprobe": ("nprobe",), "efsearch": ("efSearch",), "k_factor": ("k_factor_rf", "k_factor")}


def create_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index of ``dim``-d vectors from a FAISS index-factory string."""
    try:
        return faiss.index_factory(int(dim), str(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "rejected"
        raise ValueError(f"index {factory!r}: not a FAISS index-factory string for {dim}-d vectors "
                         f"({reason})") from None


def index_slug(factory: str) -> str:
    """A folder name for a factory string: ``IVF4096,PQ64`` → ``IVF4096_PQ64``."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", factory).strip("_") or "index"


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def default_search_params(index: faiss.Index, factory: str) -> dict[str, int]:
    """Search defaults saved with a new index: IVF probes 1/64 of its cells, HNSW explores 64 candidates,
    a refine stage re-ranks 16·k candidates exactly."""
    out = {}
    ivf = _ivf(index)
    if ivf is not None:
        out["nprobe"] = max(1, ivf.nlist // 64)
    if "HNSW" in factory.upper():
        out["efsearch"] = 64
    if isinstance(index, faiss.IndexRefine):
        out["k_factor"] = 16
    return out


def set_search_params(index: faiss.Index, **params: int | None) -> dict[str, int]:
    """Set ``nprobe`` / ``efsearch`` / ``k_factor`` (None: leave as is) through FAISS's ParameterSpace;
    returns what was set.

    A parameter the index does not have (``nprobe`` on HNSW, ...) is a ValueError naming it.
    """
    space = faiss.GpuParameterSpace() if gpu_available() else faiss.ParameterSpace()
    done = {}
    for name, value in params.items():
        if value is None:
            continue
        if name not in SEARCH_PARAMS:
            raise ValueError(f"unknown search parameter {name!r}; expected one of {', '.join(SEARCH_PARAMS)}")
        for faiss_name in SEARCH_PARAMS[name]:
            try:
                space.set_index_parameter(index, faiss_name, int(value))
                break
            except RuntimeError:
                continue
        else:
            raise ValueError(f"{type(index).__name__}: this index has no search parameter {name!r}")
        done[name] = int(value)
    return done


def to_gpus(index: faiss.Index, gpus: Sequence[int] | None = None, shard: bool = True) -> faiss.Index:
    """``index`` on the listed GPUs (all when None), sharded across them, where faiss has GPU support;
    the CPU index otherwise, or when the index type has no GPU version (HNSW)."""
    if not gpu_available() or (gpus is not None and len(gpus) == 0):
        return index
    gpus = list(range(faiss.get_num_gpus())) if gpus is None else [int(g) for g in gpus]
    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard
    try:
        return faiss.index_cpu_to_gpus_list(index, co=options, gpus=gpus)
    except RuntimeError as err:
        logger.warning("%s has no GPU version (%s); searching on the CPU", type(index).__name__,
                       str(err).strip().splitlines()[-1] if str(err).strip() else "")
        return index


def search_batched(index: faiss.Index, queries: np.ndarray, k: int, batch: int = 16384,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` over query batches: ``(scores, ids)``, ``(Q, min(k, ntotal))``; -1 / -inf where an
    approximate index found fewer candidates."""
    queries = as_matrix(queries, "queries", index.d)
    k = min(int(k), int(index.ntotal))
    scores = np.full((len(queries), max(k, 0)), -np.inf, np.float32)
    ids = np.full(scores.shape, -1, np.int64)
    if k <= 0:
        return scores, ids
    starts = range(0, len(queries), max(1, int(batch)))
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="search", unit="batch")
    for s in starts:
        sc, nb = index.search(queries[s:s + batch], k)
        ids[s:s + len(nb)] = nb
        scores[s:s + len(nb)] = np.where(nb >= 0, sc, -np.inf)
    return scores, ids


def _training_sample(reader: FeaturesReader, n_train: int, seed: int, block_rows: int,
                     transform: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """``n_train`` seeded random rows, read block by block (HDF5 reads whole blocks fast, scattered rows slowly)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(reader), n_train, replace=False))
    parts = []
    for start, block in reader.blocks(block_rows):
        inside = rows[(rows >= start) & (rows < start + len(block))] - start
        if len(inside):
            parts.append(block[inside])
    x = np.concatenate(parts)
    return as_matrix(transform(x) if transform is not None else x, "training sample")


def build_index(features: str | os.PathLike, factory: str, *, train_rows: int | None = None, seed: int = 0,
                block_rows: int = 65536, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                gpus: Sequence[int] | None = None, progress: bool = False) -> tuple[faiss.Index, dict[str, Any]]:
    """A CPU index of every row of a features file (row i = index id i) and what its build took.

    ``train_rows``: rows sampled to train it (default: 64 per IVF cell, at least 65536, at most
    all); ``transform`` maps rows before training / adding (a whitening). K-means runs on the
    GPUs when faiss has them. Returns ``(index, stats)``; stats go into ``index.json``.
    """
    with FeaturesReader(features) as reader:
        n = len(reader)
        if n == 0:
            raise ValueError(f"{features}: no rows to index")
        dim = reader.dim if transform is None else int(transform(reader.rows([0])).shape[1])
        index = create_index(factory, dim)
        ivf = _ivf(index)
        stats: dict[str, Any] = {"factory": factory, "dim": dim, "ntotal": n, "train_rows": 0, "train_s": 0.0}
        if not index.is_trained:
            n_train = min(n, int(train_rows or max(65536, 64 * (ivf.nlist if ivf is not None else 0))))
            if ivf is not None and n_train < ivf.nlist:
                raise ValueError(f"index {factory!r}: {ivf.nlist} IVF cells need at least as many training "
                                 f"rows; {features} has {n}")
            sample = _training_sample(reader, n_train, seed, block_rows, transform)
            gpu_kmeans = None  # held here: faiss keeps only a raw pointer to it
            if ivf is not None and gpu_available():
                gpu_kmeans = to_gpus(faiss.IndexFlat(dim, ivf.metric_type), gpus, shard=False)
                ivf.clustering_index = gpu_kmeans
            t0 = time.perf_counter()
            index.train(sample)
            stats.update(train_rows=n_train, train_s=round(time.perf_counter() - t0, 3))
            del sample
            if gpu_kmeans is not None:
                ivf.clustering_index = None
        t0 = time.perf_counter()
        blocks = reader.blocks(block_rows)
        if progress:
            from tqdm import tqdm
            blocks = tqdm(blocks, total=-(-n // block_rows), desc=f"index {factory}", unit="block")
        for _, block in blocks:
            index.add(as_matrix(transform(block) if transform is not None else block, "block", dim))
        stats["add_s"] = round(time.perf_counter() - t0, 3)
    stats["search"] = default_search_params(index, factory)
    return index, stats


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace ``folder`` by the complete ``tmp`` folder (the old one is removed only after the swap)."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def save_index(folder: str | os.PathLike, index: faiss.Index, ids: Sequence[str], params: dict[str, Any]) -> Path:
    """Write ``index.faiss``, ``ids.h5`` and ``index.json`` into ``<folder>.tmp``, then swap it in whole."""
    folder = Path(folder)
    if index.ntotal != len(ids):
        raise ValueError(f"{folder}: the index holds {index.ntotal} vectors but {len(ids)} ids were given")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    with h5py.File(tmp / IDS_FILE, "w") as f:
        f.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=STR_DTYPE)
    record = {"schema": INDEX_SCHEMA, "schema_version": INDEX_SCHEMA_VERSION, "metric": "inner_product",
              **params, "ntotal": int(index.ntotal), "index_bytes": (tmp / INDEX_FILE).stat().st_size,
              "faiss_version": faiss.__version__}
    (tmp / PARAMS_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    _swap_in(tmp, folder)
    return folder


@dataclass
class SavedIndex:
    """A loaded index folder: the FAISS index (on the GPUs when present), its ids and its parameters."""

    index: faiss.Index
    ids: list[str]
    params: dict[str, Any]
    folder: Path

    def search(self, queries: np.ndarray, k: int, batch: int = 16384,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the top-``k``; ids are rows of `ids` (-1 = none)."""
        return search_batched(self.index, queries, k, batch, progress)

    def describe(self) -> str:
        search = ", ".join(f"{k}={v}" for k, v in self.params.get("search", {}).items())
        return f"{self.params.get('factory')} ({self.index.ntotal} vectors{', ' + search if search else ''})"


def load_index(folder: str | os.PathLike, *, gpus: Sequence[int] | None = None, nprobe: int | None = None,
               efsearch: int | None = None, k_factor: int | None = None) -> SavedIndex:
    """Reload a folder `save_index` wrote; ``nprobe`` / ``efsearch`` (HNSW's efSearch) / ``k_factor`` (a
    refine stage's candidates per result) override its saved search defaults."""
    folder = Path(folder)
    if not (folder / PARAMS_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no saved index here ({PARAMS_FILE} missing); build it with the index verb")
    params = json.loads((folder / PARAMS_FILE).read_text(encoding="utf-8"))
    if params.get("schema") != INDEX_SCHEMA or params.get("schema_version") != INDEX_SCHEMA_VERSION:
        raise ValueError(f"{folder / PARAMS_FILE}: not a {INDEX_SCHEMA} v{INDEX_SCHEMA_VERSION} record")
    index = faiss.read_index(str(folder / INDEX_FILE))
    with h5py.File(folder / IDS_FILE, "r") as f:
        ids = read_strings(f["ids"])
    if index.ntotal != len(ids):
        raise ValueError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors but {IDS_FILE} {len(ids)} ids")
    given = {"nprobe": nprobe, "efsearch": efsearch, "k_factor": k_factor}
    search = {**params.get("search", {}), **{k: v for k, v in given.items() if v is not None}}
    index = to_gpus(index, gpus)
    params["search"] = set_search_params(index, **search)
    return SavedIndex(index, ids, params, folder)


def search_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """An experiment's ``nprobe`` / ``efsearch`` / ``k_factor`` params as `load_index`'s keywords
    (None keeps the saved default)."""
    return {name: params.get(name) for name in SEARCH_PARAMS}


def check_ids(saved: SavedIndex, ids: Sequence[str], features: str | os.PathLike) -> None:
    """The index must hold exactly the features file's rows, in order; a one-line error names both."""
    if len(saved.ids) != len(ids) or saved.ids != list(ids):
        raise ValueError(f"{saved.folder} was built on other rows than {features} ({len(saved.ids)} vs {len(ids)} "
                         "ids, or another order); rebuild it with the index verb")
