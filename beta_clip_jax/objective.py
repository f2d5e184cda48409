"""The training objective from model outputs (CONTRACTS.md) and `config.loss`.

L = global_weight * L_global + cal_weight * L_βCAL, both weights 1 in the released recipe
(docs/methods.md). The global CLS↔caption InfoNCE runs over the whole batch; β-CAL runs
independently inside each group of `group_size` images (the reference's per-GPU micro-batch),
so its value does not depend on how the batch is sharded.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from beta_clip_jax import global_cal, losses

# Both temperatures live as logs in the params and are kept in [0, ln 100], i.e. s in [1, 100].
LOG_SCALE_MIN = 0.0
LOG_SCALE_MAX = math.log(100.0)

LOSS_NAMES = ("beta_clip", "clip", "siglip", "smartclip", "holistic")


CAL_SCOPES = ("group", "global")  # loss.cal_scope, see default_loss_config


def default_loss_config() -> ml_collections.ConfigDict:
    """The reference defaults (released β-CLIP scripts): CE, β 0.5, groups of 64, weights 1/1."""
    return ml_collections.ConfigDict(
        {
            "name": "beta_clip",
            "mode": "ce",
            "beta": 0.5,
            "alpha": 1.0,
            "mask_padding": True,
            "group_size": 64,
            # "group": β-CAL negatives from groups of group_size images (the reference);
            # "global": from the whole (micro-)batch, blockwise across devices (global_cal.py).
            "cal_scope": "group",
            "global_weight": 1.0,
            # Gradient of the global CLS<->caption InfoNCE: "full" (every logit in both its row
            # and its column; the reference's 1-GPU scripts) or "local" (rows live, columns a
            # constant copy: the reference's multi-GPU all_gather carries no gradient).
            "global_gradient": "full",
            "cal_weight": 1.0,
            # > 0: β-CAL is off (weight 0) and the pooler's learning rate is 0 before this step,
            # so the run first trains plain CLIP and then fine-tunes it with β-CAL, as β-CLIP
            # fine-tunes a pretrained CLIP (docs/demo.md has a run with it).
            "cal_start_step": 0,
            # name="smartclip" (methods/smartclip.py; needs model.method="smartclip").
            "smartclip": {"align_weight": 0.5, "sparse_weight": 0.1},
            # name="holistic" (methods/holistic.py m2m_loss; needs model.method="holistic").
            "holistic": {"pairing": "auto", "diversity_margin": 0.7, "diversity_weight": 1.0},
        }
    )


def scale_from_log(log_scale):
    """exp of the clamped log: the multiplier the loss uses, even if the param drifted outside."""
    log_scale = jnp.asarray(log_scale)
    log_scale = log_scale.astype(jnp.result_type(jnp.float32, log_scale.dtype))
    return jnp.exp(jnp.clip(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX))


def _clamp_leaf(x):
    # Params may still be wrapped in flax's logical-partitioning boxes.
    if hasattr(x, "replace_boxed") and hasattr(x, "unbox"):
        return x.replace_boxed(jnp.clip(x.unbox(), LOG_SCALE_MIN, LOG_SCALE_MAX))
    return jnp.clip(x, LOG_SCALE_MIN, LOG_SCALE_MAX)


def clamp_log_temperatures(params):
    """Returns params with logit_scale and pooler/logit_scale clamped to [0, ln 100].

    The reference clamps both after every optimiser step, so each scale stays in [1, 100]; the
    trainer calls this then.
    """
    out = dict(params)
    out["logit_scale"] = _clamp_leaf(params["logit_scale"])
    if "pooler" in params:
        pooler = dict(params["pooler"])
        pooler["logit_scale"] = _clamp_leaf(pooler["logit_scale"])
        out["pooler"] = pooler
    return out


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
        return losses.beta_cal(
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


def training_loss(outputs, valid, loss_cfg, step=None):
    """(loss, metrics) for one batch.

    Args:
      outputs: the model dict: image [B,E] (CLS), text [B,K,E] (slot 0 = caption), pooled
        [B,K,E], logit_scale and pooler_logit_scale (logs), optional logit_bias (SigLIP).
      valid: [B, K] bool slot validity.
      loss_cfg: config.loss (see default_loss_config()).
      step: the optimiser step (0-based) this loss is for; needed when loss.cal_start_step > 0.

    Metrics: loss, loss_global, loss_cal (beta_clip only), global/* and cal/* from the losses,
    temperature_global, temperature_cal (1/s).

    "smartclip" and "holistic" train on the model's caption + sentence slots ("sentence_text")
    with their own loss alone (loss_global, the plain CLS<->caption InfoNCE, is then only
    logged); their metrics: smartclip_* and m2m_* (methods/smartclip.py, methods/holistic.py).
    """
    name = loss_cfg.name
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss.name {name!r}; expected one of {LOSS_NAMES}")
    image, text = outputs["image"], outputs["text"]
    caption = text[:, 0]
    s_g = scale_from_log(outputs["logit_scale"])
    metrics = {"temperature_global": 1.0 / s_g}

    if name == "siglip":
        if "logit_bias" not in outputs:
            raise ValueError("loss.name='siglip' needs a 'logit_bias' parameter in the model")
        loss_g, m_g = losses.siglip_loss(image, caption, s_g, outputs["logit_bias"])
    else:
        gradient = loss_cfg.get("global_gradient", "full")
        loss_g, m_g = losses.clip_loss(image, caption, s_g, gradient=gradient)
    loss = loss_cfg.global_weight * loss_g
    metrics["loss_global"] = loss_g
    metrics.update({f"global/{key}": val for key, val in m_g.items()})

    if name in METHOD_LOSSES:
        loss, m_x = METHOD_LOSSES[name](outputs, valid, s_g, loss_cfg)
        metrics.update(m_x)

    if name == "beta_clip":
        s_c = scale_from_log(outputs["pooler_logit_scale"])
        scope = check_cal_scope(loss_cfg)
        cal = global_cal.from_loss_config if scope == "global" else grouped_beta_cal
        loss_c, m_c = cal(outputs["pooled"], text, valid, s_c, loss_cfg)
        loss = loss + _cal_weight(loss_cfg, step) * loss_c
        metrics["loss_cal"] = loss_c
        metrics["temperature_cal"] = 1.0 / s_c
        metrics.update({f"cal/{key}": val for key, val in m_c.items()})

    metrics["loss"] = loss
    return loss, metrics


def check_cal_scope(loss_cfg) -> str:
    """loss.cal_scope, or a ValueError naming the misspelt value."""
    scope = loss_cfg.get("cal_scope", "group")
    if scope not in CAL_SCOPES:
        raise ValueError(f"loss.cal_scope must be one of {CAL_SCOPES}, got {scope!r}")
    return scope


def cal_start_step(loss_cfg) -> int:
    """loss.cal_start_step: the step from which β-CAL is trained (0, the default: from the start).
    Reads a ConfigDict or a config.json dict alike."""
    return int(loss_cfg.get("cal_start_step", 0) or 0)


def _cal_weight(loss_cfg, step):
    start = cal_start_step(loss_cfg)
    if start <= 0:
        return loss_cfg.cal_weight
    if step is None:
        raise ValueError("loss.cal_start_step > 0 needs the step passed to training_loss")
    return loss_cfg.cal_weight * (jnp.asarray(step) >= start).astype(jnp.float32)


def _method_inputs(outputs, valid, name, key):
    if key not in outputs:
        raise ValueError(
            f"loss.name={name!r} needs the model output {key!r}: set model.method={name!r}"
        )
    text = outputs["sentence_text"]
    return text, valid[:, : text.shape[1]]


def smartclip_objective(outputs, valid, scale, loss_cfg):
    """SmartCLIP's modular contrastive + sparsity loss over the caption + sentence slots."""
    from beta_clip_jax.methods.smartclip import smartclip_loss

    text, slot_valid = _method_inputs(outputs, valid, "smartclip", "smart_mask")
    cfg = loss_cfg.get("smartclip") or {}
    return smartclip_loss(
        outputs["image"],
        text,
        outputs["smart_mask"],
        scale,
        slot_valid,
        align_weight=cfg.get("align_weight", 0.5),
        sparse_weight=cfg.get("sparse_weight", 0.1),
    )


def holistic_objective(outputs, valid, scale, loss_cfg):
    """Holistic CLIP's multi-to-multi loss: K image branches vs the caption + sentence slots."""
    from beta_clip_jax.methods.holistic import m2m_loss

    text, slot_valid = _method_inputs(outputs, valid, "holistic", "image_branches")
    cfg = loss_cfg.get("holistic") or {}
    return m2m_loss(
        outputs["image_branches"],
        text,
        scale,
        slot_valid,
        pairing=cfg.get("pairing", "auto"),
        diversity_margin=cfg.get("diversity_margin", 0.7),
        diversity_weight=cfg.get("diversity_weight", 1.0),
    )


METHOD_LOSSES = {"smartclip": smartclip_objective, "holistic": holistic_objective}
