"""Optimiser: AdamW in two parameter groups, as the reference trains β-CLIP.

* towers, projections and the global temperature: linear warm-up then cosine decay, weight decay on
  matrices and embeddings only;
* the pooler (with its own temperature): its own cosine schedule, no warm-up.

The first `model.frozen_positions` rows of the text positional table never change: their gradient is
stopped in the forward pass and their update (weight decay included) is zeroed here.

Locked towers (open_clip's --lock-image / --lock-text): `optim.lock_image` / `optim.lock_text`
freeze params['visual'] / params['text']; `optim.lock_*_unlocked_blocks` = N keeps the tower's
last N transformer blocks trainable. The rule (`frozen_mask`, used by the optimiser and the
train step alike):

* N = 0: the whole tower is frozen, its final LayerNorm and projection included;
* N > 0: the last N blocks and everything after them (vision: ln_post, proj; text: ln_final,
  proj) train; the embeddings (vision: conv1, class_embedding, positional_embedding, ln_pre;
  text: token_embedding, positional_embedding) and the earlier blocks stay frozen, also with N
  equal to the block count. This is open_clip's `unlocked_groups` = N + 1.
* Blocks count from the input: the stacked "blocks", the stacked groups a method adds (its
  `lock_layout.stacked_blocks`), then "last_block" (the vision tower's L blocks, the text
  tower's L blocks).
* Parameters a method adds inside a tower and lists in `lock_layout.always_train` train even
  when it is locked; a method may refuse a lock that cannot work for it (`check_lock`).
  Everything outside the towers (the pooler, a method's heads, the temperatures) always trains.

A wholly frozen leaf gets the third optimiser group FROZEN_GROUP (optax.set_to_zero: no
moments) and its gradient is stopped in the loss, so XLA drops its backward pass. The stacked
blocks are one leaf per weight with a leading layer axis: when N splits a stack, the stack keeps
its moments (zero for the frozen rows), the frozen rows get a zero gradient and zero update,
but the scan's backward still runs over every row. With no tower locked the optimiser (and its
state tree, so older checkpoints restore) is exactly the two-group one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from beta_clip_jax import methods

POOLER_GROUP = "pooler"
MAIN_GROUP = "main"
FROZEN_GROUP = "frozen"
# Leaf names that get no weight decay: biases, LayerNorm scales and the temperatures.
NO_DECAY_NAMES = frozenset({"bias", "scale", "logit_scale", "logit_bias"})


def optim_defaults() -> ml_collections.ConfigDict:
    """The reference's two AdamW groups and schedules (docs/methods.md, β-CLIP itself), and
    every method's own optimiser fields."""
    cfg = ml_collections.ConfigDict(
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
            # Locked towers (module docstring): frozen, no optimiser moments, no backward pass;
            # *_unlocked_blocks keeps that tower's last N blocks (and what follows them) training.
            "lock_image": False,
            "lock_image_unlocked_blocks": 0,
            "lock_text": False,
            "lock_text_unlocked_blocks": 0,
        }
    )
    for method in methods.all_methods():
        for field, value in method.optim_defaults.items():
            cfg[field] = value
    return cfg


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def group_labels(params):
    """'pooler' for the subtrees trained from scratch at the head learning rate (the pooler and
    the methods' heads, methods.head_subtrees()), 'main' for everything else."""
    heads = methods.head_subtrees()
    return {
        k: jax.tree.map(lambda _, k=k: POOLER_GROUP if k in heads else MAIN_GROUP, v)
        for k, v in params.items()
    }


# Locked towers: config fields, and each tower's parameters by their place around the blocks.
LOCK_FIELDS = {  # tower subtree -> (lock flag, unlocked-blocks count)
    "visual": ("lock_image", "lock_image_unlocked_blocks"),
    "text": ("lock_text", "lock_text_unlocked_blocks"),
}
BEFORE_BLOCKS = {
    "visual": frozenset({"conv1", "class_embedding", "positional_embedding", "ln_pre"}),
    "text": frozenset({"token_embedding", "positional_embedding"}),
}
AFTER_BLOCKS = {"visual": frozenset({"ln_post", "proj"}), "text": frozenset({"ln_final", "proj"})}


def block_keys(tower: str) -> tuple[str, ...]:
    """The tower's block groups, input to output: "blocks", the methods' stacked groups,
    "last_block"."""
    extra = [k for m in methods.all_methods() for k in m.lock_layout.stacked_blocks.get(tower, ())]
    return ("blocks", *extra, "last_block")


def stacked_block_keys(tower: str) -> frozenset[str]:
    """The block groups with a leading "layers" axis."""
    return frozenset(block_keys(tower)[:-1])


def always_trained_keys(tower: str) -> frozenset[str]:
    """Keys under the tower that methods train even when the tower is locked."""
    out: set[str] = set()
    for method in methods.all_methods():
        out |= set(method.lock_layout.always_train.get(tower, ()))
    return frozenset(out)


def lock_settings(optim_cfg) -> dict[str, int]:
    """{tower subtree: unlocked blocks N} for each locked tower; checks the four fields' types.

    Configs written before the fields existed read as nothing locked."""
    locked = {}
    for tower, (flag, count) in LOCK_FIELDS.items():
        on = optim_cfg.get(flag, False)
        n = optim_cfg.get(count, 0)
        if not isinstance(on, (bool, np.bool_)):
            raise ValueError(f"optim.{flag} must be True or False, got {on!r}")
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"optim.{count} must be an integer, got {n!r}")
        if n < 0:
            raise ValueError(f"optim.{count} must be >= 0, got {n}")
        if n and not on:
            raise ValueError(f"optim.{count}={n} has no effect without optim.{flag}=True")
        if on:
            locked[tower] = int(n)
    return locked


def check_lock(optim_cfg, model_cfg) -> None:
    """The lock fields against config.model (resolved here: idempotent), before anything is
    built. Raises ValueError naming the field."""
    locked = lock_settings(optim_cfg)
    if not locked:
        return
    model_cfg = methods.resolve_model_config(model_cfg)
    layers = {"visual": int(model_cfg.vision_layers), "text": int(model_cfg.text_layers)}
    for tower, n in locked.items():
        if n > layers[tower]:
            field = LOCK_FIELDS[tower][1]
            raise ValueError(
                f"optim.{field}={n} is more than the {layers[tower]} blocks of the "
                f"{tower} tower (model.{'vision' if tower == 'visual' else 'text'}_layers)"
            )
    methods.method_of(model_cfg).check_lock(optim_cfg, model_cfg, locked)


def _block_rows(tower: str, subtree) -> dict[str, int]:
    """{block key: number of blocks} in input-to-output order; unknown keys are refused."""
    known = (
        BEFORE_BLOCKS[tower]
        | AFTER_BLOCKS[tower]
        | always_trained_keys(tower)
        | set(block_keys(tower))
    )
    unknown = sorted(set(subtree) - known)
    if unknown:
        raise ValueError(
            f"cannot lock params[{tower!r}]: no locking rule for its entries {unknown} "
            "(optim.py BEFORE_BLOCKS / AFTER_BLOCKS, or the method's lock_layout)"
        )
    rows = {}
    stacked = stacked_block_keys(tower)
    for key in block_keys(tower):
        if key in subtree:
            first = jax.tree.leaves(subtree[key])[0]
            rows[key] = int(first.shape[0]) if key in stacked else 1
    return rows


def _tower_mask(tower: str, subtree, unlocked: int):
    """The frozen mask of one locked tower (see frozen_mask)."""
    rows = _block_rows(tower, subtree)
    total = sum(rows.values())
    if unlocked > total:
        field = LOCK_FIELDS[tower][1]
        raise ValueError(f"optim.{field}={unlocked} is more than the {total} blocks of {tower}")
    first_trainable = total - unlocked  # global index of the first trainable block
    start, out = 0, {}
    for key, value in subtree.items():
        if key in rows:  # rows [start, start + n) of the tower's blocks
            n = rows[key]
            frozen = np.arange(start, start + n) < first_trainable
            start += n
            if key not in stacked_block_keys(tower) or frozen.all() or not frozen.any():
                frozen = np.array(frozen.all())
            out[key] = jax.tree.map(
                lambda x, f=frozen: f.reshape(f.shape + (1,) * (len(x.shape) - f.ndim)), value
            )
            continue
        if key in always_trained_keys(tower):
            frozen = False
        elif key in AFTER_BLOCKS[tower]:
            frozen = unlocked == 0
        else:
            frozen = True
        out[key] = jax.tree.map(lambda _, f=frozen: np.array(f), value)
    return out


def frozen_mask(params, optim_cfg):
    """A tree like `params` of NumPy bool masks, True where a value is frozen.

    A mask is a scalar for a leaf frozen (or trained) as a whole, and [layers, 1, ...] for a
    stacked block leaf whose first rows are frozen; it broadcasts against its leaf. Only the
    tree and the leaves' shapes are read (arrays, tracers or ShapeDtypeStructs)."""
    locked = lock_settings(optim_cfg)
    return {
        k: _tower_mask(k, v, locked[k])
        if k in locked
        else jax.tree.map(lambda _: np.array(False), v)
        for k, v in params.items()
    }


def _where_frozen(tree, mask, frozen_fn):
    """frozen_fn(x) where the mask is True, x elsewhere; whole leaves without a select."""

    def one(x, m):
        if m.all():
            return frozen_fn(x)
        if not m.any():
            return x
        return jnp.where(m, frozen_fn(x), x)

    return jax.tree.map(one, tree, mask)


def stop_frozen_gradients(params, optim_cfg):
    """params with the gradient of every frozen value stopped (unchanged with nothing locked)."""
    if optim_cfg is None or not lock_settings(optim_cfg):
        return params
    return _where_frozen(params, frozen_mask(params, optim_cfg), jax.lax.stop_gradient)


def frozen_labels(optim_cfg):
    """The optimiser group labels with every wholly frozen leaf in FROZEN_GROUP."""

    def labels(params):
        frozen = frozen_mask(params, optim_cfg)
        return jax.tree.map(
            lambda label, m: FROZEN_GROUP if m.all() else label, group_labels(params), frozen
        )

    return labels


def zero_frozen_rows(optim_cfg) -> optax.GradientTransformation:
    """Zeroes the updates of every frozen value, weight decay included. Whole frozen leaves are
    zero already (FROZEN_GROUP); the frozen rows of a split block stack are not."""

    def update_fn(updates, state, params=None):
        del params
        mask = frozen_mask(updates, optim_cfg)
        return _where_frozen(updates, mask, jnp.zeros_like), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


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
    groups = {name: _adamw(sched, optim_cfg) for name, sched in schedules.items()}
    labels = group_labels
    locked = bool(lock_settings(optim_cfg))
    if locked:  # only then: an unlocked run's optimiser state stays exactly as it was
        groups[FROZEN_GROUP] = optax.set_to_zero()
        labels = frozen_labels(optim_cfg)
    parts.append(optax.multi_transform(groups, labels))
    if locked:
        parts.append(zero_frozen_rows(optim_cfg))
    parts.append(freeze_text_rows(frozen_positions))
    # A method's transforms act only when its own optim fields ask for them (e.g. a delay).
    for method in methods.all_methods():
        parts.extend(method.optimizer_parts(optim_cfg))
    return optax.chain(*parts), schedules
