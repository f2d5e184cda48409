"""Optimiser: AdamW in two parameter groups, as the reference trains β-CLIP.

* towers, projections and the global temperature: linear warm-up then cosine decay, weight decay on
  matrices and embeddings only;
* the pooler (with its own temperature): its own cosine schedule, no warm-up.

The first `model.frozen_positions` rows of the text positional table never change: their gradient is
stopped in the forward pass and their update (weight decay included) is zeroed here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

POOLER_GROUP = "pooler"
MAIN_GROUP = "main"
# Leaf names that get no weight decay: biases, LayerNorm scales and the temperatures.
NO_DECAY_NAMES = frozenset({"bias", "scale", "logit_scale", "logit_bias"})


def optim_defaults() -> ml_collections.ConfigDict:
    """The reference's two AdamW groups and schedules (docs/methods.md, β-CLIP itself)."""
    return ml_collections.ConfigDict(
        {
            "lr": 1e-5,
            "final_lr": 1e-7,
            "warmup_steps": 0,
            "warmup_fraction": 0.001,
            "pooler_lr": 1e-3,
            "pooler_final_lr": 1e-4,
            "weight_decay": 0.01,
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-8,
            "grad_accum": 1,
            "grad_clip": 0.0,
            # SmartCLIP: the mask head's updates are zero for this many steps, so a run from
            # scratch first trains plain CLIP (masks start all-ones) before masks may sparsify.
            "mask_delay_steps": 0,
        }
    )


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


# Top-level subtrees trained from scratch at the head learning rate: the pooler, and
# SmartCLIP's mask head (the paper's 1e-3 for the mask net equals the pooler's pooler_lr).
HEAD_SUBTREES = frozenset({"pooler", "smart_mask"})


def group_labels(params):
    """'pooler' for the pooler (and SmartCLIP mask head) subtrees, 'main' for everything else."""
    return {
        k: jax.tree.map(lambda _, k=k: POOLER_GROUP if k in HEAD_SUBTREES else MAIN_GROUP, v)
        for k, v in params.items()
    }


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in NO_DECAY_NAMES, params
    )


def main_schedule(optim_cfg, total_steps: int):
    warmup = int(optim_cfg.warmup_steps)
    if warmup <= 0 and optim_cfg.get("warmup_fraction", 0.0):
        warmup = max(1, round(optim_cfg.warmup_fraction * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=1e-9 if warmup else optim_cfg.lr,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.final_lr,
    )


def pooler_schedule(optim_cfg, total_steps: int, start_step: int = 0):
    """Cosine from pooler_lr to pooler_final_lr; with start_step > 0 the rate is 0 before it and
    the cosine runs over the remaining steps (the pooler starts with β-CAL: loss.cal_start_step).
    A zero rate also means no weight decay: AdamW's decay is scaled by the rate."""
    alpha = optim_cfg.pooler_final_lr / optim_cfg.pooler_lr if optim_cfg.pooler_lr else 0.0
    start_step = min(max(int(start_step), 0), max(total_steps - 1, 0))
    cosine = optax.cosine_decay_schedule(
        optim_cfg.pooler_lr, max(total_steps - start_step, 1), alpha=alpha
    )
    if start_step <= 0:
        return cosine
    return optax.join_schedules([optax.constant_schedule(0.0), cosine], [start_step])


def freeze_text_rows(num_rows: int) -> optax.GradientTransformation:
    """Zeroes updates of the first `num_rows` rows of params['text']['positional_embedding']."""

    def update_fn(updates, state, params=None):
        del params
        if num_rows <= 0 or "text" not in updates:
            return updates, state
        text = dict(updates["text"])
        pos = text["positional_embedding"]
        keep = (jnp.arange(pos.shape[0]) >= num_rows)[:, None]
        text["positional_embedding"] = jnp.where(keep, pos, 0.0)
        return {**updates, "text": text}, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def delay_subtree(name: str, steps: int) -> optax.GradientTransformation:
    """Zeroes the updates of params[name] for the first `steps` optimiser steps."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        if name in updates:
            on = (state.count >= steps).astype(jnp.float32)
            delayed = jax.tree.map(lambda u: u * on.astype(u.dtype), updates[name])
            updates = {**updates, name: delayed}
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _adamw(schedule, optim_cfg):
    return optax.adamw(
        schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=decay_mask,
    )


def make_optimizer(optim_cfg, total_steps: int, frozen_positions: int, pooler_start_step: int = 0):
    """The full gradient transformation; schedules are also returned for logging."""
    schedules = {
        MAIN_GROUP: main_schedule(optim_cfg, total_steps),
        POOLER_GROUP: pooler_schedule(optim_cfg, total_steps, pooler_start_step),
    }
    parts = []
    if optim_cfg.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(
        optax.multi_transform(
            {name: _adamw(sched, optim_cfg) for name, sched in schedules.items()},
            group_labels,
        )
    )
    parts.append(freeze_text_rows(frozen_positions))
    delay = int(optim_cfg.get("mask_delay_steps", 0) or 0)
    if delay > 0:  # only then: the optimiser state of every other run stays as it was
        parts.append(delay_subtree("smart_mask", delay))
    return optax.chain(*parts), schedules
