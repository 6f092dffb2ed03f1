"""What a training checkpoint holds beyond the net, and how it is written.

A training checkpoint is a net checkpoint (`retrieval.models.save_checkpoint`: ``format``,
``meta``, ``state_dict``, so ``predict -m epN.pth`` loads it like any other) plus::

    params       the experiment params the run trained with
    train_state  {"epoch", "batch", "step", "world_size", "optimizer", "scaler", "scheduler",
                  "rng": [per-rank RNG states], "history": [per-epoch rows], "best": {...}}

``(epoch, batch)`` is the position: ``batch`` optimizer-complete batches of ``epoch`` (0-based)
are done on every rank. Every RNG a rank draws from (Python, NumPy, torch CPU and CUDA) is
saved per rank, so a resumed run continues bit for bit. Files are written to a temporary
name and renamed; ``last.pth`` is a hard link to the newest (a copy where links fail).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.models.net import RetrievalNet, save_checkpoint


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (the CUDA states only where CUDA is present)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_s = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_s["key"].numpy().astype(np.uint32), "pos": int(np_s["pos"])},
                         "has_gauss": int(np_s["has_gauss"]), "gauss": float(np_s["gauss"])})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(path: str | os.PathLike, net: RetrievalNet, params: dict[str, Any],
                             train_state: dict[str, Any]) -> Path:
    """Write the net checkpoint with ``params`` and ``train_state`` (atomically)."""
    return save_checkpoint(path, net, params=params, train_state=train_state)


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The whole checkpoint dict; a file without ``train_state`` is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "train_state" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a training checkpoint (no train_state); start a new run from it with "
                         "--set init_checkpoint=...")
    return ckpt


def link_latest(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` the same file as ``src`` (hard link, else copy), replacing it atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst
