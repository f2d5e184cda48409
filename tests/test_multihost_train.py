"""Multi-host proofs (#5, #8): `python -m beta_clip_jax.main` on 2 local processes
(`launch/local_cluster.sh`: jax.distributed on localhost, gloo CPU collectives) trains; resumes
after one process is killed hard; stops all processes at one agreed, saved step when only one
gets SIGTERM; and computes what one process with the same global batch and device count
computes. Plus the command line's config overrides and misspelt fields.

The runs are started together by one module fixture (CPU-bound compiles; on a busy machine more
processes get more of it) and checked by the tests. Every run has a timeout, and clusters a short
grace between SIGTERM and SIGKILL, so a stuck process fails the tests instead of hanging them.
Multi-process runs use no persistent compilation cache (train.py turns it off; see
_no_compilation_cache_on_cpu_clusters).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import numpy as np
import pytest
from train_helpers import load_config

from beta_clip_jax.train import STOPPED_EXIT_STATUS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_test.py"
NUM_STEPS = 10
CHECKPOINT_EVERY = 3
TRAINER_ARGS = [
    f"--config={CONFIG}",
    f"--config.num_steps={NUM_STEPS}",
    f"--config.checkpoint_every={CHECKPOINT_EVERY}",
]
COMPARED_STEPS = 4  # steps of the 1-process reference
RUN_TIMEOUT = 420  # seconds for one whole run, compile included, on a busy machine


def _env():
    """This test's environment (conftest's XLA flags and compile cache) minus cluster settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BETA_CLIP_", "SLURM_", "TPU_", "JAX_COORDINATOR"))
        and k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "CUDA_VISIBLE_DEVICES")
    }
    # A process whose peer never shows up fails after this long instead of 300 s.
    env["BETA_CLIP_INIT_TIMEOUT"] = "60"
    return env


def cluster_command(log_dir, trainer_args, processes=2) -> list[str]:
    """`processes` x 1 CPU device of the trainer command, through launch/local_cluster.sh."""
    return [
        "bash",
        str(REPO / "launch" / "local_cluster.sh"),
        "--quiet",
        "--devices=1",
        "--grace=5",
        f"--timeout={RUN_TIMEOUT}",
        f"--python={sys.executable}",
        f"--log-dir={log_dir}",
        str(processes),
        *trainer_args,
    ]


def one_process_env(devices: int) -> dict:
    """The environment of a single process (no cluster) with `devices` CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return {
        **_env(),
        "BETA_CLIP_DISTRIBUTED": "0",
        "XLA_FLAGS": " ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
    }


def _start_cluster(workdir, log_dir) -> subprocess.Popen:
    cmd = cluster_command(log_dir, [*TRAINER_ARGS, f"--workdir={workdir}"])
    return _popen(cmd, _env(), Path(f"{log_dir}.launcher.txt"))


def _start_reference(workdir) -> subprocess.Popen:
    """This file as a script: 1 process x 2 devices (see test_two_processes_equal_one_process)."""
    env = {**one_process_env(2), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    return _popen([sys.executable, __file__, str(workdir)], env, Path(f"{workdir}.log.txt"))


def _popen(cmd, env, output: Path) -> subprocess.Popen:
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as out:  # a file, not a pipe: nothing blocks on a full pipe
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.output = output
    return proc


def _finish(proc):
    """Waits for a process started by _popen; returns (exit code, its output)."""
    try:
        proc.wait(timeout=RUN_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        _stop(proc)
    return proc.returncode, proc.output.read_text()


def _stop(proc):
    """SIGTERM (the launcher passes it on, then SIGKILLs its processes), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _assert_ok(result, logs=(), expected=0):
    code, output = result
    if code != expected:
        tails = "\n".join(f"--- {p}:\n" + Path(p).read_text()[-4000:] for p in logs)
        raise AssertionError(f"run failed (exit {code}):\n{output[-4000:]}\n{tails}")


def _cluster_logs(log_dir):
    return sorted(Path(log_dir).glob("process_*.log"))


def _records(workdir):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return out


def _losses(records):
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _committed_steps(workdir):
    path = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _trainer_pid(cluster_pid, process_id):
    """The pid of local_cluster.sh's child that runs process `process_id` (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == cluster_pid and f"BETA_CLIP_PROCESS_ID={process_id}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no trainer process {process_id} under pid {cluster_pid}")


def _signal_process_1(proc, workdir, sig, *, after_step, skip=0):
    """Once process 0 has logged a step past `after_step` (in metrics records after the first
    `skip`) and a checkpoint is committed, sends `sig` to process 1; waits for the cluster."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        logged = _losses(_records(workdir)[skip:])
        if logged and max(logged) > after_step and _committed_steps(workdir):
            os.kill(_trainer_pid(proc.pid, 1), sig)
            sent_at = time.monotonic()
            result = _finish(proc)
            return {"sent": True, "result": result, "exit_sec": time.monotonic() - sent_at}
        time.sleep(0.05)
    return {"sent": False, "result": _finish(proc), "exit_sec": None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All runs. Started together: an uninterrupted 2-process run ("full"), the 1-process
    reference, and a 2-process run ("killed") whose process 1 is SIGKILLed mid-run. Then, in
    the killed run's workdir, the same command again ("resumed"), whose process 1 alone gets a
    SIGTERM mid-run, and once more to the end ("finished")."""
    root = tmp_path_factory.mktemp("runs")
    paths = {name: root / name for name in ("full", "reference", "killed")}
    chain = paths["killed"]
    procs = {
        "full": _start_cluster(paths["full"], root / "full_logs"),
        "reference": _start_reference(paths["reference"]),
        "killed": _start_cluster(chain, root / "killed_logs"),
    }
    out = {"paths": paths, "root": root}
    try:
        out["killed"] = _signal_process_1(
            procs["killed"], chain, signal.SIGKILL, after_step=CHECKPOINT_EVERY
        )
        out["killed_records"] = _records(chain)
        out["killed_ckpt"] = (_committed_steps(chain) or [0])[-1]
        if out["killed"]["sent"]:
            procs["resumed"] = _start_cluster(chain, root / "resumed_logs")
            out["resumed"] = _signal_process_1(
                procs["resumed"],
                chain,
                signal.SIGTERM,
                after_step=out["killed_ckpt"],
                skip=len(out["killed_records"]),
            )
            out["resumed_records"] = _records(chain)
            out["resumed_ckpt"] = (_committed_steps(chain) or [0])[-1]
            if out["resumed"]["sent"] and out["resumed"]["result"][0] == STOPPED_EXIT_STATUS:
                procs["finished"] = _start_cluster(chain, root / "finished_logs")
                out["finished"] = _finish(procs["finished"])
        for name in ("full", "reference"):
            out[name] = _finish(procs[name])
    finally:
        for proc in procs.values():
            _stop(proc)
    return out


def test_two_processes_train(runs):
    root, workdir = runs["root"], runs["paths"]["full"]
    _assert_ok(runs["full"], _cluster_logs(root / "full_logs"))
    records = _records(workdir)
    losses = _losses(records)
    # Only process 0 writes: one loss record per step (two writers would duplicate them).
    loss_steps = [r["step"] for r in records if "train/loss" in r]
    assert loss_steps == list(range(1, NUM_STEPS + 1))
    values = np.array([losses[s] for s in loss_steps])
    assert np.all(np.isfinite(values)) and values[-1] < values[0], values
    assert all(r["perf/examples_per_sec_per_device"] > 0 for r in records if "train/loss" in r)
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    config = json.loads((workdir / "config.json").read_text())
    assert config["num_steps"] == NUM_STEPS and config["checkpoint_every"] == CHECKPOINT_EVERY
    assert _committed_steps(workdir)[-1] == NUM_STEPS
    # One data state for both processes (merged: it holds no process), none per process.
    step_dir = workdir / "checkpoints" / str(NUM_STEPS)
    state = json.loads((step_dir / "data_state" / "metadata").read_text())
    assert state["next_batch"] == NUM_STEPS and not (step_dir / "data").exists()


class _MergedIterator(grain.DatasetIterator):
    """One process's view of what 2 processes read: their local batches side by side, as
    `jax.make_array_from_process_local_data` lays them out on a 2-device data axis."""

    def __init__(self, parts):
        super().__init__()
        self.parts = parts

    def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def metrics(self):
        return self.parts[0].metrics()

    def get_state(self):
        return {"parts": [p.get_state() for p in self.parts]}

    def set_state(self, state):
        for p, s in zip(self.parts, state["parts"], strict=True):
            p.set_state(s)

    def close(self):
        for p in self.parts:
            p.close()


def _one_process_reference(workdir):
    """Worker (run as a script): 1 process x 2 devices fed both processes' shards."""
    from beta_clip_jax.data import pipeline
    from beta_clip_jax.train import train_and_evaluate

    build = pipeline.build_train_iterator

    def two_shards(data_cfg, *, batch_size_per_process, process_index, process_count, **kw):
        assert (process_index, process_count) == (0, 1)
        half = batch_size_per_process // 2
        return _MergedIterator(
            [
                build(data_cfg, batch_size_per_process=half, process_index=i, process_count=2, **kw)
                for i in range(2)
            ]
        )

    pipeline.build_train_iterator = two_shards
    config = load_config("tiny_test.py")
    config.num_steps = NUM_STEPS  # the same schedule as the 2-process run ...
    config.checkpoint_every = CHECKPOINT_EVERY
    config.stop_at_step = COMPARED_STEPS  # ... for fewer steps
    train_and_evaluate(config, workdir)


def test_two_processes_equal_one_process(runs):
    """2 processes x 1 device take the steps that 1 process x 2 devices takes on the same data.

    The data pipeline shards records by process (interleaved, each shard shuffled on its own),
    so a plain 1-process run reads other examples; feeding it both shards isolates what this
    test is about: global batch assembly, cross-process collectives and the update. The
    reference runs without the persistent compilation cache: on CPU, executables loaded from
    it can deadlock in cross-device collectives (seen with jax 0.10.2).
    """
    _assert_ok(runs["reference"])
    one = _losses(_records(runs["paths"]["reference"]))
    two = _losses(_records(runs["paths"]["full"]))
    assert sorted(one) == list(range(1, COMPARED_STEPS + 1))
    steps = sorted(one)
    np.testing.assert_allclose([one[s] for s in steps], [two[s] for s in steps], rtol=1e-6)


def _new_losses(records, skip):
    """Step -> loss of the records after `skip`, checking each step is logged once."""
    new = [r for r in records[skip:] if "train/loss" in r]
    steps = [r["step"] for r in new]
    assert steps == sorted(set(steps)), steps
    return _losses(new)


def _assert_same_losses(got, runs):
    full = _losses(_records(runs["paths"]["full"]))
    steps = sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [full[s] for s in steps], rtol=1e-6)


def test_kill_one_process_then_resume_matches(runs):
    """SIGKILL process 1 mid-run: the cluster stops promptly (no hang); rerunning the same
    command resumes from the last committed checkpoint, with the uninterrupted run's losses."""
    killed, ckpt = runs["killed"], runs["killed_ckpt"]
    code, output = killed["result"]
    assert killed["sent"], f"the run ended (exit {code}) before it could be killed:\n{output}"
    assert code != 0 and "process 1 failed" in output, output
    assert killed["exit_sec"] < 60, "the surviving process did not stop promptly"
    assert max(_losses(runs["killed_records"])) < NUM_STEPS
    assert CHECKPOINT_EVERY <= ckpt < NUM_STEPS and ckpt % CHECKPOINT_EVERY == 0

    resumed = _new_losses(runs["resumed_records"], len(runs["killed_records"]))
    assert min(resumed) == ckpt + 1, sorted(resumed)
    _assert_same_losses(resumed, runs)


def test_sigterm_to_one_process_stops_all_then_resume_matches(runs):
    """SIGTERM to process 1 only: both processes agree on a step, save it and exit 75 (stopped
    early, resumable); the same command then finishes the run with the uninterrupted run's
    losses and final step."""
    root, chain = runs["root"], runs["paths"]["killed"]
    assert runs["killed"]["sent"] and runs["resumed"]["sent"], "the run was not signalled"
    _assert_ok(runs["resumed"]["result"], _cluster_logs(root / "resumed_logs"), STOPPED_EXIT_STATUS)
    stopped = runs["resumed_ckpt"]
    resumed = _new_losses(runs["resumed_records"], len(runs["killed_records"]))
    assert max(resumed) == stopped < NUM_STEPS
    for log in _cluster_logs(root / "resumed_logs"):
        assert f"stopping at step {stopped}" in log.read_text(), log

    _assert_ok(runs["finished"], _cluster_logs(root / "finished_logs"))
    finished = _new_losses(_records(chain), len(runs["resumed_records"]))
    assert sorted(finished) == list(range(stopped + 1, NUM_STEPS + 1))
    _assert_same_losses(finished, runs)
    assert _committed_steps(chain)[-1] == NUM_STEPS


def test_config_overrides_and_misspelt_field(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "beta_clip_jax.main",
        f"--config={CONFIG}",
        f"--workdir={tmp_path / 'w'}",
        "--config.num_steps=2",
        "--config.nonexistent=1",
    ]
    env = {**_env(), "BETA_CLIP_DISTRIBUTED": "0"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()


if __name__ == "__main__":
    _one_process_reference(sys.argv[1])
