"""The ``tuning`` verb: sweep an experiment's search space, several jobs at once.

Candidates come from the experiment's ``space`` (a list of dicts of lists, scikit-learn's
``ParameterGrid`` / ``ParameterSampler`` format). The devices of ``-d`` are cut into slots of
``n_gpu`` devices; each slot runs one ``job`` subprocess at a time (``python <experiment> job -d
<slot> --params-path <setting>/params.json``), its output in ``<setting>/job.out``. A setting
with a ``job.json`` is done and skipped; a half-trained one finds its ``last.pth`` and resumes,
so a killed sweep restarts where it stopped. Each finished job appends its row to
``results.csv`` under the file lock.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.experiment import JOB_DONE, PARAMS_JSON, Experiment
from retrieval.processes import die_with_parent
from retrieval.report import write_json

logger = logging.getLogger(__name__)


def candidates(space: Sequence[dict[str, Sequence[Any]]], mode: str = "grid", n_trials: int = 10,
               seed: int = 0) -> list[dict[str, Any]]:
    """The settings of a search space: every combination (``grid``) or ``n_trials`` random draws."""
    from sklearn.model_selection import ParameterGrid, ParameterSampler

    if not space:
        raise ValueError("the experiment has an empty search space: nothing to tune")
    space = [{k: list(v) for k, v in block.items()} for block in space]
    if mode == "grid":
        return [dict(c) for c in ParameterGrid(space)]
    if mode == "random":
        return [dict(c) for c in ParameterSampler(space, n_trials, random_state=seed)]
    raise ValueError(f"--mode must be grid or random, got {mode!r}")


def device_slots(devices: Sequence[str], n_gpu: int) -> list[str]:
    """``["0", "1", "2", "3"]`` with ``n_gpu=2`` → ``["0,1", "2,3"]`` (leftover devices unused)."""
    if n_gpu < 1 or n_gpu > len(devices):
        raise ValueError(f"--n-gpu must be between 1 and the {len(devices)} devices of -d, got {n_gpu}")
    return [",".join(devices[i:i + n_gpu]) for i in range(0, len(devices) - n_gpu + 1, n_gpu)]


def prepare_settings(exp: Experiment, space: Sequence[dict], mode: str = "grid", n_trials: int = 10
                     ) -> tuple[list[tuple[str, Path]], list[str]]:
    """Write ``params.json`` of every setting still to run; returns ``([(name, folder)], done names)``."""
    todo: list[tuple[str, Path]] = []
    done: list[str] = []
    for cand in candidates(space, mode, n_trials, int(exp.params.get("seed", 0))):
        name = exp.setting(cand)  # --set overrides are part of the name: another sweep, other folders
        out = exp.out_root / name
        if (out / JOB_DONE).is_file():
            done.append(name)
            continue
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PARAMS_JSON, {**exp.params, **cand, "tuning_params": sorted(cand)})
        todo.append((name, out))
    if done:
        logger.info("tuning: %d settings already done: %s", len(done), done)
    return todo, done


def job_command(script: Path, exp: Experiment, group_args: Sequence[str], name: str, out: Path,
                devices: str) -> list[str]:
    """The ``job`` command line that runs one prepared setting."""
    return [sys.executable, str(script), "--out-root", str(exp.out_root), *group_args, "job", "-d", devices,
            "--params-path", str(out / PARAMS_JSON), "--setting", name]


def run_sweep(exp: Experiment, space: Sequence[dict], script: Path, devices: Sequence[str], n_gpu: int,
              mode: str = "grid", n_trials: int = 10, group_args: Sequence[str] = ()) -> dict[str, list[str]]:
    """Run every missing setting of ``space``; returns ``{"done", "skipped", "failed"}`` setting names."""
    prepared, skipped = prepare_settings(exp, space, mode, n_trials)
    todo: queue.Queue[tuple[str, Path]] = queue.Queue()
    for item in prepared:
        todo.put(item)
    status: dict[str, list[str]] = {"done": [], "skipped": skipped, "failed": []}
    slots = device_slots(list(devices), n_gpu)
    lock = threading.Lock()

    def worker(slot: str) -> None:
        while True:
            try:
                name, out = todo.get_nowait()
            except queue.Empty:
                return
            cmd = job_command(script, exp, group_args, name, out, slot)
            logger.info("tuning: %s on devices %s (log: %s)", name, slot, out / "job.out")
            with (out / "job.out").open("a", encoding="utf-8") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(len(slots)),
                                    preexec_fn=die_with_parent).returncode
            with lock:
                status["done" if rc == 0 and (out / JOB_DONE).is_file() else "failed"].append(name)
            if rc != 0:
                logger.error("tuning: %s failed (exit %d); see %s", name, rc, out / "job.out")

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return status


def _child_env(n_parallel: int) -> dict[str, str]:
    """CPU jobs running side by side share the cores instead of each taking all of them."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_parallel))
    return env
