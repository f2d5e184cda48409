"""Checkpoints of the official β-CLIP training script (fzohra/B-CLIP, main_clip_ft.py).

The file is a torch.save zip of {epoch, state_dict, optimizer, optimizer_conditioner, scaler,
best_acc1, args (an argparse.Namespace)}. Only `state_dict` (plus epoch, best_acc1 and args, for
the log) is read; the optimizer states are never loaded. Keys may carry DDP's "module." prefix.

Layout of `state_dict`, and what each tensor becomes here:

- vision tower, timm's ViT: `visual.patch_embed.proj.weight` (no bias), `visual.cls_token`
  [1, 1, W], `visual.pos_embed` [1, 1 + G*G, W], `visual.norm_pre` (OpenAI's ln_pre), per block
  `visual.blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` with q, k and v stacked
  in that order on axis 0 of `attn.qkv`, and `visual.norm` (ln_post); `image_projection`
  [W, E] applied as x @ image_projection;
- text tower, OpenAI's with q, k, v already separate: `token_embedding`,
  `transformer.resblocks.N.{ln_1, attn.{q,k,v,out}_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
  `ln_final`, `text_projection` [W, E]; two 248-row positional tables, rows 0-19 used from the
  frozen `positional_embedding` and rows 20+ from the trained `positional_embedding_res`;
- `logit_scale` (log of the global scale);
- the pooler `text_conditioned_patches_block.{attn (nn.MultiheadAttention, 8 heads), ln_2,
  mlp.c_fc, mlp.c_proj, logit_scale}`.

The tensors are renamed to HF CLIPModel names (the towers) and to BetaCLIPPooler names (the pooler)
so that names.py's tables do the rest. Heads leave no trace in tensor shapes: the official towers
use 64-wide heads and the pooler always has 8 heads (head width 96 for L/14).
"""

import argparse
import dataclasses
import logging
import os
import re
import zipfile

import numpy as np

from beta_clip_jax.convert.names import (
    check_state_dict,
    check_weights,
    expected_hf_shapes,
    expected_pooler_shapes,
    pooler_from_torch,
)
from beta_clip_jax.convert.positions import RES_POSITIONS_KEY, effective_text_positions
from beta_clip_jax.convert.torch_pickle import TorchZip, read_torch_file
from beta_clip_jax.methods import resolve_model_config
from beta_clip_jax.models.variants import VARIANTS, match_variant

POOLER_PREFIX = "text_conditioned_patches_block."
POOLER_HEADS = 8  # AttentionPoolingMLPBlock's default, which the official models keep
_META = ("epoch", "best_acc1", "args")

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Official tensors <-> HF (or pooler) tensors, related by `kind` (see _TO_HF)."""

    official: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str = "copy"


# kind -> (official arrays -> HF arrays, HF shapes -> official shapes)
_TO_HF = {
    "copy": (lambda a: a, lambda s: s),
    # [W_in, W_out] used as x @ P <-> a Linear weight [W_out, W_in].
    "transpose": (lambda a: [a[0].T], lambda s: [s[0][::-1]]),
    # timm keeps pos_embed [1, N, W] and cls_token [1, 1, W] batch-shaped.
    "unbatch": (lambda a: [a[0][0]], lambda s: [(1,) + s[0]]),
    "cls": (lambda a: [a[0][0, 0]], lambda s: [(1, 1) + s[0]]),
    # timm's fused qkv: q, k, v stacked on axis 0.
    "split3": (lambda a: np.split(a[0], 3), lambda s: [(3 * s[0][0],) + s[0][1:]]),
    # Frozen table (rows 0-19 used) and trained table (rows 20+ used) -> one table.
    "positions": (lambda a: [effective_text_positions(*a)], lambda s: [s[0], s[0]]),
}


def _pairs(prefix_official: str, prefix_hf: str, names: dict[str, str]) -> list[_Rule]:
    """weight and bias rules for each (official module, HF module) of `names`."""
    return [
        _Rule((f"{prefix_official}{o}.{p}",), (f"{prefix_hf}{h}.{p}",))
        for o, h in names.items()
        for p in ("weight", "bias")
    ]


_VISION_BLOCK = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
_TEXT_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    **{f"attn.{x}_proj": f"self_attn.{x}_proj" for x in ("q", "k", "v", "out")},
}  # fmt: skip
_POOLER = {"attn.out_proj": "attn.out_proj", "ln_2": "ln", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"}


def _rules(vision_layers: int, text_layers: int) -> list[_Rule]:
    v, t = "vision_model.", "text_model."
    rules = [
        _Rule(("visual.patch_embed.proj.weight",), (f"{v}embeddings.patch_embedding.weight",)),
        _Rule(("visual.cls_token",), (f"{v}embeddings.class_embedding",), "cls"),
        _Rule(("visual.pos_embed",), (f"{v}embeddings.position_embedding.weight",), "unbatch"),
        _Rule(("image_projection",), ("visual_projection.weight",), "transpose"),
        _Rule(("token_embedding.weight",), (f"{t}embeddings.token_embedding.weight",)),
        _Rule(
            ("positional_embedding", RES_POSITIONS_KEY),
            (f"{t}embeddings.position_embedding.weight",),
            "positions",
        ),
        _Rule(("text_projection",), ("text_projection.weight",), "transpose"),
        _Rule(("logit_scale",), ("logit_scale",)),
    ]
    rules += _pairs("visual.", v, {"norm_pre": "pre_layrnorm", "norm": "post_layernorm"})
    rules += _pairs("", t, {"ln_final": "final_layer_norm"})
    for i in range(vision_layers):
        off, hf = f"visual.blocks.{i}.", f"{v}encoder.layers.{i}."
        rules += _pairs(off, hf, _VISION_BLOCK)
        for p in ("weight", "bias"):
            qkv = tuple(f"{hf}self_attn.{x}_proj.{p}" for x in "qkv")
            rules.append(_Rule((f"{off}attn.qkv.{p}",), qkv, "split3"))
    for i in range(text_layers):
        rules += _pairs(f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}.", _TEXT_BLOCK)
    # The pooler's torch names (names.POOLER_TABLE) get a "pooler:" mark to keep them apart.
    rules += _pairs(POOLER_PREFIX, "pooler:", _POOLER)
    for name in ("attn.in_proj_weight", "attn.in_proj_bias", "logit_scale"):
        rules.append(_Rule((POOLER_PREFIX + name,), ("pooler:" + name,)))
    return rules


def expected_bclip_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for the model `cfg` builds."""
    hf = expected_hf_shapes(cfg) | {
        f"pooler:{k}": s for k, s in expected_pooler_shapes(cfg).items()
    }
    out = {}
    for r in _rules(cfg.vision_layers, cfg.text_layers):
        shapes = _TO_HF[r.kind][1]([hf[k] for k in r.hf])
        out.update(zip(r.official, (tuple(s) for s in shapes), strict=True))
    return out


def bclip_to_hf_state_dict(sd, cfg) -> tuple[dict[str, np.ndarray], dict]:
    """(HF CLIPModel state_dict, our Flax pooler tree) from official tensors ("module." dropped).

    Raises one ValueError naming every missing, unexpected and wrongly shaped official tensor.
    """
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    check_state_dict(sd, cfg, "β-CLIP checkpoint", expected=expected_bclip_shapes(cfg))
    out = {}
    for r in _rules(cfg.vision_layers, cfg.text_layers):
        arrays = [np.asarray(sd[k], np.float32) for k in r.official]
        out.update(zip(r.hf, _TO_HF[r.kind][0](arrays), strict=True))
    pooler = {k.removeprefix("pooler:"): out.pop(k) for k in list(out) if k.startswith("pooler:")}
    return out, pooler_from_torch(pooler, cfg.pooler_heads)


def _count_layers(sd, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def variant_from_bclip_state_dict(sd, heads=None):
    """Our resolved model config from official tensor shapes; `heads` = (vision, text) to use
    when known, otherwise width // 64. Anything with a shape (arrays or placeholders) works."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        patch = np.shape(sd["visual.patch_embed.proj.weight"])
        tokens = np.shape(sd["visual.pos_embed"])[-2]
        shapes = dict(
            patch_size=patch[-1],
            image_size=patch[-1] * round((tokens - 1) ** 0.5),
            vision_width=patch[0],
            vision_layers=_count_layers(sd, "visual.blocks."),
            text_width=np.shape(sd["ln_final.weight"])[0],
            text_layers=_count_layers(sd, "transformer.resblocks."),
            vocab_size=np.shape(sd["token_embedding.weight"])[0],
            context_length=np.shape(sd["positional_embedding"])[0],
            embed_dim=np.shape(sd["text_projection"])[1],
        )
    except (KeyError, IndexError) as e:
        raise ValueError(f"not a β-CLIP state_dict: tensor {e} is missing or misshaped") from None
    vh, th = heads or (max(shapes["vision_width"] // 64, 1), max(shapes["text_width"] // 64, 1))
    shapes.update(vision_heads=vh, text_heads=th, pooler_heads=POOLER_HEADS)
    name = match_variant(shapes)
    if name is not None and VARIANTS[name]["pooler_heads"] != POOLER_HEADS:
        name = None  # e.g. our test sizes, whose pooler has other heads
    return resolve_model_config({"variant": name or "custom", **shapes})


def _has_pooler(state_dict) -> bool:
    return isinstance(state_dict, dict) and any(
        k.removeprefix("module.").startswith(POOLER_PREFIX) for k in state_dict
    )


def is_bclip_checkpoint(path: str) -> bool:
    """Whether `path` is a torch zip whose `state_dict` holds the pooler. Only data.pkl is read
    (the tensor bytes stay in the file), so this is cheap next to loading it. Legacy non-zip
    files are not looked into: they need `bclip:`."""
    if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return False
    try:
        with TorchZip(path) as z:
            if z.torchscript:
                return False
            root = z.root()
    except ValueError:  # a zip, but not a torch file
        return False
    return isinstance(root, dict) and _has_pooler(root.get("state_dict"))


def read_bclip_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict with "module." dropped, {epoch, best_acc1, args as a dict}) of an official
    training checkpoint; the optimizer and scaler states are not read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected a β-CLIP training checkpoint (.pt) at {path}")

    def wanted(root):
        if not (isinstance(root, dict) and isinstance(root.get("state_dict"), dict)):
            raise ValueError(f"{path} is not a β-CLIP training checkpoint: no 'state_dict' dict")
        return {k: root[k] for k in ("state_dict", *_META) if k in root}

    found = read_torch_file(path, select=wanted)
    sd = {k.removeprefix("module."): np.asarray(v) for k, v in found.pop("state_dict").items()}
    check_weights(path, sd)
    meta = {k: found.get(k) for k in _META}
    if isinstance(meta["args"], argparse.Namespace):
        meta["args"] = dict(vars(meta["args"]))
    _log.info(
        "%s: β-CLIP checkpoint, epoch %s, best_acc1 %s", path, meta["epoch"], meta["best_acc1"]
    )
    _log.debug("%s: training args %s", path, meta["args"])
    return sd, meta
