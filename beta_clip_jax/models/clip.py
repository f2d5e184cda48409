"""BetaCLIP: image tower, text tower, text-conditioned pooler and the global temperature.

The parameter tree and method signatures are the ones docs/CONTRACTS.md fixes; export,
checkpoints and the trainer depend on them.

`config.method` adds another method's training outputs (docs/methods.md); with the default
"beta_clip" nothing changes. "smartclip" adds the mask head `smart_mask` (training only:
encode_image / encode_text never use it, and export ignores it). "holistic" gives the vision
tower `image_branches` K embeddings per image; encode_image then returns their fusion, so every
evaluator and `api.Encoder` score with the fused embedding.
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from beta_clip_jax.methods.holistic import fuse_branches
from beta_clip_jax.methods.smartclip import MaskHead
from beta_clip_jax.models.layers import abstract_params, logical_init
from beta_clip_jax.models.pooler import TextConditionedPooler
from beta_clip_jax.models.text import TextTower
from beta_clip_jax.models.variants import resolve_model_config
from beta_clip_jax.models.vision import VisionTower

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)


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
            attention=c.attention,
            branches=c.image_branches,
            branch_type=c.branch_type,
            branch_layers=c.branch_layers,
            cls_attention=c.branch_cls_attention,
            mlp_dim=c.vision_mlp_dim,
            activation=c.activation,
            layer_norm_eps=c.layer_norm_eps,
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
            attention=c.attention,
            mlp_dim=c.text_mlp_dim,
            activation=c.activation,
            layer_norm_eps=c.layer_norm_eps,
        )
        self.pooler = TextConditionedPooler(
            num_heads=c.pooler_heads, dtype=dt, value_init=c.pooler_value_init
        )
        if c.method == "smartclip":
            self.smart_mask = MaskHead(
                embed_dim=c.embed_dim, num_heads=c.mask_heads or c.text_heads, dtype=dt
            )
        self.logit_scale = self.param(
            "logit_scale", logical_init(nn.initializers.constant(LOGIT_SCALE_INIT), ()), ()
        )

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised float images [B, H, W, 3] -> (cls [B, E], patches [B, P, E]), projected.

        A Holistic model's cls is the fusion of its branches: the mean of the L2-normalised
        branch embeddings (its cosine with a text, after renormalising, ranks texts exactly as
        the paper's mean of branch logits does).
        """
        cls, patches = self.encode_image_branches(images)
        return (fuse_branches(cls) if cls.ndim == 3 else cls), patches

    def encode_image_branches(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(cls, patches) with cls [B, K, E] for a multi-branch (Holistic) model, else [B, E]."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int32 [..., L] (L <= context length) -> [..., E], projected, pooled at the first EOT."""
        lead = tokens.shape[:-1]
        out = self.text(tokens.reshape(-1, tokens.shape[-1]))
        return out.reshape(*lead, out.shape[-1])

    def encode_packed_text(self, tokens, segments, positions, eot) -> jax.Array:
        """Packed texts (data/packing.py): tokens / segments / positions [G, R, L], eot [G, T]
        -> [G, T, E], projected, each text read at its own EOT."""
        return self.text(tokens, segments=segments, positions=positions, eot=eot)

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

    def __call__(self, images: jax.Array, texts: dict) -> dict:
        """One training forward: images [B,H,W,3] and the texts of encode_texts.

        Method outputs, only when config.method asks for them: "sentence_text" [B, 1+S, E]
        (caption + sentence slots, the texts SmartCLIP and Holistic CLIP train on),
        "smart_mask" [B, 1+S, E] (SmartCLIP, binary forward / straight-through backward),
        "image_branches" [B, K, E] (Holistic; "image" is then their fusion). Both need
        unpacked texts.
        """
        c = self.config
        branches, patches = self.encode_image_branches(images)
        cls = fuse_branches(branches) if branches.ndim == 3 else branches
        extra = {}
        if c.method in ("smartclip", "holistic") and "caption" not in texts:
            raise ValueError(f"model.method={c.method!r} needs unpacked texts (data.pack_texts)")
        if c.method == "smartclip":
            sentences = jnp.concatenate(
                [_pad_to(texts["caption"][:, None], texts["sentences"].shape[-1]),
                 _pad_to(texts["sentences"], texts["caption"].shape[-1])], axis=1
            )  # fmt: skip
            lead = sentences.shape[:-1]
            flat = sentences.reshape(-1, sentences.shape[-1])
            sent, states = self.text(flat, return_tokens=True)
            sent = sent.reshape(*lead, sent.shape[-1])
            mask, _ = self.smart_mask(states.reshape(*lead, *states.shape[1:]), sentences != 0)
            extra = {"sentence_text": sent, "smart_mask": mask}
            text = sent
            if texts["phrases"].shape[1]:
                text = jnp.concatenate([text, self.encode_text(texts["phrases"])], axis=1)
        else:
            text = self.encode_texts(texts)
        if c.method == "holistic":
            extra = {
                "sentence_text": text[:, : 1 + texts["sentences"].shape[1]],
                "image_branches": branches if branches.ndim == 3 else branches[:, None],
            }
        pooled, _ = self.pool(text, patches)
        return {
            "image": cls,
            "patches": patches,
            "text": text,
            "pooled": pooled,
            "logit_scale": self.logit_scale,
            "pooler_logit_scale": nn.unbox(self.pooler.variables["params"]["logit_scale"]),
            **extra,
        }


def build_model(model_cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> BetaCLIP:
    """A BetaCLIP for `config.model` (variant plus overrides; resolved here)."""
    cfg = resolve_model_config(model_cfg)
    return BetaCLIP(ml_collections.FrozenConfigDict(cfg))


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


def _pad_to(tokens: jax.Array, length: int) -> jax.Array:
    """Zero-pads the last axis to `length` (a longer one stays): padding after the EOT changes no
    embedding under causal attention and EOT pooling."""
    extra = length - tokens.shape[-1]
    if extra <= 0:
        return tokens
    return jnp.pad(tokens, [(0, 0)] * (tokens.ndim - 1) + [(0, extra)])


def init_params(model: BetaCLIP, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Random parameters for `model`; boxed=True keeps the logical-axis metadata for sharding."""
    params = jax.jit(model.init)(rng, *dummy_inputs(model.config))["params"]
    return params if boxed else nn.unbox(params)


def param_shapes(model: BetaCLIP) -> dict:
    """Shapes (jax.ShapeDtypeStruct tree) of the unboxed parameters, without allocating them."""
    return abstract_params(model, *dummy_inputs(model.config))


def complete_params(params: Mapping, model: BetaCLIP, rng: jax.Array | None = None) -> dict:
    """A plain beta-CLIP tree (e.g. pretrained weights) -> the tree `model`'s method needs.

    Parameters the method adds start as: the SmartCLIP mask head freshly initialised (all masks
    start all-ones); Holistic "cls" branch tokens as copies of the pretrained class token and its
    position row (branches then differ only by their captions); Holistic "mlp" branched blocks
    as the pretrained blocks with fc2 tiled K times (the same model run K times). Everything
    already of the right shape is kept. SmartCLIP's mask head (training-only) is dropped when
    `model` is of another method. A default-method model gets plain `params` back unchanged.
    """
    c = model.config
    want = param_shapes(model)
    out = jax.tree.map(np.asarray, dict(params))
    if c.method != "smartclip":
        out.pop("smart_mask", None)
    if c.method == "smartclip" and "smart_mask" not in out:
        rng = jax.random.key(0) if rng is None else rng
        out["smart_mask"] = _init_mask_head(c, rng)
    if c.method == "holistic" and c.image_branches > 1:
        visual = dict(out["visual"])
        k = c.image_branches
        if c.branch_type == "cls" and "branch_tokens" not in visual:
            visual["branch_tokens"] = {
                "class_embedding": np.tile(visual["class_embedding"][None], (k - 1, 1)),
                "class_positional_embedding": np.tile(
                    visual["positional_embedding"][:1], (k - 1, 1)
                ),
            }
        plain_last = np.ndim(visual["last_block"]["fc2"]["kernel"]) == 2
        if c.branch_type == "mlp" and plain_last:
            visual = _branch_blocks(visual, c.vision_layers, c.branch_layers, k)
        out["visual"] = visual
    have = _flat_shapes(out)
    need = _flat_shapes(want)
    if have != need:
        differ = sorted(p for p in set(have) | set(need) if have.get(p) != need.get(p))
        detail = "; ".join(f"{p}: {have.get(p)} vs model {need.get(p)}" for p in differ[:8])
        raise ValueError(f"cannot complete the params for method {c.method!r}: {detail}")
    return out


def _flat_shapes(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}


def _init_mask_head(c, rng) -> dict:
    head = MaskHead(embed_dim=c.embed_dim, num_heads=c.mask_heads or c.text_heads)
    dummy = jnp.zeros((1, 1, 4, c.text_width), jnp.float32)
    params = jax.jit(head.init)(rng, dummy, jnp.ones((1, 1, 4), bool))["params"]
    return jax.tree.map(np.asarray, nn.unbox(params))


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


def inference_params(params: Mapping, model_cfg) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, model config) without the training-only parts, for export and inference.

    SmartCLIP's mask head is dropped and the method reset to "beta_clip" (encode_image and
    encode_text never use it, so every embedding is unchanged); a one-branch Holistic model
    is a plain model. A multi-branch Holistic model keeps its branches: they are part of
    inference (its image embedding is their fusion).
    """
    cfg = resolve_model_config(model_cfg)
    out = dict(params)
    if cfg.method == "smartclip" or (cfg.method == "holistic" and cfg.image_branches == 1):
        out.pop("smart_mask", None)
        cfg.method = "beta_clip"
    return out, cfg
