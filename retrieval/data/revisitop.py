"""Revisited Oxford / Paris ground truth (Radenović et al., CVPR 2018) and its dataset layout.

Layout (as the revisitop download script makes it, and as the synthetic benchmark writes it)::

    <dataset_dir>/gnd_<name>.pkl     imlist, qimlist, gnd[i] = {easy, hard, junk, bbx}
    <dataset_dir>/jpg/<image>.jpg

The pickle is read with `safe_load_pickle`, which builds plain containers and numbers only
and refuses any pickle that names a class or function (the way a pickle runs code).
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

from retrieval.data.dataset import ImageList, RetrievalDataset

GND_KEYS = ("easy", "hard", "junk")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a global (class, function); loading it could run code."""


# Old pickle protocols build sets and bytes through these callables; they cannot run code.
# (Protocol 2 names the builtins module by its Python 2 name.)
_ALLOWED_GLOBALS = {(mod, "set"): set for mod in ("builtins", "__builtin__")}
_ALLOWED_GLOBALS |= {(mod, "frozenset"): frozenset for mod in ("builtins", "__builtin__")}
_ALLOWED_GLOBALS[("_codecs", "encode")] = codecs.encode


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        raise UnsafePickleError(f"it references {module}.{name}; only plain containers and numbers are allowed")


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle made only of dict/list/tuple/set/str/bytes/int/float/bool/None."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: refusing to unpickle: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"{path}: not a readable pickle ({err})") from None


def load_gnd(path: str | os.PathLike) -> dict:
    """Read and check a revisitop ``gnd_*.pkl``; returns ``{"imlist", "qimlist", "gnd"}``."""
    path = Path(path)
    cfg = safe_load_pickle(path)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{path}: expected a dict with keys imlist, qimlist, gnd")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: {len(qimlist)} queries in qimlist but {len(gnd)} gnd records")
    n_db = len(imlist)
    for i, rec in enumerate(gnd):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: gnd[{i}] is not a dict")
        for key in GND_KEYS:
            idx = rec.get(key, [])
            if any((not isinstance(j, int)) or j < 0 or j >= n_db for j in idx):
                raise ValueError(f"{path}: gnd[{i}][{key!r}] has an index outside 0..{n_db - 1}")
        bbx = rec.get("bbx")
        if bbx is not None and len(bbx) != 4:
            raise ValueError(f"{path}: gnd[{i}]['bbx'] must have 4 numbers, got {bbx!r}")
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def load_revisitop(dataset_dir: str | os.PathLike, name: str | None = None, ext: str = ".jpg",
                   crop_queries: bool = True) -> RetrievalDataset:
    """ROxf / RPar (or any dataset in the same layout, e.g. the synthetic benchmark).

    ``name`` defaults to the folder name (``.../roxford5k`` → ``gnd_roxford5k.pkl``).
    Queries carry their ``bbx`` so extraction crops them, as the protocol prescribes.
    """
    dataset_dir = Path(dataset_dir)
    name = name or dataset_dir.name
    gnd_path = dataset_dir / f"gnd_{name}.pkl"
    if not gnd_path.is_file():
        raise FileNotFoundError(f"{gnd_path}: ground-truth file not found")
    cfg = load_gnd(gnd_path)
    jpg = dataset_dir / "jpg"
    db = ImageList(ids=list(cfg["imlist"]), paths=[jpg / f"{n}{ext}" for n in cfg["imlist"]])
    bbxs = [tuple(float(v) for v in g["bbx"]) if crop_queries and g.get("bbx") is not None else None
            for g in cfg["gnd"]]
    queries = ImageList(ids=list(cfg["qimlist"]), paths=[jpg / f"{n}{ext}" for n in cfg["qimlist"]],
                        bbxs=bbxs)
    gnd = [{k: list(g.get(k, [])) for k in GND_KEYS} | {"bbx": g.get("bbx")} for g in cfg["gnd"]]
    return RetrievalDataset(name=name, queries=queries, db=db, gnd=gnd)
