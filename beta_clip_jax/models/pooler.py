"""Text-conditioned cross-attention pooler (docs/methods.md, β-CLIP itself).

Each image's K texts query that image's own patch tokens through one multi-head attention layer
followed by a pre-LN QuickGELU MLP residual. There is no residual back to the query and no final
LayerNorm, so the output lives in the span of value-projected patches plus the MLP on top.

Parameter tree (names are stable; export maps them to PyTorch):

```
query/kernel [E, H, Dh]  query/bias [H, Dh]    -> in_proj_weight[0:E]    (reshape [E, E], transpose)
key/kernel   [E, H, Dh]  key/bias   [H, Dh]    -> in_proj_weight[E:2E]
value/kernel [E, H, Dh]  value/bias [H, Dh]    -> in_proj_weight[2E:3E]; biases -> in_proj_bias
out/kernel   [H, Dh, E]  out/bias   [E]        -> out_proj.weight (reshape [E, E], transpose), .bias
ln/scale [E]  ln/bias [E]                      -> LayerNorm weight, bias
fc1/kernel [E, M]  fc1/bias [M]                -> Linear(E, M) weight (transpose), bias
fc2/kernel [M, E]  fc2/bias [E]                -> Linear(M, E) weight (transpose), bias
logit_scale ()                                 -> log of the beta-CAL scale, init ln(1/0.07)
```

Heads are laid out as PyTorch does: head h owns features h*Dh:(h+1)*Dh of the projected vector.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.mathutil import l2_normalize
from beta_clip_jax.models.layers import LN_EPS, LayerNorm, quick_gelu

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)


def _uniform(bound: float):
    """U(-bound, bound) initialiser for any shape (PyTorch-style bounds given explicitly)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _identity(key, shape, dtype=jnp.float32):
    """The E x E identity, reshaped to a head-split kernel ([E, H, dh] or [H, dh, E])."""
    del key
    e = math.isqrt(math.prod(shape))
    return jnp.eye(e, dtype=dtype).reshape(shape)


def _param(module, name, init, shape, axes):
    """A float32 parameter carrying logical axis names for the sharding rules."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class _Affine(nn.Module):
    """Holds one kernel and bias (a named sub-tree like a Dense), applied by the caller's einsum.

    The pooler's projections have head-split shapes that nn.Dense cannot name, and keeping the
    einsum outside keeps every contraction visible in one place.
    """

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    kernel_bound: float
    bias_shape: tuple[int, ...]
    bias_axes: tuple[str, ...]
    bias_bound: float = 0.0  # 0 means a zero-initialised bias
    identity: bool = False  # kernel = the identity map (reshaped to kernel_shape) instead

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        init = _identity if self.identity else _uniform(self.kernel_bound)
        kernel = _param(self, "kernel", init, self.kernel_shape, self.kernel_axes)
        bias_init = _uniform(self.bias_bound) if self.bias_bound else nn.initializers.zeros_init()
        bias = _param(self, "bias", bias_init, self.bias_shape, self.bias_axes)
        return kernel, bias


class TextConditionedPooler(nn.Module):
    """Pools each image's patches once per text of that image.

    Attributes:
      num_heads: attention heads H (embed dim E must be divisible by it).
      mlp_ratio: hidden width of the output MLP as a multiple of E.
      dtype: compute dtype of the matmuls; parameters, softmax and LayerNorm stay float32.
      value_init: "reference" (PyTorch's MHA initialisation) or "identity": the value and output
        projections start as the identity, so a pooled view starts as an attention-weighted mean
        of the patch tokens themselves (in the space the dense FG-OVD score reads them).
    """

    num_heads: int = 8
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    value_init: str = "reference"

    @nn.compact
    def __call__(self, text_emb: jax.Array, patches: jax.Array) -> tuple[jax.Array, jax.Array]:
        """text_emb [B, K, E], patches [B, P, E] -> (pooled [B, K, E], attn [B, H, K, P]).

        Both inputs are L2-normalised here; attention never crosses images, so the cost is
        O(B K P E), not O(B K x B P).
        """
        if text_emb.ndim != 3 or patches.ndim != 3:
            raise ValueError(
                f"pooler wants text_emb [B,K,E] and patches [B,P,E], got {text_emb.shape}, "
                f"{patches.shape}"
            )
        e = text_emb.shape[-1]
        if patches.shape[-1] != e or patches.shape[0] != text_emb.shape[0]:
            raise ValueError(
                f"pooler shape mismatch: text {text_emb.shape}, patches {patches.shape}"
            )
        h = self.num_heads
        if e % h:
            raise ValueError(f"embed dim {e} is not divisible by num_heads {h}")
        dh = e // h
        m = self.mlp_ratio * e
        cd = self.dtype

        # Xavier-uniform over PyTorch's stacked [3E, E] in_proj_weight, shared by q, k and v.
        in_bound = math.sqrt(6.0 / (e + 3 * e))
        # kaiming_uniform(a=sqrt(5)) on a fan_in x fan_out Linear is U(+-1/sqrt(fan_in)).
        e_bound = 1.0 / math.sqrt(e)
        m_bound = 1.0 / math.sqrt(m)

        q_in = l2_normalize(text_emb).astype(cd)
        kv_in = l2_normalize(patches).astype(cd)

        identity = self.value_init == "identity"

        def proj(name, x):
            w, b = _Affine(
                (e, h, dh),
                ("embed", "heads", "kv"),
                in_bound,
                (h, dh),
                ("heads", "kv"),
                identity=identity and name == "value",
                name=name,
            )()
            return jnp.einsum("bte,ehd->bthd", x, w.astype(cd)) + b.astype(cd)

        q = proj("query", q_in)
        k = proj("key", kv_in)
        v = proj("value", kv_in)

        logits = jnp.einsum("bkhd,bphd->bhkp", q, k).astype(jnp.float32) / math.sqrt(dh)
        attn = jax.nn.softmax(logits, axis=-1)
        ctx = jnp.einsum("bhkp,bphd->bkhd", attn.astype(cd), v)

        w_o, b_o = _Affine(
            (h, dh, e),
            ("heads", "kv", "embed"),
            e_bound,
            (e,),
            ("embed",),
            identity=identity,
            name="out",
        )()
        o = jnp.einsum("bkhd,hde->bke", ctx, w_o.astype(cd)) + b_o.astype(cd)

        # The towers' LayerNorm (float32 statistics); eps 1e-5 and the names ln/scale, ln/bias
        # are the reference pooler's, which export and torch_pooler.py map to.
        y = LayerNorm(LN_EPS, name="ln")(o)

        w1, b1 = _Affine((e, m), ("embed", "mlp"), e_bound, (m,), ("mlp",), e_bound, name="fc1")()
        w2, b2 = _Affine((m, e), ("mlp", "embed"), m_bound, (e,), ("embed",), m_bound, name="fc2")()
        hid = quick_gelu(jnp.einsum("bke,em->bkm", y.astype(cd), w1.astype(cd)) + b1.astype(cd))
        u = o + jnp.einsum("bkm,me->bke", hid, w2.astype(cd)) + b2.astype(cd)

        # Touch the temperature so it exists in the tree; the loss reads it from params.
        _param(self, "logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), (), ())
        return u, attn
