"""SigLIP: the pairwise sigmoid loss between each image and every caption of the batch, with a
learnable logit bias b beside the temperature (Zhai et al. 2023).

The model is β-CLIP's plus the scalar parameter `logit_bias`. A fresh model starts at SigLIP's
values: temperature s = 10 (log_scale = ln 10) and b = -10; so does a pretrained CLIP completed
for this method (`complete_params`), whose InfoNCE temperature (s = 100) would start the sigmoid
far from balanced. The bias only shifts every logit alike, so inference and export drop it: the
embeddings and their rankings are those of the plain model.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beta_clip_jax import losses
from beta_clip_jax.methods.registry import Method, register
from beta_clip_jax.models.clip import BetaCLIP
from beta_clip_jax.models.layers import logical_init

INIT_LOG_SCALE = math.log(10.0)
INIT_BIAS = -10.0


class SigLIPModel(BetaCLIP):
    """β-CLIP with SigLIP's initial temperature and the learnable `logit_bias`."""

    logit_scale_init = INIT_LOG_SCALE

    def add_submodules(self, dtype) -> None:
        self.logit_bias = self.param(
            "logit_bias", logical_init(nn.initializers.constant(INIT_BIAS), ()), ()
        )

    def __call__(self, images, texts) -> dict:
        return {**super().__call__(images, texts), "logit_bias": self.logit_bias}


def siglip_loss(image, text, logit_scale, logit_bias):
    """SigLIP pairwise sigmoid loss, a baseline: -sum_ij log σ(z_ij (s cos_ij + b)) / B.

    z_ij = +1 on the diagonal, -1 elsewhere. Dividing the sum over all B^2 pairs by B (not B^2)
    follows the SigLIP paper's convention, so the value is per image, summed over its texts.
    `logit_scale` is the multiplier s, `logit_bias` the additive bias b.
    """
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"siglip_loss wants image, text [B,D]; got {image.shape}, {text.shape}")
    dt = losses._compute_dtype(image, text)
    scale = jnp.asarray(logit_scale, dt)
    bias = jnp.asarray(logit_bias, dt)
    cos = losses._normalize(image, dt) @ losses._normalize(text, dt).T
    logits = scale * cos + bias
    b = image.shape[0]
    z = 2.0 * jnp.eye(b, dtype=dt) - 1.0
    loss = -jax.nn.log_sigmoid(z * logits).sum() / b
    metrics = losses._pair_metrics(logits, cos, scale)
    metrics["bias"] = bias
    return loss, metrics


def siglip_objective(outputs, valid, loss_cfg, step, scale):
    """(loss, metrics): the sigmoid loss on CLS vs caption, weighted by loss.global_weight."""
    caption = outputs["text"][:, 0]
    loss_g, m_g = siglip_loss(outputs["image"], caption, scale, outputs["logit_bias"])
    metrics = {"loss_global": loss_g, **{f"global/{key}": val for key, val in m_g.items()}}
    metrics["logit_bias"] = jnp.asarray(outputs["logit_bias"], jnp.float32)
    return loss_cfg.global_weight * loss_g, metrics


def complete(params: dict, model, rng) -> dict:
    """A tree without a bias (a pretrained CLIP) starts at SigLIP's temperature and bias."""
    if "logit_bias" not in params:
        params = dict(params)
        params["logit_bias"] = np.asarray(INIT_BIAS, np.float32)
        params["logit_scale"] = np.asarray(INIT_LOG_SCALE, np.float32)
    return params


METHOD = register(
    Method(
        name="siglip",
        loss=siglip_objective,
        title="SigLIP fine-tune",
        summary="CLIP fine-tuned with the sigmoid (SigLIP) image-text loss and a learned bias",
        model_class=SigLIPModel,
        outputs=("logit_bias",),
        complete_params=complete,
        strip_params=("logit_bias",),
        # Trained from its initial value, like the pooler: the head learning rate.
        head_subtrees=frozenset({"logit_bias"}),
    )
)
