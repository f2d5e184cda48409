"""What a run reports about itself: the ETA, MFU, a W&B run (offline) and a profiler trace."""

import glob
import json
import os
import struct

import jax
import numpy as np
import pytest
from train_helpers import tiny_config

from beta_clip_jax import perf
from beta_clip_jax.config_check import ConfigError
from beta_clip_jax.reporting import metrics_writer
from beta_clip_jax.reporting.metrics_writer import Progress, format_duration, read_metrics
from beta_clip_jax.train import train_and_evaluate


def test_eta_shows_days_past_24_hours():
    assert format_duration(33 * 3600) == "1d 09:00:00"
    assert format_duration(9 * 3600 + 59) == "09:00:59"
    assert format_duration(3 * 86400 + 61) == "3d 00:01:01"
    assert format_duration(float("nan")) == "?"


def test_eta_leaves_evaluation_time_out(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(metrics_writer.time, "perf_counter", lambda: clock[0])
    progress = Progress(total_steps=120_010, examples_per_step=8, start_step=0)
    for _ in range(10):  # ten 1-second steps, then a 600-second evaluation
        clock[0] += 1.0
        progress.add(0.0)
    clock[0] += 600.0
    progress.exclude(600.0)
    summary = progress.summary(10)
    assert summary["perf/steps_per_sec"] == pytest.approx(1.0)
    assert progress.eta == pytest.approx(120_000.0)
    assert "ETA 1d 09:20:00" in progress.line(10, summary)


def _wandb_records(run_dir: str) -> list:
    """The records of an offline W&B run file (LevelDB log blocks of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = open(path, "rb").read()
    block, pos, pending, records = 32768, 7, b"", []  # 7: the ":W&B" header, magic, version
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture(scope="module")
def telemetry_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("telemetry") / "run")
    config = tiny_config(stop_at_step=4, profile_steps="2,3")
    config.wandb.mode = "offline"
    config.loss.beta = 0.375  # a value the W&B config must carry
    train_and_evaluate(config, workdir)
    return workdir, config


def test_metrics_have_mfu_from_the_counted_step(telemetry_run):
    workdir, config = telemetry_run
    records = read_metrics(workdir)
    counted = next(r for r in records if "perf/flops_per_step" in r)
    flops, peak = counted["perf/flops_per_step"], counted["perf/peak_tflops_per_device"]
    logged = [r for r in records if "perf/mfu" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:  # TFLOP/s per device = FLOPs per step x steps per second (one device)
        expected = flops * r["perf/steps_per_sec"] / 1e12
        assert r["perf/tflops_per_device"] == pytest.approx(expected, rel=1e-6)
        assert r["perf/mfu"] == pytest.approx(expected / peak, rel=1e-6)
    assert flops > 0


def test_step_flops_match_the_compiled_unrolled_step():
    """perf's count (the unpartitioned step, lowered) against XLA's analysis of the compiled
    step with its layers unrolled, on one batch; the scanned step's own count sees each layer
    once, which is why perf does not use it."""
    from beta_clip_jax.bench.step_timing import Setup, unrolled
    from beta_clip_jax.config_check import resolve_config

    config = resolve_config(tiny_config())
    scanned = Setup(config)
    flops, _ = perf.train_step_flops(
        config, scanned.tx, scanned.mesh, scanned.abstract_state(), scanned.batch
    )
    twin = Setup(unrolled(config))
    twin.batch = scanned.batch
    with jax.set_mesh(twin.mesh):
        compiled = twin.jitted.lower(twin.abstract_state(), twin.batch).compile()
    assert flops == pytest.approx(perf.cost(compiled)["flops"], rel=0.1)
    with jax.set_mesh(scanned.mesh):
        own = perf.cost(scanned.jitted.lower(scanned.abstract_state(), scanned.batch).compile())
    assert own["flops"] < 0.8 * flops


def test_wandb_offline_run_holds_metrics_and_config(telemetry_run):
    workdir, _ = telemetry_run
    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    records = _wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["loss"]["beta"] == 0.375 and config["model"]["variant"] == "tiny"
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    losses = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    jsonl = {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[s] for s in jsonl], [jsonl[s] for s in jsonl], rtol=1e-6)
    assert open(os.path.join(workdir, metrics_writer.WANDB_ID_FILE)).read().strip() in run_dir


def test_profile_steps_leave_a_tensorboard_trace(telemetry_run):
    workdir, _ = telemetry_run
    traces = glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    profile = jax.profiler.ProfileData.from_file(traces[0])
    steps = {
        event.name
        for plane in profile.planes
        for line in plane.lines
        for event in line.events
        if event.name.startswith("train")
    }
    # The trace spans steps 2 and 3 only (StepTraceAnnotation names the events "train").
    stats = [
        dict(event.stats)
        for plane in profile.planes
        for line in plane.lines
        for event in line.events
        if event.name == "train"
    ]
    assert steps == {"train"}
    assert sorted({int(s["step_num"]) for s in stats}) == [2, 3]


def test_bad_telemetry_fields_fail_before_compile(tmp_path):
    with pytest.raises(ConfigError, match="profile_steps"):
        train_and_evaluate(tiny_config(profile_steps="20,10"), str(tmp_path / "a"))
    config = tiny_config()
    config.wandb.mode = "ofline"
    with pytest.raises(ConfigError, match="wandb.mode"):
        train_and_evaluate(config, str(tmp_path / "b"))
