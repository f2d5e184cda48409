"""BetaCLIP: image tower, text tower, text-conditioned pooler and the global temperature.

The parameter tree and method signatures are the ones docs/CONTRACTS.md fixes; export,
checkpoints and the trainer depend on them.
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from beta_clip_jax.models.layers import logical_init
from beta_clip_jax.models.pooler import TextConditionedPooler
from beta_clip_jax.models.text import TextTower
from beta_clip_jax.models.variants import resolve_model_config
from beta_clip_jax.models.vision import VisionTower

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)

# OpenAI CLIP's image statistics. data/transforms.py owns the training-side normalisation; these
# copies serve the inference API and the converters, which must not depend on the data package.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images):
    """uint8 [..., 3] -> float32 OpenAI-normalised images (numpy in, numpy out; jnp likewise)."""
    xp = jnp if isinstance(images, jax.Array) else np
    x = xp.asarray(images, dtype=xp.float32) / 255.0
    return (x - xp.asarray(OPENAI_MEAN, xp.float32)) / xp.asarray(OPENAI_STD, xp.float32)


def compute_dtype(name: str):
    """The jnp dtype for the config's "float32" / "bfloat16"."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class BetaCLIP(nn.Module):
    """The beta-CLIP model; `config` is a resolved (frozen) model config, see build_model."""

    config: Any

    def setup(self):
        c = self.config
        dt = compute_dtype(c.dtype)
        self.visual = VisionTower(
            image_size=c.image_size,
            patch_size=c.patch_size,
            width=c.vision_width,
            layers=c.vision_layers,
            heads=c.vision_heads,
            embed_dim=c.embed_dim,
            dtype=dt,
            scan_layers=c.scan_layers,
            remat=c.remat,
        )
        self.text = TextTower(
            vocab_size=c.vocab_size,
            context_length=c.context_length,
            width=c.text_width,
            layers=c.text_layers,
            heads=c.text_heads,
            embed_dim=c.embed_dim,
            frozen_positions=c.frozen_positions,
            dtype=dt,
            scan_layers=c.scan_layers,
            remat=c.remat,
        )
        self.pooler = TextConditionedPooler(num_heads=c.pooler_heads, dtype=dt)
        self.logit_scale = self.param(
            "logit_scale", logical_init(nn.initializers.constant(LOGIT_SCALE_INIT), ()), ()
        )

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised float images [B, H, W, 3] -> (cls [B, E], patches [B, P, E]), projected."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int32 [..., L] (L <= context length) -> [..., E], projected, pooled at the first EOT."""
        lead = tokens.shape[:-1]
        out = self.text(tokens.reshape(-1, tokens.shape[-1]))
        return out.reshape(*lead, out.shape[-1])

    def pool(self, text_emb: jax.Array, patches: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(text [B, K, E], patches [B, P, E]) -> (pooled [B, K, E], attn [B, heads, K, P])."""
        return self.pooler(text_emb, patches)

    def __call__(self, images: jax.Array, sentences: jax.Array, phrases: jax.Array) -> dict:
        """One training forward: images [B,H,W,3], sentences [B,1+S,Ls], phrases [B,Kp,Lp]."""
        cls, patches = self.encode_image(images)
        text = self.encode_text(sentences)
        if phrases.shape[1]:
            text = jnp.concatenate([text, self.encode_text(phrases)], axis=1)
        pooled, _ = self.pool(text, patches)
        return {
            "image": cls,
            "patches": patches,
            "text": text,
            "pooled": pooled,
            "logit_scale": self.logit_scale,
            "pooler_logit_scale": nn.unbox(self.pooler.variables["params"]["logit_scale"]),
        }


def build_model(model_cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> BetaCLIP:
    """A BetaCLIP for `config.model` (variant plus overrides; resolved here)."""
    cfg = resolve_model_config(model_cfg)
    return BetaCLIP(ml_collections.FrozenConfigDict(cfg))


def dummy_inputs(model_cfg, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Smallest inputs that create every parameter (images, sentences, phrases)."""
    c = model_cfg
    images = jnp.zeros((batch, c.image_size, c.image_size, 3), jnp.float32)
    sentences = jnp.zeros((batch, 1, 4), jnp.int32)
    phrases = jnp.zeros((batch, 1, 4), jnp.int32)
    return images, sentences, phrases


def init_params(model: BetaCLIP, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Random parameters for `model`; boxed=True keeps the logical-axis metadata for sharding."""
    params = jax.jit(model.init)(rng, *dummy_inputs(model.config))["params"]
    return params if boxed else nn.unbox(params)


def param_shapes(model: BetaCLIP) -> dict:
    """Shapes (jax.ShapeDtypeStruct tree) of the unboxed parameters, without allocating them."""
    out = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.config))
    return nn.unbox(out["params"])
