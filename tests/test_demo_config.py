"""A short run of the demo config itself: it trains and its loss falls."""

import os

import numpy as np
from ml_collections import config_flags
from train_helpers import losses

from beta_clip_jax.metrics_writer import read_metrics
from beta_clip_jax.train import train_and_evaluate

DEMO = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"
)


def test_short_demo_run_loss_falls(tmp_path):
    config = config_flags.config_flags._ConfigFileParser(name="config").parse(DEMO)
    config.num_steps = 40
    config.optim.warmup_steps = 5
    config.log_every = 5
    config.checkpoint_every = 1000
    config.evals = {}
    train_and_evaluate(config, str(tmp_path))
    curve = losses(read_metrics(str(tmp_path)))
    first, last = [curve[s] for s in sorted(curve)[:2]], [curve[s] for s in sorted(curve)[-2:]]
    assert np.all(np.isfinite(list(curve.values())))
    assert np.mean(last) < 0.9 * np.mean(first), curve
