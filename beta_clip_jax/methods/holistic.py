"""Holistic CLIP: K image embeddings per image, M captions per image, multi-to-multi loss.

docs/methods.md has the options, commands and caveats. Pieces:

- `m2m_loss`: per caption slot m, a CLIP loss between slot m's captions and one image branch.
  Branch choice per (image, slot), as in the released code: slot m uses branch m when K = M
  (and for m < K when K < M); otherwise the branch with the largest positive similarity, a hard
  argmax with gradient through the chosen branch only. Plus the diversity hinge
  max(0, mean_{k != l} mean_b <v_bk, v_bl> - 0.7), which the released training loop adds.
- Two ways to get K image embeddings from the ViT, both ending in the tower's shared `ln_post`
  and projection applied to each branch's CLS output:
  * CLS form: `MultiClassTokens` prepends K class tokens; every block then uses
    `cls_attention_mask` so CLS i never attends to CLS j; the ViT returns rows 0..K-1.
  * MLP form: the last n blocks become `BranchedBlock`s: the token stream [B, L, W] is copied
    into K streams [B, K, L, W] (`split_branches`); LN, attention and the first MLP layer are
    shared, the second MLP layer (`fc2`) is per branch; each stream attends only within itself.
    Parameter names match models/layers.py's ResidualBlock, so `branched_block_params` turns a
    pretrained block into a branched one (fc2 tiled K times).
- Inference fuses branches by averaging per-branch cosine logits (`fused_logits`); equivalently
  score texts against `fuse_branches` (the mean of the L2-normalised branch embeddings, kept
  unnormalised). `branches=` selects a subset (the paper's embedding customisation).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from beta_clip_jax.models.layers import LayerNorm, logical_init, quick_gelu

_NEG = -1e9  # finite "minus infinity" for padded columns (see smartclip._NEG)
_F32 = jnp.float32


def _unit(x):
    x = jnp.asarray(x)
    x = x.astype(jnp.result_type(_F32, x.dtype))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def branch_assignment(image, text, pairing: str = "auto"):
    """Branch index per (image, caption slot) -> int32 [B, M].

    image [B, K, E], text [B, M, E], both L2-normalised. pairing: "auto" (the released code:
    fixed k = m when K = M, fixed for m < K and argmax beyond when K < M, argmax for every
    slot when K > M), "fixed" (k = m; needs M <= K) or "argmax" (every slot).
    """
    b, k, _ = image.shape
    m = text.shape[1]
    fixed = jnp.broadcast_to(jnp.arange(m), (b, m))
    best = jnp.argmax(jnp.einsum("bke,bme->bmk", image, text), axis=-1)
    if pairing == "fixed":
        if m > k:
            raise ValueError(f"fixed pairing needs M <= K caption slots; got M={m}, K={k}")
        return fixed.astype(jnp.int32)
    if pairing == "argmax" or (pairing == "auto" and k > m):
        return best.astype(jnp.int32)
    if pairing == "auto":
        return jnp.where(fixed < k, fixed, best).astype(jnp.int32)
    raise ValueError(f"unknown pairing {pairing!r}; expected 'auto', 'fixed' or 'argmax'")


def m2m_loss(
    image,
    text,
    logit_scale,
    valid=None,
    *,
    pairing: str = "auto",
    diversity_margin: float = 0.7,
    diversity_weight: float = 1.0,
):
    """Multi-to-multi contrastive loss -> (loss, metrics).

    image: [B, K, E] branch embeddings; text: [B, M, E] caption slots; valid: [B, M] bool
    (None = all valid); logit_scale: the multiplier s (not its log). Normalised inside.
    With a[b, m] the chosen branch (`branch_assignment`), for each slot m:

        i2t row (i, m):    s <v[i, a[i, m]], t[j, m]> over valid j, positive j = i
        t2i column (j, m): s <v[i, a[j, m]], t[j, m]> over all images i, positive i = j

    loss = (mean_valid CE_i2t + mean_valid CE_t2i) / 2 + diversity_weight * hinge. K = M = 1
    is the standard CLIP loss.
    """
    v, t = _unit(image), _unit(text)
    b, k, _ = v.shape
    m = t.shape[1]
    if valid is None:
        valid = jnp.ones((b, m), bool)
    scale = jnp.asarray(logit_scale, v.dtype)

    assign = branch_assignment(jax.lax.stop_gradient(v), jax.lax.stop_gradient(t), pairing)
    pick = jax.nn.one_hot(assign, k, dtype=v.dtype)  # [B, M, K]
    # Rows: each image under its own chosen branch; columns: every image under the branch the
    # caption's own image chose. One-hot contractions avoid a [K, M, B, B] logit tensor.
    v_row = jnp.einsum("bmk,bke->bme", pick, v)
    rows = scale * jnp.einsum("ime,jme->mij", v_row, t)
    cols = scale * jnp.einsum("ike,jmk,jme->mji", v, pick, t)
    pos = jnp.einsum("ime,ime->mi", v_row, t) * scale

    slot_valid = valid.T  # [M, B]
    ce_i2t = jax.nn.logsumexp(jnp.where(slot_valid[:, None, :], rows, _NEG), axis=-1) - pos
    ce_t2i = jax.nn.logsumexp(cols, axis=-1) - pos
    w = slot_valid.astype(v.dtype)
    count = jnp.maximum(w.sum(), 1.0)
    loss_i2t = (ce_i2t * w).sum() / count
    loss_t2i = (ce_t2i * w).sum() / count
    loss = 0.5 * (loss_i2t + loss_t2i)

    if k > 1:
        sim = jnp.einsum("bke,ble->kl", v, v) / b
        off = (sim.sum() - jnp.trace(sim)) / (k * (k - 1))
        hinge = jnp.maximum(off - diversity_margin, 0.0)
    else:
        off = hinge = jnp.zeros((), v.dtype)
    loss = loss + diversity_weight * hinge

    metrics = {
        "m2m_i2t": loss_i2t,
        "m2m_t2i": loss_t2i,
        "m2m_diversity": hinge,
        "m2m_branch_similarity": jax.lax.stop_gradient(off),
    }
    return loss, metrics


def _select(image, branches: Sequence[int] | None):
    return image if branches is None else image[:, jnp.asarray(branches)]


def fuse_branches(image, branches: Sequence[int] | None = None):
    """[N, K, E] -> [N, E]: mean of the L2-normalised branches, not renormalised.

    Its dot product with a unit text vector is the mean of the per-branch cosines, which is the
    paper's fusion; renormalising would change image rankings for a fixed text.
    """
    return _unit(_select(image, branches)).mean(axis=1)


def fused_logits(image, text, *, mode: str = "mean", branches: Sequence[int] | None = None):
    """Cosine logits [N, T] from branch embeddings [N, K, E] and texts [T, E], mean or max."""
    per_branch = jnp.einsum("nke,te->nkt", _unit(_select(image, branches)), _unit(text))
    if mode == "mean":
        return per_branch.mean(axis=1)
    if mode == "max":
        return per_branch.max(axis=1)
    raise ValueError(f"unknown branch fusion {mode!r}; expected 'mean' or 'max'")


# ---- CLS form ---------------------------------------------------------------------------


class MultiClassTokens(nn.Module):
    """Patch tokens [B, P, W] (positions already added) -> [B, K + P, W], K class tokens first.

    Replaces the ViT's single class token and its positional row 0: `class_embedding` [K, W] and
    `class_positional_embedding` [K, W] (from a pretrained CLIP, K copies of each).
    """

    num_branches: int

    @nn.compact
    def __call__(self, patches):
        b, _, w = patches.shape
        shape = (self.num_branches, w)
        cls = self.param(
            "class_embedding", logical_init(nn.initializers.normal(w**-0.5), (None, "embed")), shape
        )
        pos = self.param(
            "class_positional_embedding",
            logical_init(nn.initializers.normal(w**-0.5), (None, "embed")),
            shape,
        )
        tokens = jnp.broadcast_to((cls + pos).astype(patches.dtype), (b, *shape))
        return jnp.concatenate([tokens, patches], axis=1)


def cls_attention_mask(num_branches: int, length: int):
    """bool [1, 1, L, L], True = may attend: CLS i sees itself and the patches, not CLS j.

    Patches attend to every token. Shaped for jax.nn.dot_product_attention's `mask`.
    """
    idx = jnp.arange(length)
    both_cls = (idx[:, None] < num_branches) & (idx[None, :] < num_branches)
    return ~(both_cls & (idx[:, None] != idx[None, :]))[None, None]


def cls_attention_bias(num_branches: int, length: int):
    """float32 [1, 1, L, L]: the released code's effective mask, +1 on CLS i -> CLS j logits.

    The code meant to block those pairs but cast its boolean mask to an additive float one;
    use this (as `bias=`) only to reproduce its numbers.
    """
    return (~cls_attention_mask(num_branches, length)).astype(_F32)


# ---- MLP form ---------------------------------------------------------------------------


def split_branches(x, num_branches: int):
    """Token stream [B, L, W] -> K identical streams [B, K, L, W] (input of the first branch)."""
    return jnp.broadcast_to(x[:, None], (x.shape[0], num_branches, *x.shape[1:]))


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
