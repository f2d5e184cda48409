"""Plain CLIP fine-tuning: the global CLS<->caption InfoNCE alone (the baseline β-CLIP is
compared with). The model is β-CLIP's; its pooler is carried along untrained."""

from beta_clip_jax.losses import cal
from beta_clip_jax.methods.registry import Method, register


def clip_loss(outputs, valid, loss_cfg, step, scale):
    loss_g, metrics = cal.global_loss(outputs, loss_cfg, scale)
    return loss_cfg.global_weight * loss_g, metrics


METHOD = register(
    Method(
        name="clip",
        loss=clip_loss,
        title="CLIP fine-tune",
        summary="CLIP fine-tuned with the symmetric image-caption InfoNCE",
    )
)
