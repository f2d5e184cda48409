"""The shared defaults that every configs/*.py file starts from.

Each section is filled by the module that owns it (model shapes, data, loss), so a new field is
added in one place. Shape fields of the model stay typed placeholders: the variant decides them
unless a run overrides one (`--config.model.vision_layers=4`), and changing only
`--config.model.variant` then changes every shape with it.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from beta_clip_jax import methods
from beta_clip_jax.data.pipeline import default_data_config
from beta_clip_jax.models.variants import OPTION_DEFAULTS, SHAPE_FIELDS
from beta_clip_jax.objective import default_loss_config
from beta_clip_jax.optim import optim_defaults


def model_template(variant: str, **options) -> ml_collections.ConfigDict:
    """config.model: the variant, its shape fields as placeholders, every option with its
    default (every method's fields included) and model.method "" (follows config.method)."""
    cfg = ml_collections.ConfigDict({"variant": variant})
    for field in SHAPE_FIELDS:
        cfg[field] = config_dict.placeholder(int)
    defaults = {**OPTION_DEFAULTS, "method": "", **methods.model_defaults()}
    for field, default in defaults.items():
        cfg[field] = options.pop(field, default)
    for field, value in options.items():
        cfg[field] = value
    return cfg


def base_config(variant: str = "B/16") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"  # "train" | "eval"
    c.seed = 0
    # The training method, a name of the method registry (beta_clip_jax/methods/); "" is
    # loss.name's method (older configs name it there), else beta_clip. loss.name follows it
    # and model.method names its model (config_check.resolve_config).
    c.method = ""
    c.init = ""  # hf:PATH | openai:PATH | a workdir of ours | "" (random)
    c.model = model_template(variant)
    c.data = default_data_config()
    c.loss = default_loss_config()
    c.loss.name = ""  # follows config.method (config_check.resolve_config)
    c.optim = optim_defaults()
    c.batch_size = 64
    c.num_steps = 1000
    c.num_epochs = 0.0  # > 0: overrides num_steps with epochs over the training set
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "num_devices": 0})
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.write_plots = False  # at the end: final table, curves.png, heatmap.png (plots.py)
    c.stop_at_step = 0  # > 0: save and exit at that step as if preempted (for tests and demos)
    # Resume even though fields that change the computation differ from the checkpoint's stored
    # config (logged); otherwise such a rerun stops naming them (config_drift.py).
    c.allow_config_change = False
    c.evals = ml_collections.ConfigDict()
    # "START,END": a jax.profiler trace of steps START..END in workdir/plugins/profile/ (process
    # 0), which TensorBoard's profile plugin opens.
    c.profile_steps = ""
    # Device peak TFLOP/s for perf/mfu (0: the table for known accelerators, else measured).
    c.peak_tflops = 0.0
    # Weights & Biases (process 0): a project (or mode="offline") turns it on.
    c.wandb = ml_collections.ConfigDict(
        {"project": "", "entity": "", "name": "", "group": "", "tags": "", "mode": "", "dir": ""}
    )
    return c
