"""BetaCLIP: image tower, text tower, text-conditioned pooler and the global temperature.

The parameter tree and method signatures are the ones docs/CONTRACTS.md fixes; export,
checkpoints and the trainer depend on them.

This is the β-CLIP model with nothing added. A method of beta_clip_jax/methods/ that needs more
(extra submodules, extra training outputs, another image tower) subclasses it and overrides the
hooks `make_vision_tower`, `add_submodules`, `image_features` and `text_features`; the parameter
names of everything here stay the same, so pretrained weights load into every method.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.models.layers import abstract_params, logical_init
from beta_clip_jax.models.pooler import TextConditionedPooler
from beta_clip_jax.models.text import TextTower
from beta_clip_jax.models.vision import VisionTower

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)


def compute_dtype(name: str):
    """The jnp dtype for the config's "float32" / "bfloat16"."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class BetaCLIP(nn.Module):
    """The beta-CLIP model; `config` is a resolved (frozen) model config, see
    beta_clip_jax.methods.build_model."""

    config: Any

    # The global temperature's initial log; a method may start elsewhere.
    logit_scale_init = LOGIT_SCALE_INIT

    def setup(self):
        c = self.config
        dt = compute_dtype(c.dtype)
        self.visual = self.make_vision_tower(tower_options(c, "vision") | {"dtype": dt})
        self.text = TextTower(
            vocab_size=c.vocab_size,
            context_length=c.context_length,
            frozen_positions=c.frozen_positions,
            **tower_options(c, "text"),
            dtype=dt,
        )
        self.pooler = TextConditionedPooler(
            num_heads=c.pooler_heads, dtype=dt, value_init=c.pooler_value_init
        )
        self.add_submodules(dt)
        self.logit_scale = self.param(
            "logit_scale", logical_init(nn.initializers.constant(self.logit_scale_init), ()), ()
        )

    def make_vision_tower(self, options: dict) -> nn.Module:
        """The image tower, named "visual"; a method may return a subclass of VisionTower."""
        c = self.config
        return VisionTower(image_size=c.image_size, patch_size=c.patch_size, **options)

    def add_submodules(self, dtype) -> None:
        """A method's extra submodules and parameters (assigned to self in setup); none here."""

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised float images [B, H, W, 3] -> (cls [B, E], patches [B, P, E]), projected."""
        return self.visual(images)[0]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int32 [..., L] (L <= context length) -> [..., E], projected, pooled at the first EOT."""
        lead = tokens.shape[:-1]
        out, _ = self.text(tokens.reshape(-1, tokens.shape[-1]))
        return out.reshape(*lead, out.shape[-1])

    def encode_packed_text(self, tokens, segments, positions, eot) -> jax.Array:
        """Packed texts (data/packing.py): tokens / segments / positions [G, R, L], eot [G, T]
        -> [G, T, E], projected, each text read at its own EOT."""
        return self.text(tokens, segments=segments, positions=positions, eot=eot)[0]

    def pool(self, text_emb: jax.Array, patches: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(text [B, K, E], patches [B, P, E]) -> (pooled [B, K, E], attn [B, heads, K, P])."""
        return self.pooler(text_emb, patches)

    def encode_texts(self, texts: dict) -> jax.Array:
        """The K text slots of each image -> [B, K, E] (caption, sentences, phrases), from an
        unpacked batch (caption [B, Lc], sentences [B, S, Ls], phrases [B, Kp, Lp]) or a packed
        one (text_tokens / text_segments / text_positions [G, R, L], text_eot [G, g, K])."""
        if "text_tokens" in texts:
            eot = texts["text_eot"]
            g, per_group, k = eot.shape
            text = self.encode_packed_text(
                texts["text_tokens"],
                texts["text_segments"],
                texts["text_positions"],
                eot.reshape(g, per_group * k),
            )
            return text.reshape(g * per_group, k, text.shape[-1])
        parts = [self.encode_text(texts["caption"])[:, None], self.encode_text(texts["sentences"])]
        if texts["phrases"].shape[1]:
            parts.append(self.encode_text(texts["phrases"]))
        return jnp.concatenate(parts, axis=1)

    def image_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
        """Training forward of the images -> (cls [B, E], patches [B, P, E], extra outputs)."""
        cls, patches = self.encode_image(images)
        return cls, patches, {}

    def text_features(self, texts: dict) -> tuple[jax.Array, dict]:
        """Training forward of the texts -> (text slots [B, K, E], extra outputs)."""
        return self.encode_texts(texts), {}

    def __call__(self, images: jax.Array, texts: dict) -> dict:
        """One training forward: images [B,H,W,3] and the texts of encode_texts -> the outputs
        docs/CONTRACTS.md lists, plus whatever a method's hooks add."""
        cls, patches, image_extra = self.image_features(images)
        text, text_extra = self.text_features(texts)
        pooled, _ = self.pool(text, patches)
        return {
            "image": cls,
            "patches": patches,
            "text": text,
            "pooled": pooled,
            "logit_scale": self.logit_scale,
            "pooler_logit_scale": nn.unbox(self.pooler.variables["params"]["logit_scale"]),
            **image_extra,
            **text_extra,
        }


def tower_options(c, tower: str) -> dict:
    """The fields of the resolved model config `c` that both towers take, for `tower`."""
    return dict(
        width=c[f"{tower}_width"],
        layers=c[f"{tower}_layers"],
        heads=c[f"{tower}_heads"],
        embed_dim=c.embed_dim,
        scan_layers=c.scan_layers,
        remat=c.remat,
        attention=c.attention,
        mlp_dim=c[f"{tower}_mlp_dim"],
        activation=c.activation,
        layer_norm_eps=c.layer_norm_eps,
    )


def dummy_inputs(model_cfg, batch: int = 1) -> tuple[jax.Array, dict]:
    """Smallest inputs that create every parameter (images, unpacked texts)."""
    c = model_cfg
    images = jnp.zeros((batch, c.image_size, c.image_size, 3), jnp.float32)
    texts = {
        "caption": jnp.zeros((batch, 4), jnp.int32),
        "sentences": jnp.zeros((batch, 1, 4), jnp.int32),
        "phrases": jnp.zeros((batch, 1, 4), jnp.int32),
    }
    return images, texts


def init_params(model: BetaCLIP, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Random parameters for `model`; boxed=True keeps the logical-axis metadata for sharding."""
    params = jax.jit(model.init)(rng, *dummy_inputs(model.config))["params"]
    return params if boxed else nn.unbox(params)


def param_shapes(model: BetaCLIP) -> dict:
    """Shapes (jax.ShapeDtypeStruct tree) of the unboxed parameters, without allocating them."""
    return abstract_params(model, *dummy_inputs(model.config))
