"""The training objective from model outputs (CONTRACTS.md) and `config.loss`.

`training_loss` asks the method registry for the loss of `loss.name` (the config's method, set
by the config check) and adds the metrics every method shares. β-CLIP's own loss, L =
global_weight * L_global + cal_weight * L_βCAL, is methods/beta_clip.py; the β-CAL pieces are
in beta_clip_jax/losses/.
"""

import jax.numpy as jnp
import ml_collections

from beta_clip_jax import methods
from beta_clip_jax.losses.cal import LOG_SCALE_MAX, LOG_SCALE_MIN, scale_from_log


def default_loss_config() -> ml_collections.ConfigDict:
    """The reference defaults (released β-CLIP scripts): CE, β 0.5, groups of 64, weights 1/1,
    and a section loss.<method> for every method with settings of its own."""
    cfg = ml_collections.ConfigDict(
        {
            # The method whose loss this is. A training config leaves it "" (config_defaults):
            # it then follows config.method, and any other value must equal it.
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
        }
    )
    for method in methods.all_methods():
        if method.loss_defaults:
            cfg[method.name] = dict(method.loss_defaults)
    return cfg


def training_loss(outputs, valid, loss_cfg, step=None):
    """(loss, metrics) for one batch.

    Args:
      outputs: the model dict: image [B,E] (CLS), text [B,K,E] (slot 0 = caption), pooled
        [B,K,E], logit_scale and pooler_logit_scale (logs), and what the method's model adds.
      valid: [B, K] bool slot validity.
      loss_cfg: config.loss (see default_loss_config()); loss.name names the method.
      step: the optimiser step (0-based) this loss is for; needed when loss.cal_start_step > 0.

    Metrics: loss, temperature_global (1/s) and the method's own (loss_global and global/* for
    every built-in method; loss_cal, cal/* and temperature_cal for beta_clip).
    """
    method = methods.get_method(loss_cfg.name or "beta_clip", "loss.name")
    for key in method.outputs:
        if key not in outputs:
            raise ValueError(
                f"loss.name={method.name!r} needs the model output {key!r}, which the model of "
                f"model.method={method.name!r} gives"
            )
    s_g = scale_from_log(outputs["logit_scale"])
    loss, metrics = method.loss(outputs, valid, loss_cfg, step, s_g)
    metrics = {"temperature_global": 1.0 / s_g, **metrics, "loss": loss}
    return loss, metrics


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
