"""An independent reference of Holistic CLIP's branched block (K streams, per-branch fc2),
written apart from the model's: the tests check the model's branched ResidualBlock against it."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.models.layers import LayerNorm, logical_init, quick_gelu

_F32 = jnp.float32


class BranchedMLP(nn.Module):
    """[B, K, L, W] -> [B, K, L, W]: shared `fc1`, QuickGELU, per-branch `fc2` ([K, 4W, W])."""

    num_branches: int
    dtype: jnp.dtype = _F32

    @nn.compact
    def __call__(self, x):
        e = x.shape[-1]
        h = nn.Dense(
            4 * e,
            dtype=self.dtype,
            param_dtype=_F32,
            kernel_init=logical_init(nn.initializers.normal((2 * e) ** -0.5), ("embed", "mlp")),
            bias_init=logical_init(nn.initializers.zeros_init(), ("mlp",)),
            name="fc1",
        )(x)
        h = quick_gelu(h)
        fc2 = {
            "kernel": logical_init(nn.initializers.normal(e**-0.5), (None, "mlp", "embed")),
            "bias": logical_init(nn.initializers.zeros_init(), (None, "embed")),
        }
        kernel = self.param("fc2_kernel", fc2["kernel"], (self.num_branches, 4 * e, e))
        bias = self.param("fc2_bias", fc2["bias"], (self.num_branches, e))
        y = jnp.einsum("bkld,kde->bkle", h.astype(self.dtype), kernel.astype(self.dtype))
        return y.astype(_F32) + bias[None, :, None, :]


class BranchedBlock(nn.Module):
    """Pre-LN residual block on K streams [B, K, L, W]; only the MLP's `fc2` is per branch.

    Attention weights are shared and each stream attends within itself (full attention, as in
    the ViT's ordinary blocks).
    """

    heads: int
    num_branches: int
    dtype: jnp.dtype = _F32

    @nn.compact
    def __call__(self, x):
        b, k, length, e = x.shape
        dh = e // self.heads
        std = e**-0.5
        y = LayerNorm(name="ln_1")(x).reshape(b * k, length, e)

        def heads_proj(name):
            return nn.DenseGeneral(
                (self.heads, dh),
                dtype=self.dtype,
                param_dtype=_F32,
                kernel_init=logical_init(nn.initializers.normal(std), ("embed", "heads", "kv")),
                bias_init=logical_init(nn.initializers.zeros_init(), ("heads", "kv")),
                name=name,
            )(y)

        ctx = jax.nn.dot_product_attention(
            heads_proj("query"), heads_proj("key"), heads_proj("value")
        )
        o = nn.DenseGeneral(
            e,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=_F32,
            kernel_init=logical_init(nn.initializers.normal(std), ("heads", "kv", "embed")),
            bias_init=logical_init(nn.initializers.zeros_init(), ("embed",)),
            name="out",
        )(ctx)
        x = x + o.astype(_F32).reshape(b, k, length, e)
        y = LayerNorm(name="ln_2")(x)
        return x + BranchedMLP(self.num_branches, self.dtype, name="mlp")(y)


def branched_block_params(block_params, num_branches: int):
    """A pretrained ResidualBlock's params -> BranchedBlock params (fc2 tiled K times)."""
    out = {key: block_params[key] for key in ("ln_1", "query", "key", "value", "out", "ln_2")}
    fc2 = block_params["fc2"]
    out["mlp"] = {
        "fc1": block_params["fc1"],
        "fc2_kernel": jnp.broadcast_to(fc2["kernel"], (num_branches, *fc2["kernel"].shape)),
        "fc2_bias": jnp.broadcast_to(fc2["bias"], (num_branches, *fc2["bias"].shape)),
    }
    return out
