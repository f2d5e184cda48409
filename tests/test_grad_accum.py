"""Gradient accumulation: the mean of the micro-batch gradients, micro-batch j = batch[j::n],
with no example moving between devices."""

import functools
import re

import jax
import numpy as np
import optax
from helpers_tiny import random_params, random_tokens
from train_helpers import tiny_config

from beta_clip_jax import objective, sharding
from beta_clip_jax import step as step_lib
from beta_clip_jax.config_check import resolve_config
from beta_clip_jax.methods import build_model

ACCUM = 2
BATCH = 16


def _setup(batch=BATCH, group=4):
    overrides = {"optim.grad_accum": ACCUM, "loss.group_size": group}
    config = resolve_config(tiny_config(batch_size=batch, **overrides))
    model = build_model(config.model)
    return config, model, random_params(model, seed=3)


def _batch(config, batch=BATCH):
    rng = np.random.default_rng(0)
    size, s, p = config.model.image_size, 2, 3
    valid = np.ones((batch, s + p), bool)
    valid[::3, -1] = False  # some phrase slots empty
    return {
        "image": rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8),
        "caption": random_tokens(batch, 12, seed=5),
        "sentences": random_tokens(batch * (s - 1), 12, seed=1).reshape(batch, s - 1, 12),
        "phrases": random_tokens(batch * p, 6, seed=2).reshape(batch, p, 6),
        "valid": valid,
    }


def _loss(model, loss_cfg, params, batch):
    images = step_lib.normalize(batch["image"])
    out = model.apply({"params": params}, images, step_lib.text_inputs(batch))
    return objective.training_loss(out, batch["valid"], loss_cfg)[0]


def test_accumulated_step_is_the_mean_of_strided_micro_batch_gradients():
    config, model, params = _setup()
    tx = optax.sgd(0.1)
    state = step_lib.TrainState(step=0, params=params, opt_state=tx.init(params))
    batch = _batch(config)
    fn = functools.partial(
        step_lib.train_step, model=model, tx=tx, loss_cfg=config.loss, grad_accum=ACCUM
    )
    new, metrics = jax.jit(fn)(state, batch)

    grad = jax.jit(jax.value_and_grad(functools.partial(_loss, model, config.loss)))
    micro = [jax.tree.map(lambda x, j=j: x[j::ACCUM], batch) for j in range(ACCUM)]
    results = [grad(params, mb) for mb in micro]
    mean_loss = np.mean([float(r[0]) for r in results])
    mean_grad = jax.tree.map(lambda *g: sum(g) / ACCUM, *(r[1] for r in results))
    want = objective.clamp_log_temperatures(
        jax.tree.map(lambda p, g: p - 0.1 * g, params, mean_grad)
    )
    np.testing.assert_allclose(float(metrics["loss"]), mean_loss, rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(new.params)[0], jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_sharded_accumulation_moves_no_examples():
    """On 8 data-parallel devices the compiled step has no all-to-all or collective-permute: each
    device's shard already holds its part of every micro-batch (4 examples per device, groups of
    2, so the β-CAL groups are device-local too; a contiguous split needs collective-permutes)."""
    config, model, _ = _setup(batch=32, group=2)
    config.mesh.num_devices = 0
    mesh = sharding.make_mesh(config.mesh)
    assert sharding.data_parallel_size(mesh) == 8
    tx = optax.sgd(0.1)
    params_abs, params_sh, opt_abs, opt_sh = step_lib.state_shardings(model, tx, config, mesh)
    state_abs = step_lib.TrainState(
        step=jax.ShapeDtypeStruct((), np.int32), params=params_abs, opt_state=opt_abs
    )
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(config, 32))
    jitted = step_lib.jit_train_step(model, tx, config, mesh, params_sh, opt_sh)
    with jax.set_mesh(mesh):
        lowered = jitted.lower(state_abs, batch)
        hlo = lowered.compile().as_text()
    for op in ("all-to-all", "collective-permute"):
        assert op not in hlo, op
    # The towers' activation annotations take effect: activations split over the batch axes.
    constraints = re.findall(r"sdy.sharding_constraint .*", lowered.as_text())
    assert constraints and all('[{"data", "fsdp"}' in c for c in constraints)
