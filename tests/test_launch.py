"""Launch scripts (dry-run output, remote commands run locally) and multi-process start-up."""

import os
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from beta_clip_jax import distributed

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TRAINER_ARGS = ["--config=configs/demo.py", "--workdir=gs://bucket/runs/r1", "--config.note=a b"]

# A tiny multi-process program (not the trainer): join the cluster, then check a cross-process
# all-gather and a psum over every device of every process.
PROGRAM = textwrap.dedent(
    """
    import numpy as np
    from beta_clip_jax import distributed
    index, count = distributed.maybe_initialize()
    assert distributed.maybe_initialize() == (index, count)  # idempotent
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    gathered = multihost_utils.process_allgather(np.array([index + 1.0]))
    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    local = np.full((jax.local_device_count(),), index + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"),
                                 out_specs=P()))(x)
    print("RESULT", index, count, jax.device_count(), gathered.ravel().tolist(),
          float(psum.addressable_data(0)[0]), flush=True)
    """
)


def _clean_env(**extra):
    """The test's environment without cluster or launch settings, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BETA_CLIP_", "SLURM_", "TPU_", "JAX_COORDINATOR"))
        and k
        not in (
            "DRY_RUN",
            "ZONE",
            "PROJECT_ID",
            "ACCELERATOR_TYPE",
            "RUNTIME_VERSION",
            "CUDA_VISIBLE_DEVICES",
            "VIRTUAL_ENV",
            "CONDA_PREFIX",
        )
    }
    env.update(extra)
    return env


def _launch(script, *args, env=None, check=True, timeout=30):
    cmd = ["bash", str(LAUNCH / script), *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env or _clean_env(), timeout=timeout, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _commands(proc):
    """The dry-run output as argv lists, one per printed command."""
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# --- Cloud TPU ---------------------------------------------------------------------------------


def test_tpu_create_direct_and_queued():
    (cmd,) = _commands(
        _launch(
            "tpu_create.sh",
            "--name=bc",
            "--zone=us-central2-b",
            "--accelerator-type=v4-32",
            "--dry-run",
        )
    )
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "bc"]
    assert "--zone=us-central2-b" in cmd and "--version=tpu-ubuntu2204-base" in cmd
    assert "--accelerator-type=v4-32" in cmd and "--spot" not in cmd

    env = _clean_env(TPU_NAME="bc", ZONE="us-east5-b", PROJECT_ID="proj", DRY_RUN="1")
    out = _launch(
        "tpu_create.sh",
        "--accelerator-type=v6e-16",
        "--queued",
        "--spot",
        "--wait",
        "--",
        "--labels=team=x",
        env=env,
    )
    create, describe = _commands(out)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "bc"]
    for flag in (
        "--node-id=bc",
        "--runtime-version=v2-alpha-tpuv6e",
        "--spot",
        "--project=proj",
        "--zone=us-east5-b",
        "--labels=team=x",
    ):
        assert flag in create
    assert describe[3:5] == ["queued-resources", "describe"]

    bad = _launch("tpu_create.sh", "--name=bc", "--zone=z", "--dry-run", check=False)
    assert bad.returncode != 0 and "accelerator" in bad.stderr


def test_tpu_setup_copies_and_installs_on_all_workers():
    scp, unpack, install = _commands(
        _launch("tpu_setup.sh", "--name=bc", "--zone=z", "--extras=tfds", "--dry-run")
    )
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[6] == "bc:beta_clip_code.tar.gz"
    for cmd in (unpack, install):
        assert cmd[4:6] == ["ssh", "bc"] and "--worker=all" in cmd
    assert "tar -xzf beta_clip_code.tar.gz -C beta_clip_jax" in _flag(unpack, "--command")
    pip = _flag(install, "--command")
    assert "-m pip install" in pip and "'jax[tpu]'" in pip and "./beta_clip_jax[tfds]" in pip
    assert "gcsfs" in pip

    (clone,) = _commands(
        _launch(
            "tpu_setup.sh",
            "--name=bc",
            "--zone=z",
            "--git=https://example.com/r.git",
            "--ref=v1",
            "--no-install",
            "--dry-run",
        )
    )
    assert "--worker=all" in clone and "git clone" in _flag(clone, "--command")
    assert "fetch --quiet --tags origin v1" in _flag(clone, "--command")


def test_tpu_setup_packs_and_unpacks_the_tree(tmp_path):
    """The real copy path, with a stand-in gcloud that runs scp/ssh on a local 'worker' home."""
    home = tmp_path / "home"
    (home / "beta_clip_jax" / "logs").mkdir(parents=True)
    (home / "beta_clip_jax" / "logs" / "old.log").write_text("kept")
    (home / "beta_clip_jax" / "stale.py").write_text("removed")
    fake = tmp_path / "gcloud"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$4" in\n'
        '  scp) cp "$5" "$HOME/beta_clip_code.tar.gz" ;;\n'
        '  ssh) for a in "$@"; do case "$a" in --command=*) cd "$HOME" && bash -c "${a#*=}";;'
        " esac; done ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    env = _clean_env(GCLOUD=str(fake), HOME=str(home))
    proc = _launch("tpu_setup.sh", "--name=bc", "--zone=z", "--no-install", env=env)
    code = home / "beta_clip_jax"
    assert (code / "beta_clip_jax" / "distributed.py").is_file()
    assert (code / "launch" / "tpu_run.sh").is_file() and (code / "setup.cfg").is_file()
    assert (code / "logs" / "old.log").read_text() == "kept" and not (code / "stale.py").exists()
    assert not (code / ".venv").exists() and not (home / "beta_clip_code.tar.gz").exists()
    assert "code in" in proc.stdout


def test_tpu_run_same_command_on_every_worker():
    proc = _launch(
        "tpu_run.sh",
        "--name=bc",
        "--zone=z",
        "--run=r1",
        "--env=FOO=1 2",
        "--dry-run",
        "--",
        *TRAINER_ARGS,
    )
    start, follow = _commands(proc)
    assert start[4:6] == ["ssh", "bc"] and "--worker=all" in start
    remote = _flag(start, "--command")
    job = remote.split("setsid nohup ", 1)[1].split(" > logs/r1.log", 1)[0]
    assert shlex.split(job) == [
        "env",
        "BETA_CLIP_RUN=r1",
        "FOO=1 2",
        "python3",
        "-m",
        "beta_clip_jax.main",
        *TRAINER_ARGS,
    ]
    assert "--worker=0" in follow and "tail -n +1 -F beta_clip_jax/logs/r1.log" in follow[-1]
    assert "warning" not in proc.stderr  # gs:// workdir: no warning

    local = _launch(
        "tpu_run.sh",
        "--name=bc",
        "--zone=z",
        "--follow=none",
        "--dry-run",
        "--",
        "--workdir=/tmp/w",
    )
    assert len(_commands(local)) == 1 and "not gs://" in local.stderr
    assert _launch("tpu_run.sh", "--name=bc", "--zone=z", "--dry-run", check=False).returncode


def test_tpu_logs_stop_delete():
    (tail,) = _commands(
        _launch("tpu_logs.sh", "--name=bc", "--zone=z", "--worker=all", "--lines=50", "--dry-run")
    )
    assert "--worker=all" in tail and _flag(tail, "--command").startswith(
        "tail -n 50 -F beta_clip_jax/logs/latest.log | sed -u"
    )
    (fetch,) = _commands(
        _launch("tpu_logs.sh", "--name=bc", "--zone=z", "--fetch=/tmp/x", "--dry-run")
    )
    assert "--output-directory=/tmp/x" in fetch and "--worker=all" in fetch
    (stop,) = _commands(_launch("tpu_stop.sh", "--name=bc", "--zone=z", "--dry-run"))
    assert "--worker=all" in stop and "kill -TERM" in _flag(stop, "--command")
    (delete,) = _commands(_launch("tpu_delete.sh", "--name=bc", "--zone=z", "--dry-run"))
    assert delete[3:6] == ["tpu-vm", "delete", "bc"]
    (qdelete,) = _commands(
        _launch("tpu_delete.sh", "--name=bc", "--zone=z", "--queued", "--yes", "--dry-run")
    )
    assert qdelete[3:6] == ["queued-resources", "delete", "bc"] and "--force" in qdelete
    assert "--quiet" in qdelete


def test_tpu_remote_commands_run_under_bash(tmp_path):
    """The text tpu_run.sh and tpu_stop.sh send over ssh works: run it here as a worker would."""
    home = tmp_path / "home"
    (home / "beta_clip_jax").mkdir(parents=True)
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        "trap 'echo \"got TERM\"; exit 0' TERM\n"
        'printf "arg:%s\\n" "$@"; echo "run=$BETA_CLIP_RUN"; echo started\n'
        "while true; do sleep 0.1; done\n"
    )
    fake_python.chmod(0o755)

    def remote(script, *args):
        (cmd,) = _commands(_launch(script, "--name=bc", "--zone=z", "--dry-run", *args))
        return subprocess.run(
            ["bash", "-c", _flag(cmd, "--command")],
            cwd=home,
            text=True,
            capture_output=True,
            timeout=20,
            env=_clean_env(HOME=str(home)),
        )

    started = remote(
        "tpu_run.sh", "--run=r1", f"--python={fake_python}", "--follow=none", "--", *TRAINER_ARGS
    )
    assert started.returncode == 0, started.stderr
    logs = home / "beta_clip_jax" / "logs"
    pid = int((logs / "r1.pid").read_text())
    try:
        for _ in range(100):
            if "started" in (logs / "r1.log").read_text():
                break
            time.sleep(0.05)
        assert (logs / "latest.log").resolve() == (logs / "r1.log").resolve()
        lines = (logs / "r1.log").read_text().splitlines()
        assert lines[:5] == ["arg:-m", "arg:beta_clip_jax.main"] + [
            f"arg:{a}" for a in TRAINER_ARGS
        ]
        assert "run=r1" in lines

        again = remote(
            "tpu_run.sh",
            "--run=r2",
            f"--python={fake_python}",
            "--follow=none",
            "--",
            *TRAINER_ARGS,
        )
        assert again.returncode != 0 and "still running" in again.stderr

        stopped = remote("tpu_stop.sh", "--grace=10")
        assert stopped.returncode == 0, stopped.stderr
        assert "got TERM" in (logs / "r1.log").read_text() and not (logs / "r1.pid").exists()
    finally:
        try:
            os.killpg(pid, 9)
        except ProcessLookupError:
            pass


# --- SLURM -------------------------------------------------------------------------------------


def test_slurm_sbatch_srun_line():
    env = _clean_env(
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_ON_NODE="96",
        SLURM_SUBMIT_DIR=str(REPO),
        DRY_RUN="1",
    )
    (srun,) = _commands(_launch("slurm.sbatch", *TRAINER_ARGS, env=env))
    assert srun[0] == "srun"
    for flag in (
        "--nodes=2",
        "--ntasks=16",
        "--ntasks-per-node=8",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=12",
    ):
        assert flag in srun
    task = srun.index(str(LAUNCH / "slurm_run.sh"))
    assert srun[task + 1 : task + 4] == ["--task", "--procs-per=gpu", "--gpus-per-node=8"]
    assert srun[-len(TRAINER_ARGS) - 2 : -len(TRAINER_ARGS)] == ["-m", "beta_clip_jax.main"]
    assert srun[-len(TRAINER_ARGS) :] == TRAINER_ARGS

    (per_node,) = _commands(
        _launch(
            "slurm_run.sh",
            "--dry-run",
            "--nodes=3",
            "--gpus-per-node=4",
            "--procs-per=node",
            "--",
            "python3",
            "-c",
            "pass",
        )
    )
    assert "--ntasks=3" in per_node and "--ntasks-per-node=1" in per_node
    assert per_node[-4:] == ["--", "python3", "-c", "pass"]


def test_slurm_task_environment(tmp_path):
    task = {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "77"}
    cmd = ["--task", "--dry-run", "--gpus-per-node=8", "--", "python3", "-m", "beta_clip_jax.main"]

    def task_env(*extra, **env):
        (line,) = _commands(_launch("slurm_run.sh", *extra, *cmd, env=_clean_env(**task, **env)))
        assert line[0] == "env" and line[-3:] == ["python3", "-m", "beta_clip_jax.main"]
        return dict(word.split("=", 1) for word in line[1:-3])

    assert task_env() == {"BETA_CLIP_LOCAL_DEVICE_IDS": "3"}
    assert task_env(CUDA_VISIBLE_DEVICES="5") == {"BETA_CLIP_LOCAL_DEVICE_IDS": "0"}
    per_node = task_env("--procs-per=node")
    assert per_node == {"BETA_CLIP_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"}

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a1\\ngpu-a2\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    explicit = task_env(
        "--explicit", SLURM_JOB_NODELIST="gpu-a[1-2]", PATH=f"{bin_dir}:{os.environ['PATH']}"
    )
    assert explicit["BETA_CLIP_COORDINATOR"] == f"gpu-a1:{77 % 4096 + 61440}"
    assert explicit["BETA_CLIP_NUM_PROCESSES"] == "16"
    assert explicit["BETA_CLIP_PROCESS_ID"] == "3"


# --- local cluster and jax.distributed ---------------------------------------------------------


def test_local_cluster_dry_run():
    proc = _launch(
        "local_cluster.sh", "--dry-run", "--devices=4", "--port=23456", "3", *TRAINER_ARGS
    )
    lines = proc.stdout.splitlines()
    assert lines[-1] == "wait" and len(lines) == 4
    for i, line in enumerate(lines[:3]):
        argv = shlex.split(line.split(" > ", 1)[0])
        env = dict(w.split("=", 1) for w in argv[1:7])
        assert env["BETA_CLIP_COORDINATOR"] == "127.0.0.1:23456"
        assert env["BETA_CLIP_NUM_PROCESSES"] == "3" and env["BETA_CLIP_PROCESS_ID"] == str(i)
        assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
        assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")
        assert env["XLA_FLAGS"].count("device_count") == 1  # the inherited count is replaced
        assert argv[8:] == ["-m", "beta_clip_jax.main", *TRAINER_ARGS]
        assert line.endswith(f"process_{i}.log 2>&1 &")


def test_local_cluster_two_processes_agree(tmp_path):
    proc = _launch(
        "local_cluster.sh",
        "--devices=2",
        f"--log-dir={tmp_path}",
        "--timeout=60",
        "--quiet",
        "2",
        "--",
        sys.executable,
        "-c",
        PROGRAM,
        timeout=90,
    )
    results = []
    for i in range(2):
        (line,) = [
            s
            for s in (tmp_path / f"process_{i}.log").read_text().splitlines()
            if s.startswith("RESULT")
        ]
        results.append(line.split(maxsplit=2))
    assert [r[1] for r in results] == ["0", "1"]
    # Same process count, 4 global devices, gathered [1, 2], psum 2 * (1 + 2) on both.
    assert results[0][2] == results[1][2] == "2 4 [1.0, 2.0] 6.0"
    assert "process 1: exit 0" in proc.stderr


def test_local_cluster_failure_stops_the_others(tmp_path):
    program = (
        "import os, sys, time\n"
        "if os.environ['BETA_CLIP_PROCESS_ID'] == '1': print('boom'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    proc = _launch(
        "local_cluster.sh",
        "--quiet",
        "--grace=2",
        f"--log-dir={tmp_path}",
        "2",
        "--",
        sys.executable,
        "-c",
        program,
        check=False,
    )
    assert proc.returncode == 3
    assert time.monotonic() - start < 20
    assert "process 1 failed (exit 3)" in proc.stderr and "boom" in proc.stderr


def test_slurm_autodetection_on_cpu(tmp_path):
    """JAX's own SLURM detection path, faked with SLURM variables for two local processes."""
    with socket.socket() as s:  # JAX would derive the port from the job id; avoid clashes
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for i in range(2):
        env = _clean_env(
            JAX_COORDINATOR_PORT=port,
            SLURM_JOB_ID="4242",
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(i),
            SLURM_LOCALID=str(i),
            JAX_PLATFORMS="cpu",
            BETA_CLIP_INIT_TIMEOUT="60",
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", PROGRAM],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, out in enumerate(outs):
        assert f"RESULT {i} 2 2 [1.0, 2.0] 3.0" in out, out


def test_detect():
    base = {"TPU_SKIP_MDS_QUERY": "1"}
    assert distributed.detect(base) is None
    explicit = {
        "BETA_CLIP_COORDINATOR": "h:1",
        "BETA_CLIP_NUM_PROCESSES": "2",
        "BETA_CLIP_PROCESS_ID": "0",
    }
    assert distributed.detect({**base, **explicit}) == "explicit"
    assert distributed.detect({**base, **explicit, "BETA_CLIP_DISTRIBUTED": "0"}) is None
    assert distributed.detect({**base, "BETA_CLIP_DISTRIBUTED": "1"}) == "forced"
    slurm = {
        "SLURM_JOB_ID": "1",
        "SLURM_STEP_NODELIST": "n1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    assert distributed.detect({**base, **slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.detect({**base, **slurm, "SLURM_NTASKS": "8"}) == "slurm"
    with pytest.raises(ValueError, match="BETA_CLIP_PROCESS_ID"):
        distributed.detect({**base, "BETA_CLIP_COORDINATOR": "h:1", "BETA_CLIP_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="BETA_CLIP_DISTRIBUTED"):
        distributed.detect({"BETA_CLIP_DISTRIBUTED": "maybe"})


def test_maybe_initialize_single_process_and_bad_values(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("BETA_CLIP_", "SLURM_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    assert distributed.maybe_initialize() == (0, 1)
    monkeypatch.setenv("BETA_CLIP_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("BETA_CLIP_NUM_PROCESSES", "2")
    monkeypatch.setenv("BETA_CLIP_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"must lie in \[0"):
        distributed.maybe_initialize()
    monkeypatch.setenv("BETA_CLIP_PROCESS_ID", "x")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.maybe_initialize()
