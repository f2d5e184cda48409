"""ViT image tower in OpenAI CLIP layout with beta-CLIP's mixed last block.

Blocks 1..L-1 are standard and stacked under "blocks"; block L is the separate module
"last_block", where CLS keeps full attention and patch rows take the value-only path. ln_post and
the projection run on all tokens, so one call yields both the standard CLIP image embedding (CLS)
and projected patch tokens for the pooler and dense evaluation.

The call runs four stages, each a method a subclass may override while the parameter names stay
those of this tower (methods/ extend the tower this way): `embed` (patch convolution, class
token, positions), `extra_rows` (more leading CLS-like rows and an attention pattern; none
here), `trunk` (ln_pre and the blocks) and `head` (ln_post, projection, split into CLS and
patches).

`mlp_dim`, `activation` and `layer_norm_eps` default to OpenAI's (4 x width, QuickGELU, 1e-5);
other CLIPs (LAION's ViT-H/g/bigG) set them; see layers.ResidualBlock.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.models.layers import (
    LN_EPS,
    LayerNorm,
    ResidualBlock,
    block_stack,
    constrain,
    dense_proj,
    logical_init,
    remat_policy,
)


class VisionTower(nn.Module):
    """images [B, H, W, 3] (float, OpenAI-normalised) -> ((cls, patches), intermediates).

    cls [B, E] and patches [B, P, E] are projected; intermediates holds "last_block_input"
    [B, L, W], the token states the mixed last block reads (unused values cost nothing under
    jit). A subclass may give a first output of another shape (e.g. [B, K, E]).
    """

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    mlp_dim: int = 0
    activation: str = "quick_gelu"
    layer_norm_eps: float = LN_EPS

    @nn.compact
    def __call__(self, images: jax.Array):
        b, h, w, _ = images.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"vision tower expects {self.image_size}x{self.image_size} images, got {h}x{w}"
            )
        x = self.embed(images)
        x, attn, num_cls = self.extra_rows(x)
        x = LayerNorm(self.layer_norm_eps, name="ln_pre")(x)
        x = constrain(x, ("batch", "length", None))
        x, intermediates = self.trunk(x, attn, num_cls)
        return self.head(x, num_cls), intermediates

    def embed(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> [B, 1 + P, W]: class token then patch tokens, positions added."""
        b = images.shape[0]
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
        return jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos

    def extra_rows(self, x: jax.Array):
        """(tokens, attention mask or bias for every block or None, number of CLS rows)."""
        return x, None, 1

    def block_options(self) -> dict:
        return dict(
            attention=self.attention,
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            eps=self.layer_norm_eps,
        )

    def stack_options(self) -> dict:
        return dict(
            dtype=self.dtype,
            scan_layers=self.scan_layers,
            remat=self.remat,
            **self.block_options(),
        )

    def last_block(self, num_cls: int, **options) -> nn.Module:
        """The mixed last block "last_block" (remat as the config says)."""
        block_cls = ResidualBlock
        use_remat, policy = remat_policy(self.remat)
        if use_remat:
            block_cls = nn.remat(ResidualBlock, policy=policy)
        return block_cls(
            self.width,
            self.heads,
            mode="mixed",
            dtype=self.dtype,
            num_cls=num_cls,
            name="last_block",
            **self.block_options(),
            **options,
        )

    def trunk(self, x: jax.Array, attn, num_cls: int):
        """The L blocks: L - 1 standard ones stacked under "blocks", then the mixed one."""
        if self.layers > 1:
            x, _ = block_stack(
                self.layers - 1, self.width, self.heads, mode="full", **self.stack_options()
            )(x, attn)
        return self.last_block(num_cls)(x, attn), {"last_block_input": x}

    def head(self, x: jax.Array, num_cls: int):
        """ln_post and the projection on every token -> (CLS rows, patches)."""
        x = LayerNorm(self.layer_norm_eps, name="ln_post")(x)
        proj = dense_proj(self.embed_dim, self.dtype, self.width**-0.5, "proj")
        x = proj(x).astype(jnp.float32)
        if num_cls > 1:
            return x[:, :num_cls], x[:, num_cls:]
        return x[:, 0], x[:, 1:]
