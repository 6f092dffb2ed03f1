"""The ``launch-slurm`` / ``launch-qsub`` verbs: an experiment's verb as cluster jobs.

`task_commands` turns ``job``, ``tuning`` or ``multigpu-predict`` into one command line per
cluster task: ``job`` is one task; ``tuning`` one task per setting still to run (each a ``job
--params-path``, Landmark2019's habit, skipping what is done); ``multigpu-predict -n N`` one
task per block (``--block-id i``), after which one more ``multigpu-predict -n N`` (printed)
merges the blocks. `retrieval.cluster` then submits them (submitit or qsub).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from retrieval.cluster import render_qsub_script, slurm_parameters, submit_qsub, submit_slurm, write_qsub_script
from retrieval.experiment import Experiment
from retrieval.sweep import job_command, prepare_settings


def _pop_option(args: list[str], names: Sequence[str]) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``args``; returns (value, rest)."""
    rest, value = [], None
    it = iter(args)
    for a in it:
        name, eq, inline = a.partition("=")
        if name in names:
            value = inline if eq else next(it, None)
            if value is None:
                raise ValueError(f"{a}: missing value")
        else:
            rest.append(a)
    return value, rest


def task_commands(exp: Experiment, space: Sequence[dict], script: Path, group_args: Sequence[str], verb: str,
                  verb_args: Sequence[str], devices_per_task: int) -> tuple[list[list[str]], list[str]]:
    """One command line per cluster task, and notes for the user (what to run afterwards)."""
    devices = ",".join(str(i) for i in range(max(1, devices_per_task)))
    _, args = _pop_option(list(verb_args), ("-d", "--devices"))
    base = [sys.executable, str(script), "--out-root", str(exp.out_root), *group_args]
    if verb == "job":
        return [[*base, "job", "-d", devices, *args]], []
    if verb == "tuning":
        mode, args = _pop_option(args, ("--mode",))
        n_trials, args = _pop_option(args, ("--n-trials",))
        _, args = _pop_option(args, ("--n-gpu",))
        if args:
            raise ValueError(f"tuning: unexpected arguments {args}")
        todo, done = prepare_settings(exp, space, str(mode or "grid"), int(n_trials or 10))
        if not todo:
            raise ValueError(f"tuning: all {len(done)} settings are done; nothing to submit")
        notes = [f"{len(done)} setting(s) already done"] if done else []
        return [job_command(script, exp, group_args, name, out, devices) for name, out in todo], notes
    if verb == "multigpu-predict":
        n_blocks, args = _pop_option(args, ("-n", "--n-blocks"))
        block, args = _pop_option(args, ("-i", "--block-id"))
        if block is not None:
            raise ValueError("multigpu-predict: --block-id is set per task; give only --n-blocks")
        n = int(n_blocks or 1)
        cmds = [[*base, "multigpu-predict", "-d", devices, *args, "--n-blocks", str(n), "--block-id", str(i)]
                for i in range(n)]
        merge = " ".join([*base[1:], "multigpu-predict", *args, "--n-blocks", str(n)])
        return cmds, [f"when every task has finished, merge the blocks: python {merge}"]
    raise ValueError(f"cannot launch {verb!r}; choose job, tuning or multigpu-predict")


def launch_slurm(exp: Experiment, space: Sequence[dict], script: Path, group_args: Sequence[str], verb: str,
                 verb_args: Sequence[str], *, partition: str | None = None, nodes: int = 1, gpus_per_node: int = 1,
                 cpus_per_task: int = 8, timeout_min: int = 1440, mem_gb: float | None = None,
                 array_parallelism: int | None = None, folder: Path | None = None,
                 cluster: str | None = None) -> list[str]:
    """Submit the tasks through submitit; returns lines to print (job ids and notes)."""
    if nodes > 1 and verb != "job":
        raise ValueError("--nodes > 1 is for one multi-node job; tuning and multigpu-predict run one node per task")
    commands, notes = task_commands(exp, space, script, group_args, verb, verb_args, gpus_per_node)
    params = slurm_parameters(job_name=f"{exp.name}-{verb}", partition=partition, nodes=nodes,
                              gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, timeout_min=timeout_min,
                              mem_gb=mem_gb, array_parallelism=array_parallelism)
    # several nodes: one torchrun per node joins a c10d rendezvous, the job then reads RANK / WORLD_SIZE
    try:
        jobs = submit_slurm(commands, folder=folder or exp.out_root / "slurm", parameters=params,
                            torchrun=nodes > 1, nproc_per_node=max(1, gpus_per_node), cluster=cluster)
    except RuntimeError as err:  # no Slurm here: the user's situation, not a bug
        raise ValueError(str(err)) from None
    return [f"submitted {job.job_id}" for job in jobs] + notes


def launch_qsub(exp: Experiment, space: Sequence[dict], script: Path, group_args: Sequence[str], verb: str,
                verb_args: Sequence[str], *, resources: Sequence[str] = ("rt_G.small=1",), gpus_per_node: int = 1,
                walltime: str = "24:00:00", template: Path | None = None) -> list[str]:
    """Render the SGE script (an array job for several tasks), qsub it where qsub exists; returns lines to print."""
    commands, notes = task_commands(exp, space, script, group_args, verb, verb_args, gpus_per_node)
    res: dict[str, int] = {}
    for item in resources:
        key, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise ValueError(f"--resource: expected TYPE=N, got {item!r}")
        res[key] = int(count)
    qsub_dir = exp.out_root / "qsub"
    log_dir = qsub_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)  # SGE needs the -o folder to exist
    text = render_qsub_script(commands, job_name=f"{exp.name}-{verb}", resources=res, walltime=walltime,
                              log_dir=log_dir, workdir=Path.cwd(), template=template)
    path = write_qsub_script(qsub_dir / f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}.sh", text)
    try:
        job_id = submit_qsub(path)
    except RuntimeError as err:  # qsub refused the job
        raise ValueError(str(err)) from None
    if job_id is None:
        return [text, f"qsub not found: submit it with `qsub {path}`", *notes]
    return [f"submitted SGE job {job_id} ({path})", *notes]
