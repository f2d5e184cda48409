"""Holistic CLIP's model: K image embeddings per image from one ViT, and their fusion.

Two forms (model.branch_type), both ending in the tower's shared `ln_post` and projection applied
to each branch's CLS output; `HolisticVisionTower` is the plain VisionTower with one stage
replaced, so every other parameter keeps its name:

* "cls": `extra_rows` adds K-1 class tokens `branch_tokens/{class_embedding,
  class_positional_embedding}` [K-1, W] after the original CLS (branch 0); CLS i never attends
  to CLS j (`cls_attention_mask`), or, with branch_cls_attention="bias", gets the released
  code's +1 logit bias instead (`cls_attention_bias`).
* "mlp": `trunk` runs the last `branch_layers` blocks on K streams (`split_branches`) whose
  blocks share every weight except the MLP's second layer `fc2` ([K, M, W], `BranchedDense`):
  "blocks" then stacks L - n standard blocks, "branch_blocks" the n - 1 branched ones, and
  "last_block" is branched too. Patch tokens are the mean of the K streams.

The image embedding of inference is the fusion of the branches (`fuse_branches`), so every
evaluator and the inference API score with it. `complete_params` turns a plain pretrained tree
into this one: class tokens copied K-1 times, fc2 tiled K times (the same model run K times).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beta_clip_jax.models.clip import BetaCLIP
from beta_clip_jax.models.layers import block_stack, logical_init
from beta_clip_jax.models.vision import VisionTower

_F32 = jnp.float32

BRANCH_TYPES = ("cls", "mlp")
CLS_ATTENTION = ("block", "bias")
MODEL_DEFAULTS = {
    "image_branches": 1,  # K image embeddings per image (1: one CLS, the O2M case)
    "branch_type": "cls",  # "cls" (K class tokens) | "mlp" (per-branch fc2)
    "branch_layers": 3,  # "mlp": how many last vision blocks are branched
    "branch_cls_attention": "block",  # "cls": "block" | "bias" (the released +1 quirk)
}


# ---- fusion ------------------------------------------------------------------------------


def _unit(x):
    x = jnp.asarray(x)
    x = x.astype(jnp.result_type(_F32, x.dtype))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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


def branched_fc2(num_branches: int):
    """ResidualBlock's `mlp_out` for K streams: one fc2 per branch (see BranchedDense)."""

    def make(features, dtype, std, name):
        return BranchedDense(features, num_branches, dtype, std, name=name)

    return make


class BranchedDense(nn.Module):
    """[B*K, L, D] (stream k of image b at row b*K + k) -> [B*K, L, F]: one Dense per branch
    (kernel [K, D, F], bias [K, F])."""

    features: int
    num_branches: int
    dtype: Any = _F32
    std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, d = self.num_branches, x.shape[-1]
        kernel = self.param(
            "kernel",
            logical_init(nn.initializers.normal(self.std), (None, "mlp", "embed")),
            (k, d, self.features),
        )
        bias = self.param(
            "bias", logical_init(nn.initializers.zeros_init(), (None, "embed")), (k, self.features)
        )
        streams = x.reshape(-1, k, *x.shape[1:])
        y = jnp.einsum("bkld,kdf->bklf", streams.astype(self.dtype), kernel.astype(self.dtype))
        y = y.astype(_F32) + bias[None, :, None, :]
        return y.reshape(*x.shape[:-1], self.features)


# ---- the tower and the model ---------------------------------------------------------------


class HolisticVisionTower(VisionTower):
    """VisionTower with K image branches -> first output [B, K, E] (see the module docstring)."""

    branches: int = 1
    branch_type: str = "cls"
    branch_layers: int = 3
    cls_attention: str = "block"

    def extra_rows(self, x: jax.Array):
        if self.branch_type != "cls":
            return x, None, 1
        k = self.branches
        extra = MultiClassTokens(k - 1, name="branch_tokens")(x[:, 1:])
        x = jnp.concatenate([x[:, :1], extra], axis=1)
        make = cls_attention_mask if self.cls_attention == "block" else cls_attention_bias
        return x, make(k, x.shape[1]), k

    def trunk(self, x: jax.Array, attn, num_cls: int):
        if self.branch_type != "mlp":
            return super().trunk(x, attn, num_cls)
        k, n = self.branches, self.branch_layers
        stack = self.stack_options()
        if self.layers > n:
            x, _ = block_stack(self.layers - n, self.width, self.heads, mode="full", **stack)(
                x, attn
            )
        b, length, w = x.shape
        # The K streams become batch rows b*K + k: each attends only within itself.
        x = split_branches(x, k).reshape(b * k, length, w)
        fc2 = branched_fc2(k)
        if n > 1:
            x, _ = block_stack(
                n - 1, w, self.heads, mode="full", name="branch_blocks", mlp_out=fc2, **stack
            )(x, None)
        last_input = x.reshape(b, k, length, w)
        x = self.last_block(1, mlp_out=fc2)(x, None)
        return x.reshape(b, k, length, w), {"last_block_input": last_input}

    def head(self, x: jax.Array, num_cls: int):
        if self.branch_type != "mlp":
            return super().head(x, num_cls)
        cls, patches = super().head(x.reshape(-1, *x.shape[2:]), 1)
        k = self.branches
        cls = cls.reshape(-1, k, cls.shape[-1])
        return cls, patches.reshape(-1, k, *patches.shape[1:]).mean(axis=1)


class HolisticModel(BetaCLIP):
    """β-CLIP with K image branches. Extra training outputs: "image_branches" [B, K, E] and
    "sentence_text" [B, 1+S, E] (the caption + sentence slots the multi-to-multi loss pairs
    with branches); "image" is the branches' fusion."""

    def make_vision_tower(self, options: dict) -> nn.Module:
        c = self.config
        if c.image_branches == 1:
            return super().make_vision_tower(options)
        return HolisticVisionTower(
            image_size=c.image_size,
            patch_size=c.patch_size,
            branches=c.image_branches,
            branch_type=c.branch_type,
            branch_layers=c.branch_layers,
            cls_attention=c.branch_cls_attention,
            **options,
        )

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(cls, patches); cls is the fusion of the branches: the mean of the L2-normalised
        branch embeddings (its cosine with a text, after renormalising, ranks texts exactly as
        the paper's mean of branch logits does)."""
        cls, patches = self.encode_image_branches(images)
        return (fuse_branches(cls) if cls.ndim == 3 else cls), patches

    def encode_image_branches(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(cls, patches) with cls [B, K, E] for K > 1 branches, else [B, E]."""
        return self.visual(images)[0]

    def image_features(self, images: jax.Array):
        branches, patches = self.encode_image_branches(images)
        cls = fuse_branches(branches) if branches.ndim == 3 else branches
        extra = {"image_branches": branches if branches.ndim == 3 else branches[:, None]}
        return cls, patches, extra

    def text_features(self, texts: dict):
        if "caption" not in texts:
            raise ValueError("model.method='holistic' needs unpacked texts (data.pack_texts)")
        text = self.encode_texts(texts)
        return text, {"sentence_text": text[:, : 1 + texts["sentences"].shape[1]]}


def complete_params(params: dict, model, rng) -> dict:
    """Class tokens copied from the pretrained class token and its position row ("cls": the
    branches then differ only by their captions); plain blocks turned into branched ones with
    fc2 tiled K times ("mlp": the same model run K times)."""
    c = model.config
    if c.image_branches <= 1:
        return params
    visual = dict(params["visual"])
    k = c.image_branches
    if c.branch_type == "cls" and "branch_tokens" not in visual:
        visual["branch_tokens"] = {
            "class_embedding": np.tile(visual["class_embedding"][None], (k - 1, 1)),
            "class_positional_embedding": np.tile(visual["positional_embedding"][:1], (k - 1, 1)),
        }
    plain_last = np.ndim(visual["last_block"]["fc2"]["kernel"]) == 2
    if c.branch_type == "mlp" and plain_last:
        visual = _branch_blocks(visual, c.vision_layers, c.branch_layers, k)
    return {**params, "visual": visual}


def _branch_blocks(visual: dict, layers: int, n: int, k: int) -> dict:
    """Plain "blocks" (L-1 stacked) + "last_block" -> the MLP form's three block groups."""

    def tile_fc2(block, axis):
        fc2 = block["fc2"]
        tiled = {key: np.repeat(np.expand_dims(fc2[key], axis), k, axis) for key in fc2}
        return {**block, "fc2": tiled}

    visual = dict(visual)
    blocks = visual.pop("blocks")
    split = layers - n
    if split > 0:
        visual["blocks"] = jax.tree.map(lambda x: x[:split], blocks)
    if n > 1:
        visual["branch_blocks"] = tile_fc2(jax.tree.map(lambda x: x[split:], blocks), 1)
    visual["last_block"] = tile_fc2(visual["last_block"], 0)
    return visual
