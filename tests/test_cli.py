"""The training command as a user meets it: config mistakes in one line with exit status 2,
Ctrl-C and SIGTERM stop with a checkpoint and exit status 75, and the rerun resumes."""

import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import CONFIGS

from beta_clip_jax import checkpoint
from beta_clip_jax.reporting.metrics_writer import read_metrics
from beta_clip_jax.train import STOPPED_EXIT_STATUS

TINY = str(CONFIGS / "tiny_test.py")


def _command(*args):
    return [sys.executable, "-m", "beta_clip_jax.main", f"--config={TINY}", *args]


def _env():
    """One CPU device and no persistent compilation cache: a resumed multi-device CPU program
    loaded from the cache can hang in its collectives (jax 0.10.2), which is not under test."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    flags = "--xla_backend_optimization_level=0"
    return {**env, "JAX_PLATFORMS": "cpu", "BETA_CLIP_DISTRIBUTED": "0", "XLA_FLAGS": flags}


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "--config.loss.bta=0.3",
            "config.loss.bta is not a field .* did you mean config.loss.beta",
        ),
        ("--config.data.name=laion", "data.name='laion' is not one of synthetic"),
        ("--config.loss.mode=ec", "loss.mode='ec' is not one of ce, bce"),
        ("--config.data.name=jsonl", "data.name='jsonl' reads data.path, which is not set"),
    ],
)
def test_config_mistakes_are_one_line_with_status_2(tmp_path, override, expected):
    proc = subprocess.run(
        _command(f"--workdir={tmp_path / 'w'}", override),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("beta_clip_jax: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    import re

    assert re.search(expected, lines[0]), lines[0]


def test_unwritable_workdir_is_a_config_mistake(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run(
        _command(f"--workdir={blocker / 'run'}"), env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "cannot write the workdir" in proc.stderr, proc.stderr[-2000:]


def test_ctrl_c_saves_exits_75_and_the_rerun_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    args = _command(f"--workdir={workdir}", "--config.checkpoint_every=100")
    # A new session, so the child's SIGINT handler is not ignored as in a non-interactive shell.
    proc = subprocess.Popen(
        args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= 1 for r in read_metrics(workdir)):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == STOPPED_EXIT_STATUS, err[-3000:]
    assert "SIGINT: saving a checkpoint at the next step" in err and "Traceback" not in err
    stopped = checkpoint.Checkpointer(workdir, every=1, keep=3)
    step = stopped.latest_step()
    stopped.close()
    assert step is not None and 1 <= step < 6
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [r["step"] for r in read_metrics(workdir) if "train/loss" in r and r["step"] > step]
    assert resumed and min(resumed) == step + 1 and max(resumed) == 6
