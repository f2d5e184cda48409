"""The train state, its sharded initialisation and the jitted train step.

The step is one function for every method: the model gives its outputs, `objective.training_loss`
turns them into a loss (config.loss.name picks the method), optax updates, temperatures are clamped.
Locked towers (config.optim.lock_image / lock_text, optim.py) enter the loss with their gradient
stopped, so their backward pass is not computed at all.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from beta_clip_jax import objective, optim, sharding
from beta_clip_jax.data.transforms import normalize
from beta_clip_jax.methods import build_model
from beta_clip_jax.models import layers
from beta_clip_jax.models.clip import param_shapes

# The batch entry (and metric) holding the input pipeline's counters (train_step).
DATA_COUNTS = "data_counts"


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def text_shapes(config) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of an unpacked batch's text arrays (caption, sentences, phrases)."""
    from beta_clip_jax.data.hierarchy import level_lengths

    data = config.data
    lengths = level_lengths(data)
    return {
        "caption": (lengths["caption_length"],),
        "sentences": (data.max_sentences, lengths["sentence_length"]),
        "phrases": (data.max_phrases, lengths["phrase_length"]),
    }


def image_size(config) -> int:
    return int(config.data.get("image_size") or config.model.image_size)


def text_inputs(batch: dict) -> dict:
    """The text arrays of a batch (unpacked or packed; models/clip.py encode_texts)."""
    from beta_clip_jax.data.packing import PACKED_KEYS, TEXT_KEYS

    return {k: batch[k] for k in (*TEXT_KEYS, *PACKED_KEYS) if k in batch}


def dummy_inputs(config, batch: int = 1):
    """Zero inputs with the unpacked batch layout of docs/CONTRACTS.md, for init and shapes."""
    size = image_size(config)
    texts = {k: jnp.zeros((batch, *shape), jnp.int32) for k, shape in text_shapes(config).items()}
    return jnp.zeros((batch, size, size, 3), jnp.float32), texts


def abstract_state(model, tx, config):
    """(boxed abstract params, abstract optimiser state): shapes and, for the params, logical
    axis names; nothing allocated."""
    boxed_params = layers.abstract_params(model, *dummy_inputs(config), boxed=True)
    return boxed_params, jax.eval_shape(tx.init, nn.unbox(boxed_params))


def abstract_params(model_cfg):
    """Unboxed abstract params of the model `model_cfg` describes: the target a checkpoint of
    it restores onto (checkpoint.load_params_from_workdir, which imports no model)."""
    return param_shapes(build_model(model_cfg))


def state_shardings(model, tx, config, mesh):
    """Shardings for params and optimiser state (moments follow their parameters)."""
    boxed_params, abstract_opt = abstract_state(model, tx, config)
    with jax.set_mesh(mesh):
        params_sh = sharding.param_shardings(boxed_params, mesh)
    params_abs = nn.unbox(boxed_params)
    opt_sh = sharding.opt_state_shardings(abstract_opt, params_abs, params_sh, mesh)
    return params_abs, params_sh, abstract_opt, opt_sh


def init_state(model, tx, config, mesh, params_sh, opt_sh, init_params=None):
    """Random (or given) params and a fresh optimiser state, created directly sharded."""
    if init_params is None:

        def init(rng):
            params = nn.unbox(model.init(rng, *dummy_inputs(config))["params"])
            return params, tx.init(params)

        with jax.set_mesh(mesh):
            return jax.jit(init, out_shardings=(params_sh, opt_sh))(jax.random.key(config.seed))
    params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), init_params, params_sh)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return params, opt_state


def _loss_and_grads(model, loss_cfg, params, batch, step, optim_cfg=None):
    def loss_fn(p):
        p = optim.stop_frozen_gradients(p, optim_cfg)  # frozen values: zero gradient, no backward
        images = normalize(batch["image"])
        outputs = model.apply({"params": p}, images, text_inputs(batch))
        return objective.training_loss(outputs, batch["valid"], loss_cfg, step)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads


def split_micro_batches(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] with micro-batch j = x[j::n] (strided, not contiguous).

    The batch is sharded over devices in contiguous blocks; taking every n-th example keeps each
    micro-batch spread over all devices (each device's block holds B/(n D) of every micro-batch),
    so no example moves between devices. A contiguous split would put micro-batch 0 on the first
    1/n of the devices and make XLA reshuffle the batch.
    """
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)


def train_step(state: TrainState, batch, *, model, tx, loss_cfg, grad_accum: int, optim_cfg=None):
    """One optimiser step; with grad_accum > 1 the batch is split into micro-batches.

    `optim_cfg` (config.optim) names the locked towers; None locks nothing. An optional
    "data_counts" [B, C] (each process's data counters in its first row) is summed over the
    whole batch into metrics["data_counts"]: the counters of all processes, added up inside
    the step rather than by a collective of the host."""
    batch = dict(batch)
    data_counts = batch.pop(DATA_COUNTS, None)
    loss_and_grads = functools.partial(_loss_and_grads, model, loss_cfg, optim_cfg=optim_cfg)
    if grad_accum <= 1:
        loss, metrics, grads = loss_and_grads(state.params, batch, state.step)
    else:
        micro = jax.tree.map(lambda x: split_micro_batches(x, grad_accum), batch)

        def body(carry, mb):
            loss, metrics, grads = loss_and_grads(state.params, mb, state.step)
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        zeros = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(
                lambda: loss_and_grads(
                    state.params, jax.tree.map(lambda x: x[0], micro), state.step
                )
            ),
        )
        total, _ = jax.lax.scan(body, zeros, micro)
        loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum, total)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = objective.clamp_log_temperatures(params)
    grad_norm = optax.tree.norm(grads)
    # A non-finite step keeps the previous state, so nothing bad can reach a checkpoint; the host
    # sees `finite == 0` and stops the run naming the step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = dict(metrics)
    metrics["finite"] = finite.astype(jnp.float32)
    metrics["loss"] = loss
    metrics["grad_norm"] = grad_norm
    metrics["param_norm"] = optax.tree.norm(params)
    if data_counts is not None:
        metrics[DATA_COUNTS] = data_counts.sum(axis=0)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(model, tx, config, mesh, params_sh, opt_sh):
    """The train step jitted with explicit shardings and the state donated."""
    optim.check_lock(config.optim, model.config)  # before tracing: a clear error, not a deep one
    state_sh = TrainState(step=sharding.replicated(mesh), params=params_sh, opt_state=opt_sh)
    batch_sh = sharding.batch_sharding(mesh)
    fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_cfg=config.loss,
        grad_accum=int(config.optim.get("grad_accum", 1)),
        optim_cfg=config.optim,
    )
    return jax.jit(
        fn,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
