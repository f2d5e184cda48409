"""The β-CAL family: the contrastive losses (contrastive.py), β-CAL as the trainer applies it
per group of images or over the whole batch (cal.py, global_cal.py). Everything here is a pure
function of embeddings and settings; the methods (beta_clip_jax/methods/) pick what they train.
"""

from beta_clip_jax.losses.contrastive import (  # noqa: F401
    GLOBAL_GRADIENTS,
    _compute_dtype,
    _normalize,
    _pair_metrics,
    beta_cal,
    clip_loss,
)
