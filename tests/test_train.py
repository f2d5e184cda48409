"""The training loop: one step, sharded runs equal to one device, resume equal to no stop."""

import os
import signal
import threading
import time

import jax
import numpy as np
import pytest
from train_helpers import losses, tiny_config

from beta_clip_jax import checkpoint
from beta_clip_jax.reporting.metrics_writer import read_metrics
from beta_clip_jax.step import abstract_params
from beta_clip_jax.train import Stopped, train_and_evaluate


def test_one_step_writes_workdir_contract(tmp_path):
    # Every test keeps num_steps=6 (the lr schedule is part of the compiled step), so the step
    # compiles once per mesh for the whole run; stop_at_step shortens it.
    config = tiny_config(stop_at_step=1)
    train_and_evaluate(config, str(tmp_path))
    records = read_metrics(str(tmp_path))
    step1 = [r for r in records if "train/loss" in r][0]
    assert step1["step"] == 1 and np.isfinite(step1["train/loss"])
    assert "perf/examples_per_sec" in step1 and "train/lr_pooler" in step1
    assert (tmp_path / "config.json").exists()
    assert checkpoint.has_checkpoint(str(tmp_path))


def test_relative_workdir(tmp_path, monkeypatch):
    """`--workdir=runs/demo` (the README's command) is relative to the current directory."""
    monkeypatch.chdir(tmp_path)
    train_and_evaluate(tiny_config(stop_at_step=1), "runs/demo")
    assert checkpoint.has_checkpoint(str(tmp_path / "runs" / "demo"))
    params, _, step = checkpoint.load_params_from_workdir("runs/demo", abstract_params)
    assert step == 1 and "pooler" in params


@pytest.mark.parametrize("mesh", [{"mesh.fsdp": 1}, {"mesh.fsdp": 4}], ids=["dp", "fsdp"])
def test_eight_devices_match_one_device(tmp_path, mesh):
    assert jax.device_count() == 8
    one = tiny_config(stop_at_step=3)
    eight = tiny_config(stop_at_step=3, **{"mesh.num_devices": 0, **mesh})
    train_and_evaluate(one, str(tmp_path / "one"))
    train_and_evaluate(eight, str(tmp_path / "eight"))
    a, b = (
        losses(read_metrics(str(tmp_path / "one"))),
        losses(read_metrics(str(tmp_path / "eight"))),
    )
    assert sorted(a) == [1, 2, 3]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5, atol=2e-5)


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    full = tiny_config()
    train_and_evaluate(full, str(tmp_path / "full"))
    stopped = tiny_config(stop_at_step=4)
    train_and_evaluate(stopped, str(tmp_path / "resumed"))
    assert max(losses(read_metrics(str(tmp_path / "resumed")))) == 4
    train_and_evaluate(tiny_config(), str(tmp_path / "resumed"))
    a = losses(read_metrics(str(tmp_path / "full")), start=5)
    b = losses(read_metrics(str(tmp_path / "resumed")), start=5)
    assert sorted(a) == [5, 6]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-6, atol=1e-6)


def test_sigterm_saves_and_resume_matches(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(checkpoint_every=100)

    def send_sigterm_after_step_1():
        deadline = time.time() + 300
        while time.time() < deadline:
            if any(r.get("step", 0) >= 1 for r in read_metrics(workdir)):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=send_sigterm_after_step_1)
    thread.start()
    with pytest.raises(Stopped, match="SIGTERM: stopped at step"):
        train_and_evaluate(config, workdir)
    thread.join()
    stopped_at = max(losses(read_metrics(workdir)))
    assert 1 <= stopped_at < 6
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=3)
    assert ckpt.latest_step() == stopped_at
    ckpt.close()
    train_and_evaluate(tiny_config(checkpoint_every=100), workdir)
    train_and_evaluate(tiny_config(checkpoint_every=100), str(tmp_path / "full"))
    a = losses(read_metrics(str(tmp_path / "full")), start=stopped_at + 1)
    b = losses(read_metrics(workdir), start=stopped_at + 1)
    assert sorted(b) == list(range(stopped_at + 1, 7))
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-6, atol=1e-6)


def test_invalid_sizes_fail_before_compile(tmp_path):
    with pytest.raises(ValueError, match="not divisible by the β-CAL group"):
        train_and_evaluate(tiny_config(**{"loss.group_size": 3}), str(tmp_path))
    with pytest.raises(ValueError, match="data-parallel size 8"):
        config = tiny_config(batch_size=4, **{"loss.group_size": 4, "mesh.num_devices": 0})
        train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_eval_mode_keeps_the_runs_config(tmp_path):
    """--config.mode=eval scores the workdir's checkpoint and leaves its config.json alone."""
    train_and_evaluate(tiny_config(stop_at_step=1), str(tmp_path))
    before = (tmp_path / "config.json").read_text()
    evals = {"synthetic": {"kind": "synthetic", "num_examples": 4, "batch_size": 4}}
    config = tiny_config(mode="eval", seed=5)
    config.evals = evals
    results = train_and_evaluate(config, str(tmp_path))
    assert "synthetic" in results and "box_hard" in results["synthetic"]
    assert (tmp_path / "config.json").read_text() == before
    assert (tmp_path / "eval_results.json").exists()


def test_crash_and_rerun_log_each_step_once(tmp_path, monkeypatch):
    """A run dies at step 5 after its step-3 checkpoint; the rerun resumes at 3 and drops the
    dead run's lines for 4 and 5 from metrics.jsonl, so every step is logged once."""
    from beta_clip_jax import train

    workdir = str(tmp_path)
    real_log = train._log_step

    def dying_log(step, *args, **kwargs):
        out = real_log(step, *args, **kwargs)
        if step == 5:
            raise RuntimeError("simulated crash after step 5")
        return out

    monkeypatch.setattr(train, "_log_step", dying_log)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(tiny_config(checkpoint_every=3), workdir)
    assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    train_and_evaluate(tiny_config(checkpoint_every=3), workdir)
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_stop_for_bad_data_keeps_a_checkpoint(tmp_path):
    """Too many unusable records: the run stops naming them, after saving what it trained."""
    from test_data_sources import make_jsonl

    from beta_clip_jax.data.pipeline import DataSkipError

    path, _ = make_jsonl(str(tmp_path / "data"), n=24, bad={3: "corrupt_image", 7: "empty_caption"})
    config = tiny_config(
        **{"data.name": "jsonl", "data.path": path, "data.max_skip_fraction": 0.01}
    )
    workdir = str(tmp_path / "run")
    with pytest.raises(DataSkipError, match="data.max_skip_fraction") as err:
        train_and_evaluate(config, workdir)
    assert "prepare" in str(err.value)
    trained = max(r["step"] for r in read_metrics(workdir) if "train/loss" in r)
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=3)
    assert ckpt.latest_step() == trained >= 1
    ckpt.close()
