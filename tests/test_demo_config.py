"""A short run of the demo config itself: CLIP trains, then β-CAL switches on halfway and trains."""

import os

import numpy as np
from ml_collections import config_flags

from beta_clip_jax.reporting.metrics_writer import read_metrics
from beta_clip_jax.train import train_and_evaluate

DEMO = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"
)


def test_short_demo_run_both_phases_learn(tmp_path):
    config = config_flags.config_flags._ConfigFileParser(name="config").parse(DEMO)
    config.num_steps = 60  # β-CAL from step 30 (loss.cal_start_step follows num_steps)
    config.optim.warmup_steps = 5
    config.log_every = 5
    config.checkpoint_every = 1000
    config.evals = {}
    train_and_evaluate(config, str(tmp_path))
    rows = {r["step"]: r for r in read_metrics(str(tmp_path)) if "train/loss" in r}
    steps = sorted(rows)
    assert config.loss.cal_start_step == 30
    assert all(np.isfinite(rows[s]["train/loss"]) for s in steps)
    clip_phase = [s for s in steps if s <= 30]
    cal_phase = [s for s in steps if s > 30]
    # Before the switch the objective is the global loss alone, and it falls.
    for s in clip_phase:
        assert rows[s]["train/loss"] == rows[s]["train/loss_global"], rows[s]
    first, last = clip_phase[:2], clip_phase[-2:]
    mean = lambda key, at: np.mean([rows[s][key] for s in at])  # noqa: E731
    assert mean("train/loss_global", last) < 0.9 * mean("train/loss_global", first)
    # After it β-CAL is added, its pooler starts learning, and its loss falls.
    for s in cal_phase:
        assert rows[s]["train/loss"] > rows[s]["train/loss_global"]
        assert rows[s]["train/lr_pooler"] > 0
    assert all(rows[s]["train/lr_pooler"] == 0 for s in clip_phase)
    # Its value is logged before the switch too (weight 0, pooler untrained): the baseline.
    before, last = clip_phase[-2:], cal_phase[-2:]
    assert mean("train/loss_cal", last) < 0.95 * mean("train/loss_cal", before), {
        s: rows[s]["train/loss_cal"] for s in steps
    }
