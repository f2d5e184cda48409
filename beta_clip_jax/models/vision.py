"""ViT image tower in OpenAI CLIP layout with beta-CLIP's mixed last block (spec 1.2).

Blocks 1..L-1 are standard and stacked under "blocks"; block L is the separate module
"last_block", where CLS keeps full attention and patch rows take the value-only path. ln_post and
the projection run on all tokens, so one call yields both the standard CLIP image embedding (CLS)
and projected patch tokens for the pooler and dense evaluation.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.models.layers import (
    LayerNorm,
    ResidualBlock,
    block_stack,
    dense_proj,
    logical_init,
    remat_policy,
)


class VisionTower(nn.Module):
    """images [B, H, W, 3] (float, OpenAI-normalised) -> (cls [B, E], patches [B, P, E])."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, _ = images.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"vision tower expects {self.image_size}x{self.image_size} images, got {h}x{w}"
            )
        p, d = self.patch_size, self.width
        scale = d**-0.5
        x = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical_init(
                nn.initializers.lecun_normal(), (None, None, "patch", "embed")
            ),
            name="conv1",
        )(images)
        # Row-major grid order, the same as torch's flatten of an NCHW conv output.
        x = x.reshape(b, -1, d).astype(jnp.float32)
        n = x.shape[1]

        cls = self.param(
            "class_embedding", logical_init(nn.initializers.normal(scale), ("embed",)), (d,)
        )
        pos = self.param(
            "positional_embedding",
            logical_init(nn.initializers.normal(scale), (None, "embed")),
            (n + 1, d),
        )
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos
        x = LayerNorm(name="ln_pre")(x)
        x = nn.with_logical_constraint(x, ("batch", "length", None))

        if self.layers > 1:
            x, _ = block_stack(
                self.layers - 1,
                d,
                self.heads,
                mode="full",
                dtype=self.dtype,
                scan_layers=self.scan_layers,
                remat=self.remat,
            )(x, None)
        last_cls = ResidualBlock
        use_remat, policy = remat_policy(self.remat)
        if use_remat:
            last_cls = nn.remat(ResidualBlock, policy=policy)
        x = last_cls(d, self.heads, mode="mixed", dtype=self.dtype, name="last_block")(x)

        x = LayerNorm(name="ln_post")(x)
        x = dense_proj(self.embed_dim, self.dtype, scale, "proj")(x).astype(jnp.float32)
        return x[:, 0], x[:, 1:]
