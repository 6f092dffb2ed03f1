"""Cluster launchers: torchrun argv, SGE job scripts and qsub, Slurm parameters and submitit jobs (no cluster)."""

import os
import pickle
import shlex
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from retrieval.cluster import (
    ClusterCommand,
    fill_template,
    load_qsub_template,
    rdzv_port,
    render_qsub_script,
    sge_job_name,
    slurm_parameters,
    submit_qsub,
    submit_slurm,
    torchrun_command,
    write_qsub_script,
)

REPO = Path(__file__).resolve().parents[1]
TRICKY = "it's a \"quoted\" arg with  spaces $HOME {{job_name}}"

# A torchrun worker: records the rank torchrun gave it.
WORKER = """\
import os, sys
name = "rank{RANK}_of{WORLD_SIZE}_local{LOCAL_RANK}".format(**os.environ)
open(os.path.join(sys.argv[1], name), "w").close()
"""


@dataclass
class FakeEnv:
    hostnames: list
    num_nodes: int
    job_id: str


def marker_cmd(name: str) -> list[str]:
    return [sys.executable, "-c", f"open({name!r}, 'w').write('ok')"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- torchrun

def test_torchrun_command_one_node_is_standalone():
    cmd = torchrun_command(["python3", "experiments/v2.py", "job", "-d", "0,1"], nnodes=1, nproc_per_node=2,
                           rdzv_endpoint="ignored:1", rdzv_id="ignored", python="/opt/py")
    assert cmd == ["/opt/py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc-per-node", "2", "experiments/v2.py", "job", "-d", "0,1"]


def test_torchrun_command_two_nodes_uses_c10d_rendezvous():
    cmd = torchrun_command(["experiments/v2.py", "job"], nnodes=2, nproc_per_node=4, rdzv_endpoint="node1:29517",
                           rdzv_id="777", python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "4",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", "node1:29517", "--rdzv-id", "777",
                   "experiments/v2.py", "job"]
    # The interpreter that runs the tests is dropped too, and -m module passes through.
    assert torchrun_command([sys.executable, "-m", "pkg.mod"], nnodes=1, nproc_per_node=1, python="py")[-2:] == [
        "-m", "pkg.mod"]


def test_torchrun_command_errors():
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(["a.py"], nnodes=2, nproc_per_node=1, rdzv_id="1")
    with pytest.raises(ValueError, match="rdzv_id"):
        torchrun_command(["a.py"], nnodes=2, nproc_per_node=1, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match="nproc_per_node"):
        torchrun_command(["a.py"], nnodes=1, nproc_per_node=0)
    with pytest.raises(ValueError, match="-c"):
        torchrun_command(["python", "-c", "pass"], nnodes=1, nproc_per_node=1)
    with pytest.raises(ValueError, match="argv"):
        torchrun_command(["python"], nnodes=1, nproc_per_node=1)


def test_two_node_rendezvous_really_runs_on_localhost(tmp_path):
    """Two torchruns built for a fake 2-node job meet at the endpoint and number 4 workers 0..3."""
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = ClusterCommand(["worker.py", str(out)], nproc_per_node=2, torchrun=True, port=free_port(),
                         workdir=str(tmp_path))
    env = FakeEnv(["127.0.0.1", "127.0.0.1"], 2, "rdzv-test")
    procs = [subprocess.Popen(cmd.command(env), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    logs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sorted(f.name for f in out.iterdir()) == [
        "rank0_of4_local0", "rank1_of4_local1", "rank2_of4_local0", "rank3_of4_local1"]


# --------------------------------------------------------------------------- qsub scripts

def test_render_single_job_script():
    argv = ["python", "experiments/v2.py", "--set", "lr=0.1", "job", "-d", "0,1", TRICKY]
    text = render_qsub_script([argv], job_name="v2 job/lr=0.1", resources={"rt_G.small": 1, "rt_F": 2},
                              walltime="12:00:00", log_dir="experiments/v2/logs")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#$ -N v2_job_lr_0.1" in lines
    assert lines.index("#$ -l rt_G.small=1") + 1 == lines.index("#$ -l rt_F=2")
    for line in ["#$ -l h_rt=12:00:00", "#$ -cwd", "#$ -o experiments/v2/logs", "#$ -j y",
                 "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi"]:
        assert line in lines
    assert not any(line.startswith("#$ -t") for line in lines)
    assert "{{" not in text.replace(shlex.quote(TRICKY), "")  # no placeholder left, values not re-scanned
    assert shlex.split(lines[-1]) == argv
    # Every directive comes before the first command (SGE reads options from the header).
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#$"))


def test_render_array_job_one_case_per_task(tmp_path):
    commands = [marker_cmd(f"task{i}") + [TRICKY] for i in (1, 2, 3)]
    text = render_qsub_script(commands, job_name="sweep", log_dir="logs", workdir=tmp_path, setup="")
    lines = text.splitlines()
    assert "#$ -t 1-3" in lines
    assert f"#$ -wd {tmp_path}" in lines and "#$ -cwd" not in lines
    assert not any("activate" in line for line in lines)
    for i, argv in enumerate(commands, 1):
        at = lines.index(f"  {i})")
        assert shlex.split(lines[at + 1]) == argv
        assert lines[at + 2].strip() == ";;"
    script = write_qsub_script(tmp_path / "job.sh", text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Task 2 runs its command only; an unknown task id fails loudly.
    env = {**os.environ, "SGE_TASK_ID": "2"}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True)
    assert sorted(p.name for p in tmp_path.glob("task*")) == ["task2"]
    env["SGE_TASK_ID"] = "9"
    assert subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True).returncode == 2


def test_default_setup_activates_venv_in_workdir(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("export ACTIVATED=yes\n")
    probe = [sys.executable, "-c", "import os; open('probe', 'w').write(os.environ.get('ACTIVATED', 'no'))"]
    script = write_qsub_script(tmp_path / "job.sh", render_qsub_script([probe], job_name="p", log_dir="logs"))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    subprocess.run(["bash", str(script)], cwd=tmp_path, check=True)
    assert (tmp_path / "probe").read_text() == "yes"
    custom = render_qsub_script([probe], job_name="p", log_dir="logs", setup="module load cuda/12.4\nsource env.sh")
    assert "module load cuda/12.4\nsource env.sh\n" in custom


def test_custom_template_file(tmp_path):
    tpl = tmp_path / "site.sh"
    tpl.write_text("#!/bin/bash\n#$ -N {{ job_name }}\n#$ -q gpu.q\n#$ -o {{log_dir}}\n{{array}}\n"
                   'echo "${HOME} $JOB_ID"\n{{command}}\n')
    text = render_qsub_script([["echo", "hi"]], job_name="x", log_dir="/logs", template=tpl)
    assert text == '#!/bin/bash\n#$ -N x\n#$ -q gpu.q\n#$ -o /logs\necho "${HOME} $JOB_ID"\necho hi\n'
    script = write_qsub_script(tmp_path / "job.sh", text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_template_errors(tmp_path):
    tpl = tmp_path / "bad.sh"
    tpl.write_text("#$ -q {{queue}}\n#$ -P {{ project }}\n{{command}}\n")
    with pytest.raises(ValueError, match=r"\{\{project\}\}, \{\{queue\}\}"):
        render_qsub_script([["true"]], job_name="x", log_dir="logs", template=tpl)
    tpl.write_text("#$ -N {{job_name}}\n")
    with pytest.raises(ValueError, match="command"):
        render_qsub_script([["true"]], job_name="x", log_dir="logs", template=tpl)
    with pytest.raises(ValueError, match="unfilled placeholder.*setup"):
        fill_template("{{setup}}\n", {"setup": None})
    assert fill_template("a\n  {{opt}}\nb {{v}}\n", {"opt": "", "v": "{{opt}}"}) == "a\nb {{opt}}\n"


def test_render_argument_errors():
    ok = {"job_name": "x", "log_dir": "logs"}
    with pytest.raises(ValueError, match="commands"):
        render_qsub_script([], **ok)
    with pytest.raises(ValueError, match="commands"):
        render_qsub_script([[]], **ok)
    with pytest.raises(ValueError, match="resources"):
        render_qsub_script([["true"]], resources={"rt_G.small": 0}, **ok)
    with pytest.raises(ValueError, match="resources"):
        render_qsub_script([["true"]], resources={"rt G": 1}, **ok)
    with pytest.raises(ValueError, match="walltime"):
        render_qsub_script([["true"]], walltime="1 day", **ok)
    with pytest.raises(ValueError, match="log_dir"):
        render_qsub_script([["true"]], job_name="x", log_dir="my logs")
    with pytest.raises(ValueError, match="job_name"):
        render_qsub_script([["true"]], job_name="//", log_dir="logs")


def test_sge_job_name():
    assert sge_job_name("v2/lr=0.1 bs:32") == "v2_lr_0.1_bs_32"
    assert sge_job_name("0-shard") == "job_0-shard"
    assert sge_job_name("extract*?@x") == "extract_x"


def test_packaged_template_loads():
    text = load_qsub_template()
    assert text.startswith("#!/bin/bash\n") and "{{command}}" in text and "#$ -j y" in text


def test_write_qsub_script_atomic_and_executable(tmp_path):
    path = write_qsub_script(tmp_path / "sub" / "job.sh", "#!/bin/bash\necho one\n")
    assert path.read_text() == "#!/bin/bash\necho one\n"
    assert path.stat().st_mode & stat.S_IXUSR
    write_qsub_script(path, "#!/bin/bash\necho two\n")
    assert path.read_text() == "#!/bin/bash\necho two\n"
    assert [p.name for p in path.parent.iterdir()] == ["job.sh"]  # no temporary left behind


# --------------------------------------------------------------------------- qsub submission

FAKE_QSUB = """#!/bin/bash
echo "$1" >> "$QSUB_RECORD"
case "$QSUB_MODE" in
  plain) echo 'Your job 12345 ("v2_job") has been submitted' ;;
  array) echo 'Your job-array 67890.1-4:1 ("sweep") has been submitted' ;;
  terse) echo '13579.1-3:1' ;;
  junk) echo 'submitted, probably' ;;
  fail) echo 'Unable to run job: job rejected: no such resource rt_X' >&2; echo 'Exiting.' >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_qsub(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qsub = bin_dir / "qsub"
    qsub.write_text(FAKE_QSUB)
    qsub.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("QSUB_RECORD", str(tmp_path / "record"))
    return tmp_path / "record"


def test_submit_qsub_absent_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert submit_qsub(tmp_path / "job.sh") is None


def test_submit_qsub_parses_job_ids(fake_qsub, monkeypatch, tmp_path):
    script = write_qsub_script(tmp_path / "job.sh", "#!/bin/bash\ntrue\n")
    for mode, job_id in [("plain", "12345"), ("array", "67890"), ("terse", "13579")]:
        monkeypatch.setenv("QSUB_MODE", mode)
        assert submit_qsub(script) == job_id
    assert fake_qsub.read_text().splitlines() == [str(script)] * 3
    monkeypatch.setenv("QSUB_MODE", "junk")
    with pytest.raises(RuntimeError, match="no job id"):
        submit_qsub(script)


def test_submit_qsub_failure_raises_first_stderr_line(fake_qsub, monkeypatch, tmp_path):
    monkeypatch.setenv("QSUB_MODE", "fail")
    with pytest.raises(RuntimeError, match=r"exit 1\): Unable to run job: job rejected") as info:
        submit_qsub(tmp_path / "job.sh")
    assert "Exiting" not in str(info.value)


# --------------------------------------------------------------------------- Slurm parameters

def test_slurm_parameters_exact():
    assert slurm_parameters(job_name="v2") == {
        "name": "v2", "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1, "cpus_per_task": 8, "timeout_min": 1440}
    assert slurm_parameters(job_name="v2", partition="gpu", nodes=2, gpus_per_node=4, cpus_per_task=32,
                            timeout_min=60, mem_gb=128, array_parallelism=8, constraint="a100",
                            extra={"slurm_account": "lab", "cpus_per_task": 16}) == {
        "name": "v2", "nodes": 2, "tasks_per_node": 1, "gpus_per_node": 4, "cpus_per_task": 16, "timeout_min": 60,
        "mem_gb": 128, "slurm_partition": "gpu", "slurm_array_parallelism": 8, "slurm_constraint": "a100",
        "slurm_account": "lab"}
    assert slurm_parameters(job_name="cpu", gpus_per_node=0)["gpus_per_node"] == 0


@pytest.mark.parametrize("bad", [{"nodes": 0}, {"gpus_per_node": -1}, {"cpus_per_task": 0}, {"timeout_min": 0},
                                 {"array_parallelism": 0}, {"nodes": 1.5}, {"nodes": True}, {"mem_gb": 0}])
def test_slurm_parameters_bad_counts(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        slurm_parameters(job_name="x", **bad)


# --------------------------------------------------------------------------- ClusterCommand

def test_cluster_command_builds_torchrun_from_job_environment():
    env = FakeEnv(["gpu-node-07", "gpu-node-08"], 2, "4242")
    cmd = ClusterCommand(["python", "experiments/v2.py", "job", "-d", "0,1,2,3"], nproc_per_node=4, torchrun=True)
    port = rdzv_port("4242")
    assert 29500 <= port < 32768 and port == rdzv_port("4242") != rdzv_port("4243")
    assert cmd.command(env) == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", f"gpu-node-07:{port}", "--rdzv-id", "4242",
                                "experiments/v2.py", "job", "-d", "0,1,2,3"]
    cmd.port = 29999
    assert "gpu-node-07:29999" in cmd.command(env)
    assert "--standalone" in cmd.command(FakeEnv(["n1"], 1, "5"))
    plain = ClusterCommand(["python", "a.py"])
    assert plain.command(env) == ["python", "a.py"]
    assert pickle.loads(pickle.dumps(cmd)) == cmd


def test_cluster_command_runs_in_workdir(tmp_path):
    cmd = ClusterCommand(marker_cmd("marker"), workdir=str(tmp_path))
    assert cmd.run(FakeEnv(["localhost"], 1, "1")) == 0
    assert (tmp_path / "marker").read_text() == "ok"
    with pytest.raises(subprocess.CalledProcessError):
        ClusterCommand([sys.executable, "-c", "raise SystemExit(3)"]).run(FakeEnv(["localhost"], 1, "1"))


# --------------------------------------------------------------------------- submit_slurm through submitit

@pytest.fixture
def submitit_env(monkeypatch):
    pytest.importorskip("submitit")
    # The local executor unpickles ClusterCommand in a fresh interpreter: make sure it finds this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def test_submit_slurm_local_one_and_array(tmp_path, submitit_env, caplog):
    params = slurm_parameters(job_name="t", nodes=2, gpus_per_node=0, cpus_per_task=1, timeout_min=5,
                              partition="gpu", array_parallelism=2)
    with caplog.at_level("WARNING", logger="retrieval.cluster"):
        jobs = submit_slurm([marker_cmd("single")], folder=tmp_path / "sub1", parameters=params, workdir=tmp_path,
                            cluster="local")
    assert "nodes=2 becomes 1" in caplog.text
    assert len(jobs) == 1 and jobs[0].result() == 0
    assert (tmp_path / "single").read_text() == "ok"
    jobs = submit_slurm([marker_cmd("shard0"), marker_cmd("shard1")], folder=tmp_path / "sub2", parameters=params,
                        workdir=tmp_path, cluster="local")
    assert [j.result() for j in jobs] == [0, 0]
    assert (tmp_path / "shard0").read_text() == (tmp_path / "shard1").read_text() == "ok"


def test_submit_slurm_debug_torchrun(tmp_path, submitit_env):
    """Through submitit's JobEnvironment: one node, so torchrun runs standalone with 2 workers."""
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "out").mkdir()
    params = slurm_parameters(job_name="t", gpus_per_node=0, cpus_per_task=1, timeout_min=5)
    [job] = submit_slurm([["python", "worker.py", "out"]], folder=tmp_path / "sub", parameters=params,
                         torchrun=True, nproc_per_node=2, workdir=tmp_path, cluster="debug")
    assert job.result() == 0
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["rank0_of2_local0", "rank1_of2_local1"]


def test_submit_slurm_argument_checks(tmp_path, submitit_env, monkeypatch):
    params = slurm_parameters(job_name="t", gpus_per_node=0)
    with pytest.raises(ValueError, match="commands"):
        submit_slurm([], folder=tmp_path, parameters=params, cluster="local")
    with pytest.raises(ValueError, match="tasks_per_node"):
        submit_slurm([["true"]], folder=tmp_path, parameters={**params, "tasks_per_node": 2}, torchrun=True,
                     cluster="local")
    # submitit checks slurm_* names even when the executor is local: a typo is not silently dropped.
    with pytest.raises(NameError, match="partiton"):
        submit_slurm([["true"]], folder=tmp_path, parameters={**params, "slurm_partiton": "gpu"}, cluster="local")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun: refuse to fall back to running here
    with pytest.raises(RuntimeError, match="no Slurm"):
        submit_slurm([["true"]], folder=tmp_path / "sub", parameters=params)


def test_submit_slurm_without_submitit(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ImportError, match=r"pip install landmark-retrieval\[cluster\]"):
        submit_slurm([["true"]], folder=tmp_path, parameters={"name": "x"})
    with pytest.raises(ImportError, match="cluster"):
        ClusterCommand(["true"])()
