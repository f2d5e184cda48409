"""ViT image tower in OpenAI CLIP layout with beta-CLIP's mixed last block (spec 1.2).

Blocks 1..L-1 are standard and stacked under "blocks"; block L is the separate module
"last_block", where CLS keeps full attention and patch rows take the value-only path. ln_post and
the projection run on all tokens, so one call yields both the standard CLIP image embedding (CLS)
and projected patch tokens for the pooler and dense evaluation.

Holistic CLIP's K image branches (docs/methods.md), only when `branches` > 1:
* "cls": K-1 extra class tokens `branch_tokens/{class_embedding, class_positional_embedding}`
  [K-1, W] follow the original CLS (branch 0); CLS i never attends to CLS j (or, with
  cls_attention="bias", gets the released code's +1 logit bias instead).
* "mlp": the last `branch_layers` blocks run K streams with a per-branch `fc2` ([K, M, W]):
  "blocks" then stacks L - n standard blocks, "branch_blocks" the n - 1 branched ones, and
  "last_block" is branched too. Patch tokens are the mean of the K streams.
Every branch ends in the shared ln_post and proj; the first output is then [B, K, E].

`mlp_dim`, `activation` and `layer_norm_eps` default to OpenAI's (4 x width, QuickGELU, 1e-5);
other CLIPs (LAION's ViT-H/g/bigG) set them; see layers.ResidualBlock.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.methods.holistic import (
    MultiClassTokens,
    cls_attention_bias,
    cls_attention_mask,
    split_branches,
)
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
    """images [B, H, W, 3] (float, OpenAI-normalised) -> (cls [B, E], patches [B, P, E]).

    With branches K > 1 the first output is the K branch embeddings [B, K, E].
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
    branches: int = 1
    branch_type: str = "cls"
    branch_layers: int = 3
    cls_attention: str = "block"
    mlp_dim: int = 0
    activation: str = "quick_gelu"
    layer_norm_eps: float = LN_EPS

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
        k_cls = self.branches if self.branches > 1 and self.branch_type == "cls" else 1
        attn = None
        if k_cls > 1:
            extra = MultiClassTokens(k_cls - 1, name="branch_tokens")(x[:, 1:])
            x = jnp.concatenate([x[:, :1], extra], axis=1)
            make = cls_attention_mask if self.cls_attention == "block" else cls_attention_bias
            attn = make(k_cls, x.shape[1])
        x = LayerNorm(self.layer_norm_eps, name="ln_pre")(x)
        x = constrain(x, ("batch", "length", None))

        k_mlp = self.branches if self.branches > 1 and self.branch_type == "mlp" else 0
        n_plain = self.layers - 1 if not k_mlp else self.layers - self.branch_layers
        block = dict(
            attention=self.attention,
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            eps=self.layer_norm_eps,
        )
        stack = dict(dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat, **block)
        if n_plain > 0:
            x, _ = block_stack(n_plain, d, self.heads, mode="full", **stack)(x, attn)
        if k_mlp:
            x = split_branches(x, k_mlp)
            if self.branch_layers > 1:
                x, _ = block_stack(
                    self.branch_layers - 1,
                    d,
                    self.heads,
                    mode="full",
                    name="branch_blocks",
                    branches=k_mlp,
                    **stack,
                )(x, None)
        last_cls = ResidualBlock
        use_remat, policy = remat_policy(self.remat)
        if use_remat:
            last_cls = nn.remat(ResidualBlock, policy=policy)
        x = last_cls(
            d,
            self.heads,
            mode="mixed",
            dtype=self.dtype,
            num_cls=k_cls,
            branches=k_mlp,
            name="last_block",
            **block,
        )(x, attn)

        x = LayerNorm(self.layer_norm_eps, name="ln_post")(x)
        x = dense_proj(self.embed_dim, self.dtype, scale, "proj")(x).astype(jnp.float32)
        if k_mlp:
            return x[:, :, 0], x[:, :, 1:].mean(axis=1)
        if k_cls > 1:
            return x[:, :k_cls], x[:, k_cls:]
        return x[:, 0], x[:, 1:]
