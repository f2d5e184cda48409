"""β-CLIP itself: the global CLS<->caption InfoNCE plus β-CAL between every text slot and the
image pooled for it (docs/methods.md).

L = global_weight * L_global + cal_weight * L_βCAL, both weights 1 in the released recipe; with
loss.cal_start_step > 0 β-CAL is off (and the pooler's learning rate 0) before that step.
"""

from beta_clip_jax.losses import cal
from beta_clip_jax.methods.registry import Method, register


def beta_clip_loss(outputs, valid, loss_cfg, step, scale):
    """(loss, metrics): global InfoNCE + β-CAL over groups or the whole batch."""
    loss_g, metrics = cal.global_loss(outputs, loss_cfg, scale)
    loss = loss_cfg.global_weight * loss_g
    s_c = cal.scale_from_log(outputs["pooler_logit_scale"])
    loss_c, m_c = cal.cal_loss(outputs["pooled"], outputs["text"], valid, s_c, loss_cfg)
    loss = loss + cal.cal_weight(loss_cfg, step) * loss_c
    metrics["loss_cal"] = loss_c
    metrics["temperature_cal"] = 1.0 / s_c
    metrics.update({f"cal/{key}": val for key, val in m_c.items()})
    return loss, metrics


METHOD = register(
    Method(
        name="beta_clip",
        loss=beta_clip_loss,
        title="β-CLIP",
        summary=(
            "CLIP fine-tuned with β-CAL, a contrastive loss between each image, pooled by a "
            "text-conditioned attention pooler, and its caption, sentences and phrases, plus "
            "the global image-caption InfoNCE"
        ),
        uses_cal=True,
    )
)
