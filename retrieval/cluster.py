"""Cluster launchers: turn experiment command lines (argv lists) into SGE or Slurm jobs.

The runner hands this module one command line per job, or a list of them (one per setting of a
sweep, one per shard of an extraction); nothing here knows the runner's internals.

- **torchrun** (`torchrun_command`): wraps a command in ``python -m torch.distributed.run``. Multi-node
  runs use torchrun's own c10d rendezvous: every node starts the same torchrun with ``--nnodes N``,
  ``--rdzv-endpoint HOST:PORT`` (HOST = the job's first node) and ``--rdzv-id`` = the job id; torchrun
  assigns RANK / WORLD_SIZE / LOCAL_RANK, which the training code reads. A single node uses
  ``--standalone`` (a private store on a free port) so two jobs sharing a node never fight over a port.
- **SGE / qsub** (`render_qsub_script`, `write_qsub_script`, `submit_qsub`): a bash job script from a
  template (default ``retrieval/templates/qsub.sh``, ABCI style: ``#$ -l rt_G.small=1``, ``h_rt``,
  ``-cwd``, ``-j y``). One command gives a plain job; several give an array job (``#$ -t 1-N``) whose
  body picks the command of ``$SGE_TASK_ID``. Placeholders are ``{{name}}``, which no shell or SGE
  syntax uses. The generated scripts are single-node; a multi-node SGE job needs a site-specific
  template that starts torchrun on every host.
- **Slurm via submitit** (`slurm_parameters`, `ClusterCommand`, `submit_slurm`): one submitit job (or a
  job array) per command; with ``torchrun=True`` each node runs one task (``tasks_per_node=1``) that
  starts torchrun with the rendezvous taken from ``submitit.JobEnvironment``. submitit is an optional
  dependency (``pip install landmark-retrieval[cluster]``), imported only when needed.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

CLUSTER_EXTRA_HINT = "pip install landmark-retrieval[cluster]"
DEFAULT_RDZV_PORT = 29500
# Offsets stay below 32768, where Linux starts handing out ephemeral ports.
_PORT_SPAN = 3000
_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)*)?")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_WALLTIME = re.compile(r"\d+(:[0-5]\d){0,2}")
_DEFAULT_SETUP = "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi"


# --------------------------------------------------------------------------- torchrun

def _script_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without a leading Python interpreter: torchrun starts the interpreter itself."""
    args = [str(a) for a in argv]
    if args and (args[0] == sys.executable or _PYTHON_NAME.fullmatch(Path(args[0]).name)):
        args = args[1:]
    if not args:
        raise ValueError("argv: empty command")
    if args[0] == "-c":
        raise ValueError("argv: torchrun cannot run `python -c`; give a script or `-m module`")
    return args


def torchrun_command(argv: Sequence[str], *, nnodes: int, nproc_per_node: int, rdzv_endpoint: str | None = None,
                     rdzv_id: str | None = None, python: str = sys.executable) -> list[str]:
    """``python -m torch.distributed.run ...`` running ``argv`` (``script.py args`` or ``-m module args``).

    A leading Python interpreter in ``argv`` is dropped. ``nnodes == 1`` uses ``--standalone`` and
    ignores ``rdzv_endpoint`` / ``rdzv_id``; more nodes need both (c10d rendezvous on ``HOST:PORT``).
    """
    if nnodes < 1:
        raise ValueError(f"nnodes: must be >= 1, got {nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node: must be >= 1, got {nproc_per_node}")
    cmd = [python, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node)]
    else:
        if not rdzv_endpoint or ":" not in rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint: expected HOST:PORT for {nnodes} nodes, got {rdzv_endpoint!r}")
        if not rdzv_id:
            raise ValueError(f"rdzv_id: required for {nnodes} nodes")
        cmd += ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", str(rdzv_id)]
    return cmd + _script_argv(argv)


# --------------------------------------------------------------------------- SGE / qsub

def fill_template(text: str, values: Mapping[str, str | None]) -> str:
    """Replace each ``{{name}}`` in ``text`` by ``values[name]`` (one pass: values are not re-scanned).

    A line holding only a placeholder whose value is empty is dropped, so optional directives leave no
    blank line. A placeholder missing from ``values`` (or None there) is a ValueError naming it.
    """
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text) if values.get(m.group(1)) is None})
    if unknown:
        names = ", ".join("{{" + u + "}}" for u in unknown)
        raise ValueError(f"template: unknown or unfilled placeholder(s) {names}")
    lines = []
    for line in text.splitlines(keepends=True):
        alone = _PLACEHOLDER.fullmatch(line.strip())
        if alone and values[alone.group(1)] == "":
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "".join(lines)


def load_qsub_template(template: str | Path | None = None) -> str:
    """The text of the qsub template file ``template``; None: the packaged default."""
    if template is None:
        default = importlib.resources.files("retrieval").joinpath("templates").joinpath("qsub.sh")
        return default.read_text(encoding="utf-8")
    return Path(template).read_text(encoding="utf-8")


def sge_job_name(name: str) -> str:
    """``name`` made acceptable to SGE ``-N``: letters, digits, ``_.-`` only, starting with a letter."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("_")
    if not clean:
        raise ValueError(f"job_name: nothing usable in {name!r}")
    # SGE refuses names that start with a digit; a leading '.' or '-' is asking for trouble too.
    return clean if clean[0].isalpha() else f"job_{clean}"


def _no_space(value: str, what: str) -> str:
    # SGE splits embedded #$ options on whitespace and does not honour quotes there.
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what}: must be non-empty without whitespace, got {value!r}")
    return value


def _command_line(argv: Sequence[str]) -> str:
    if not argv:
        raise ValueError("commands: empty command")
    return " ".join(shlex.quote(str(a)) for a in argv)


def render_qsub_script(commands: Sequence[Sequence[str]], *, job_name: str, resources: Mapping[str, int] | None = None,
                       walltime: str = "24:00:00", log_dir: str | Path, workdir: str | Path | None = None,
                       setup: str | None = None, template: str | Path | None = None) -> str:
    """An SGE job script running ``commands``; several commands make an array job, one per task.

    ``resources``: ``{"rt_G.small": 1}`` → ``#$ -l rt_G.small=1`` (one line each; None: site defaults).
    ``log_dir``: the ``-o`` directory (relative to the working directory); it must exist when the job
    starts, or SGE writes every job into one file of that name. ``workdir``: None → ``#$ -cwd`` (the
    directory qsub runs in), else ``#$ -wd`` on its absolute path. ``setup``: shell line(s) run before
    the command; None activates ``.venv`` in the working directory when there is one, "" runs nothing.
    ``template``: a template file path; None: the packaged default. Placeholders: ``{{job_name}}``,
    ``{{resources}}``, ``{{walltime}}``, ``{{cwd}}``, ``{{log_dir}}``, ``{{array}}``, ``{{setup}}``,
    ``{{command}}`` (the last is required).
    """
    if not commands:
        raise ValueError("commands: at least one command is needed")
    lines = []
    for key, count in (resources or {}).items():
        if not key or re.search(r"[\s=,]", key):
            raise ValueError(f"resources: bad resource name {key!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"resources: {key} must be an int >= 1, got {count!r}")
        lines.append(f"#$ -l {key}={count}")
    if not _WALLTIME.fullmatch(walltime):
        raise ValueError(f"walltime: expected HH:MM:SS or seconds, got {walltime!r}")
    cwd = "#$ -cwd" if workdir is None else f"#$ -wd {_no_space(os.path.abspath(workdir), 'workdir')}"
    if len(commands) == 1:
        array, body = "", _command_line(commands[0])
    else:
        array = f"#$ -t 1-{len(commands)}"
        cases = [f"  {i})\n    {_command_line(c)}\n    ;;" for i, c in enumerate(commands, 1)]
        body = "\n".join(['case "${SGE_TASK_ID:-}" in', *cases,
                          '  *)\n    echo "no command for SGE_TASK_ID=${SGE_TASK_ID:-}" >&2\n    exit 2\n    ;;',
                          "esac"])
    text = load_qsub_template(template)
    if not any(m.group(1) == "command" for m in _PLACEHOLDER.finditer(text)):
        raise ValueError("template: no {{command}} placeholder, the job would run nothing")
    return fill_template(text, {
        "job_name": sge_job_name(job_name), "resources": "\n".join(lines), "walltime": walltime, "cwd": cwd,
        "log_dir": _no_space(str(log_dir), "log_dir"), "array": array,
        "setup": _DEFAULT_SETUP if setup is None else setup, "command": body,
    })


def write_qsub_script(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, then rename) and make it executable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_QSUB_ID = re.compile(r"Your job(?:-array)? (\d+)")
_TERSE_ID = re.compile(r"(\d+)(?:\.\S*)?")


def submit_qsub(script_path: str | Path, qsub: str = "qsub") -> str | None:
    """Submit ``script_path`` with ``qsub``; returns the job id, or None when ``qsub`` is not on PATH.

    Run from the directory the job should start in when the script uses ``#$ -cwd``. For an array job
    the id is the array's (``12345`` of ``12345.1-4:1``), the one qstat and qdel take.
    """
    exe = shutil.which(qsub)
    if exe is None:
        logger.info("%s not found on PATH; submit %s by hand", qsub, script_path)
        return None
    proc = subprocess.run([exe, str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[0]
        raise RuntimeError(f"{qsub} {script_path} failed (exit {proc.returncode}): {first}")
    out = proc.stdout.strip()
    # SGE: `Your job 12345 ("name") has been submitted`; `qsub -terse` prints only `12345[.1-4:1]`.
    match = _QSUB_ID.search(out) or _TERSE_ID.fullmatch(out)
    if match is None:
        raise RuntimeError(f"{qsub} {script_path} printed no job id: {out.splitlines()[0] if out else 'nothing'}")
    logger.info("submitted %s as SGE job %s", script_path, match.group(1))
    return match.group(1)


# --------------------------------------------------------------------------- Slurm via submitit

def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ImportError(f"Slurm launching needs submitit: {CLUSTER_EXTRA_HINT}") from None
    return submitit


def _check_count(value: Any, what: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what}: must be an int >= {minimum}, got {value!r}")


def slurm_parameters(*, job_name: str, partition: str | None = None, nodes: int = 1, gpus_per_node: int = 1,
                     cpus_per_task: int = 8, timeout_min: int = 1440, mem_gb: float | None = None,
                     array_parallelism: int | None = None, constraint: str | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``submitit.AutoExecutor.update_parameters``; None values are left out.

    One task per node (``tasks_per_node=1``): the task starts torchrun, which starts the per-GPU
    workers, so ``cpus_per_task`` is what all of a node's workers share. ``gpus_per_node=0`` asks for a
    CPU-only job. ``extra`` (submitit names, e.g. ``slurm_account``) is merged last and wins.
    """
    if not job_name:
        raise ValueError("job_name: must be non-empty")
    _check_count(nodes, "nodes")
    _check_count(gpus_per_node, "gpus_per_node", minimum=0)
    _check_count(cpus_per_task, "cpus_per_task")
    _check_count(timeout_min, "timeout_min")
    if array_parallelism is not None:
        _check_count(array_parallelism, "array_parallelism")
    if mem_gb is not None and not mem_gb > 0:
        raise ValueError(f"mem_gb: must be > 0, got {mem_gb!r}")
    params: dict[str, Any] = {
        "name": job_name, "nodes": nodes, "tasks_per_node": 1, "gpus_per_node": gpus_per_node,
        "cpus_per_task": cpus_per_task, "timeout_min": timeout_min, "mem_gb": mem_gb,
        "slurm_partition": partition, "slurm_array_parallelism": array_parallelism, "slurm_constraint": constraint,
    }
    params.update(extra or {})
    return {k: v for k, v in params.items() if v is not None}


class _JobEnv(Protocol):
    """What `ClusterCommand` reads of ``submitit.JobEnvironment`` (duck-typed for tests)."""

    hostnames: Sequence[str]
    num_nodes: int
    job_id: str


def rdzv_port(job_id: str) -> int:
    """A rendezvous port stable for ``job_id``: 29500 plus an offset, so jobs sharing a node differ."""
    return DEFAULT_RDZV_PORT + zlib.crc32(str(job_id).encode()) % _PORT_SPAN


@dataclass
class ClusterCommand:
    """The picklable callable submitit runs in a job: ``argv``, under torchrun when ``torchrun``.

    ``port``: the rendezvous port (None: `rdzv_port` of the job id). ``workdir``: where the command
    runs (None: the job's current directory). Returns the command's exit status (0; failures raise
    ``subprocess.CalledProcessError``, which submitit reports as the job's error).
    """

    argv: list[str]
    nproc_per_node: int = 1
    torchrun: bool = False
    port: int | None = None
    workdir: str | None = None

    def command(self, env: _JobEnv) -> list[str]:
        """The command line for job environment ``env`` (``.hostnames``, ``.num_nodes``, ``.job_id``)."""
        if not self.torchrun:
            return [str(a) for a in self.argv]
        port = rdzv_port(env.job_id) if self.port is None else self.port
        return torchrun_command(self.argv, nnodes=int(env.num_nodes), nproc_per_node=self.nproc_per_node,
                                rdzv_endpoint=f"{env.hostnames[0]}:{port}", rdzv_id=str(env.job_id))

    def run(self, env: _JobEnv) -> int:
        """Run `command` for ``env`` in ``workdir``; returns its exit status."""
        cmd = self.command(env)
        logger.info("job %s: %s", env.job_id, shlex.join(cmd))
        return subprocess.run(cmd, cwd=self.workdir, check=True).returncode

    def __call__(self) -> int:
        return self.run(_import_submitit().JobEnvironment())


def submit_slurm(commands: Sequence[Sequence[str]], *, folder: str | Path, parameters: Mapping[str, Any],
                 torchrun: bool = False, nproc_per_node: int = 1, workdir: str | Path | None = None,
                 cluster: str | None = None) -> list[Any]:
    """Submit each command as a submitit job (several: one job array); returns the submitit jobs.

    ``parameters``: from `slurm_parameters`. ``workdir``: where commands run (None: the current
    directory, fixed now so jobs do not depend on where submitit starts them). ``cluster``: None needs
    Slurm (``srun`` on PATH) and refuses to fall back to running here; ``"local"`` or ``"debug"`` run on
    this machine (for tests and dry runs).
    """
    if not commands or not all(commands):
        raise ValueError("commands: at least one command is needed, and no empty one")
    _check_count(nproc_per_node, "nproc_per_node")
    submitit = _import_submitit()
    params = dict(parameters)
    if torchrun and params.get("tasks_per_node", 1) != 1:
        raise ValueError(f"parameters: torchrun needs tasks_per_node=1, got {params['tasks_per_node']}")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if cluster is None and executor.cluster != "slurm":
        # AutoExecutor would silently pick the local executor and train on the login machine.
        raise RuntimeError(f"no Slurm found (srun not on PATH); pass cluster='local' to run here ({executor.cluster})")
    # What submitit 1.5 does with the names (read in submitit/auto/auto.py and local/local.py): AutoExecutor
    # checks every `slurm_*` name against SlurmExecutor's parameters (NameError on a typo, whatever the
    # cluster) and forwards prefixed names only to the executor of that prefix, so on "local"/"debug" they
    # are dropped, not rejected; we keep them so typos still surface in dry runs. The generic names go to
    # every executor; LocalExecutor raises ValueError for nodes > 1, so a multi-node setting dry-runs on
    # one node here.
    if executor.cluster != "slurm" and params.get("nodes", 1) > 1:
        logger.warning("%s executor runs on this machine only: nodes=%s becomes 1", executor.cluster, params["nodes"])
        params["nodes"] = 1
    gpus = params.get("gpus_per_node", 0)
    if torchrun and gpus and gpus != nproc_per_node:
        logger.warning("torchrun starts %d process(es) per node but %d GPU(s) per node are requested",
                       nproc_per_node, gpus)
    executor.update_parameters(**params)
    run_dir = os.path.abspath(workdir if workdir is not None else os.getcwd())
    fns = [ClusterCommand([str(a) for a in argv], nproc_per_node=nproc_per_node, torchrun=torchrun,
                          workdir=run_dir) for argv in commands]
    jobs = [executor.submit(fns[0])] if len(fns) == 1 else executor.submit_array(fns)
    logger.info("submitted %d %s job(s) via submitit: %s", len(jobs), executor.cluster,
                ", ".join(str(j.job_id) for j in jobs))
    return jobs
