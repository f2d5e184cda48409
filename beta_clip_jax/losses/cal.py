"""β-CAL and the global loss as a training objective applies them, from `config.loss` fields.

Both temperatures are stored as logs and used clamped to [0, ln 100] (`scale_from_log`). β-CAL
runs independently inside each group of `loss.group_size` images (the reference's per-GPU
micro-batch), so its value does not depend on how the batch is sharded, or, with
loss.cal_scope="global", over the whole batch blockwise across devices (global_cal.py).
"""

import math

import jax
import jax.numpy as jnp

from beta_clip_jax.losses import contrastive, global_cal

# Both temperatures live as logs in the params and are kept in [0, ln 100], i.e. s in [1, 100].
LOG_SCALE_MIN = 0.0
LOG_SCALE_MAX = math.log(100.0)

CAL_SCOPES = ("group", "global")  # loss.cal_scope


def scale_from_log(log_scale):
    """exp of the clamped log: the multiplier the loss uses, even if the param drifted outside."""
    log_scale = jnp.asarray(log_scale)
    log_scale = log_scale.astype(jnp.result_type(jnp.float32, log_scale.dtype))
    return jnp.exp(jnp.clip(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX))


def global_loss(outputs, loss_cfg, scale):
    """The global CLS<->caption InfoNCE -> (loss, {"loss_global", "global/*"})."""
    caption = outputs["text"][:, 0]
    gradient = loss_cfg.get("global_gradient", "full")
    loss_g, m_g = contrastive.clip_loss(outputs["image"], caption, scale, gradient=gradient)
    return loss_g, {"loss_global": loss_g, **{f"global/{key}": val for key, val in m_g.items()}}


def check_group_size(batch_size: int, group_size: int) -> None:
    """Raises if the batch cannot be cut into whole β-CAL groups (call before compiling)."""
    if group_size <= 0 or batch_size % group_size:
        raise ValueError(
            f"batch size {batch_size} is not a positive multiple of loss.group_size {group_size}; "
            "β-CAL groups must be whole (set config.loss.group_size to a divisor of the batch)"
        )


def grouped_beta_cal(pooled, text, valid, scale, loss_cfg):
    """β-CAL averaged over groups of loss_cfg.group_size images; [G, N, N] logits, never GN x GN.

    vmap keeps the group axis a batch axis, so a batch sharded over devices stays sharded and
    each device only forms its own groups' logits.
    """
    b, k, d = text.shape
    g = loss_cfg.group_size
    check_group_size(b, g)

    def one(v, t, m):
        return contrastive.beta_cal(
            v,
            t,
            m,
            scale,
            beta=loss_cfg.beta,
            mode=loss_cfg.mode,
            alpha=loss_cfg.alpha,
            mask_padding=loss_cfg.mask_padding,
        )

    n_groups = b // g
    per_loss, per_metrics = jax.vmap(one)(
        pooled.reshape(n_groups, g, k, d),
        text.reshape(n_groups, g, k, d),
        valid.reshape(n_groups, g, k),
    )
    # Every group has the same N^2 / row count structure, so the plain mean over groups is the
    # mean the reference gets by averaging per-GPU losses (DDP).
    return per_loss.mean(), jax.tree.map(jnp.mean, per_metrics)


def check_cal_scope(loss_cfg) -> str:
    """loss.cal_scope, or a ValueError naming the misspelt value."""
    scope = loss_cfg.get("cal_scope", "group")
    if scope not in CAL_SCOPES:
        raise ValueError(f"loss.cal_scope must be one of {CAL_SCOPES}, got {scope!r}")
    return scope


def cal_loss(pooled, text, valid, scale, loss_cfg):
    """β-CAL over groups or the whole batch, as loss.cal_scope says -> (loss, metrics)."""
    scope = check_cal_scope(loss_cfg)
    cal = global_cal.from_loss_config if scope == "global" else grouped_beta_cal
    return cal(pooled, text, valid, scale, loss_cfg)


def cal_start_step(loss_cfg) -> int:
    """loss.cal_start_step: the step from which β-CAL is trained (0, the default: from the start).
    Reads a ConfigDict or a config.json dict alike."""
    return int(loss_cfg.get("cal_start_step", 0) or 0)


def cal_weight(loss_cfg, step):
    """loss.cal_weight, or 0 before loss.cal_start_step (then `step` is needed)."""
    start = cal_start_step(loss_cfg)
    if start <= 0:
        return loss_cfg.cal_weight
    if step is None:
        raise ValueError("loss.cal_start_step > 0 needs the step passed to training_loss")
    return loss_cfg.cal_weight * (jnp.asarray(step) >= start).astype(jnp.float32)
