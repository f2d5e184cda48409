"""Model shapes by name, and the resolution of `config.model` into one complete ConfigDict.

A run names a variant ("B/16") and may override single fields; every consumer (model, converters,
export, benchmarks) reads the resolved ConfigDict, so the shapes are decided in one place.

VARIANTS is a table of names for common shapes, not the list of shapes allowed: a config (say one
read from a checkpoint) that sets every shape field itself resolves under any variant name. The
architecture defaults to OpenAI CLIP's (QuickGELU MLP of 4 x the width, LayerNorm eps 1e-5);
`activation`, `vision_mlp_dim` / `text_mlp_dim` and `layer_norm_eps` describe the rest of the CLIP
family (LAION's open_clip models, SDXL's text encoders).
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

# Fields that fix parameter shapes; checkpoints must agree on all of them.
SHAPE_FIELDS = (
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "text_width",
    "text_layers",
    "text_heads",
    "vocab_size",
    "context_length",
    "embed_dim",
    "pooler_heads",
    # MLP hidden widths; None (unset) is 4 x the tower's width, OpenAI's.
    "vision_mlp_dim",
    "text_mlp_dim",
)
# Shape fields a config may leave unset: they follow from others (see _fill_derived).
DERIVED_SHAPE_FIELDS = ("vision_mlp_dim", "text_mlp_dim")
MLP_RATIO = 4

# The MLP activations, by Hugging Face's `hidden_act` names (layers.ACTIVATIONS implements them).
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
DEFAULT_ACTIVATION = "quick_gelu"  # OpenAI CLIP's; what an unset model.activation means

# Options with a default. The first four change computation only. The method fields add
# parameters only when their method is on; with the defaults the tree is exactly beta-CLIP's.
OPTION_DEFAULTS = {
    "dtype": "float32",  # compute dtype of matmuls; parameters are always float32
    "scan_layers": True,  # nn.scan over the stacked layers (False unrolls; same param tree)
    "remat": "none",  # "none" | "full" | "dots"
    # Towers' attention kernel: "auto" (JAX picks; XLA's attention today), "xla", or "cudnn"
    # (NVIDIA GPUs only, bfloat16 compute; cuDNN's fused flash attention).
    "attention": "auto",
    # Pooler value/output projections at init: "reference" (PyTorch MHA defaults) or "identity"
    # (pooled view = attention-weighted mean of the patch tokens; tried in docs/demo.md).
    "pooler_value_init": "reference",
    "frozen_positions": 20,  # leading text positions kept fixed (Long-CLIP stretching)
    # The training method whose model this is (beta_clip_jax.methods registers them; each adds
    # its own fields, which resolve_model_config takes as `extra_defaults`).
    "method": "beta_clip",
    # The towers' MLP activation, one of ACTIVATIONS. "" (unset) resolves to quick_gelu; an
    # importer refuses a checkpoint whose activation it cannot tell while this is unset
    # (convert/__init__.py), rather than guessing.
    "activation": "",
    "layer_norm_eps": 1e-5,  # every LayerNorm of both towers (the pooler keeps its own 1e-5)
}

_TABLE_COLUMNS = SHAPE_FIELDS[:8] + ("embed_dim", "pooler_heads")

# fmt: off
# OpenAI CLIP shapes (B, L) and LAION's larger open_clip towers (H, g, bigG: 80, 88 and 104-wide
# vision heads); pooler heads follow the beta-CLIP reference (8 for B and L).
#          image patch v_width v_layers v_heads t_width t_layers t_heads embed pooler_heads
_TABLE = {
    "B/32":     (224, 32,   768, 12, 12,  512, 12,  8,  512, 8),
    "B/16":     (224, 16,   768, 12, 12,  512, 12,  8,  512, 8),
    "L/14":     (224, 14,  1024, 24, 16,  768, 12, 12,  768, 8),
    "L/14-336": (336, 14,  1024, 24, 16,  768, 12, 12,  768, 8),
    "H/14":     (224, 14,  1280, 32, 16, 1024, 24, 16, 1024, 8),
    "g/14":     (224, 14,  1408, 40, 16, 1024, 24, 16, 1024, 8),
    "bigG/14":  (224, 14,  1664, 48, 16, 1280, 32, 20, 1280, 8),
    # Test and demo sizes: compile and run in about a second on one CPU core.
    "tiny":     (32,   8,    64,  2,  2,   64,  2,  2,   32, 4),
    "tiny-b16": (64,  16,    64,  2,  2,   64,  2,  2,   32, 4),
}
# fmt: on
# Vision MLP widths that are not 4 x the width: open_clip's int(width * mlp_ratio) for ViT-g-14
# (1408 * 4.3637) and ViT-bigG-14 (1664 * 4.9231). Every other variant leaves them unset (None),
# so an override of a width keeps the MLP at 4 x the new width, as before these fields existed.
_VISION_MLP = {"g/14": 6144, "bigG/14": 8192}
VARIANTS: dict[str, dict[str, Any]] = {
    name: {
        **dict(zip(_TABLE_COLUMNS, row, strict=True)),
        "vocab_size": 49408,
        "context_length": 248,
        "vision_mlp_dim": _VISION_MLP.get(name),
        "text_mlp_dim": None,
    }
    for name, row in _TABLE.items()
}

ALL_FIELDS = ("variant",) + SHAPE_FIELDS + tuple(OPTION_DEFAULTS)
_DTYPES = ("float32", "bfloat16")
_REMAT = ("none", "full", "dots")
ATTENTION = ("auto", "xla", "cudnn")
POOLER_VALUE_INITS = ("reference", "identity")


def unknown_variant(name: str) -> ValueError:
    return ValueError(f"unknown model variant {name!r}; known variants: {', '.join(VARIANTS)}")


def resolve_model_config(
    cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    extra_defaults: Mapping[str, Any] | None = None,
):
    """Turns `config.model` (a variant plus optional overrides, None = keep) into a full config.

    `extra_defaults`: more fields and their defaults (the methods' own, which this module does
    not know; beta_clip_jax.methods.resolve_model_config passes them and checks them).
    A config whose variant is not in VARIANTS is accepted when it sets every shape field itself
    (for example one derived from a checkpoint), so resolving is idempotent.
    """
    extra = dict(extra_defaults or {})
    fields = ALL_FIELDS + tuple(f for f in extra if f not in ALL_FIELDS)
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = sorted(set(items) - set(fields))
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}; allowed: {list(fields)}")
    name = items.get("variant")
    if name in VARIANTS:
        base = dict(VARIANTS[name])
    else:
        required = [f for f in SHAPE_FIELDS if f not in DERIVED_SHAPE_FIELDS]
        missing = [f for f in required if items.get(f) is None]
        if missing:
            if name is None:
                raise ValueError(f"config.model needs a variant; known variants: {list(VARIANTS)}")
            raise unknown_variant(str(name))
        base = {}
    base.update(OPTION_DEFAULTS)
    base.update(extra)
    base.update({k: v for k, v in items.items() if v is not None})
    base["variant"] = name
    _fill_derived(base)
    out = ml_collections.ConfigDict({f: base[f] for f in fields})
    _validate(out)
    return out


def _fill_derived(fields: dict) -> None:
    """Unset MLP widths become 4 x the tower width and an unset activation QuickGELU (OpenAI's
    architecture), so configs written before these fields existed resolve as they did."""
    for tower in ("vision", "text"):
        if fields.get(f"{tower}_mlp_dim") is None and fields.get(f"{tower}_width") is not None:
            fields[f"{tower}_mlp_dim"] = MLP_RATIO * fields[f"{tower}_width"]
    if not fields.get("activation"):
        fields["activation"] = DEFAULT_ACTIVATION
    if fields.get("layer_norm_eps") is None:
        fields["layer_norm_eps"] = OPTION_DEFAULTS["layer_norm_eps"]


def _validate(c: ml_collections.ConfigDict) -> None:
    """Rejects shapes that cannot build, naming the numbers, before anything compiles."""
    errors = []
    if c.dtype not in _DTYPES:
        errors.append(f"dtype={c.dtype!r} (allowed {_DTYPES})")
    if c.remat not in _REMAT:
        errors.append(f"remat={c.remat!r} (allowed {_REMAT})")
    if c.pooler_value_init not in POOLER_VALUE_INITS:
        errors.append(f"pooler_value_init={c.pooler_value_init!r} (allowed {POOLER_VALUE_INITS})")
    if c.attention not in ATTENTION:
        errors.append(f"attention={c.attention!r} (allowed {ATTENTION})")
    elif c.attention == "cudnn" and c.dtype != "bfloat16":
        errors.append(
            "attention='cudnn' needs dtype='bfloat16' (cuDNN's kernel takes 16-bit inputs)"
        )
    if c.image_size % c.patch_size:
        errors.append(f"image_size={c.image_size} is not a multiple of patch_size={c.patch_size}")
    for tower in ("vision", "text"):
        w, h = c[f"{tower}_width"], c[f"{tower}_heads"]
        if w % h:
            errors.append(f"{tower}_width={w} is not divisible by {tower}_heads={h}")
        if c[f"{tower}_mlp_dim"] < 1:
            errors.append(f"{tower}_mlp_dim={c[f'{tower}_mlp_dim']} (at least 1)")
    if c.activation not in ACTIVATIONS:
        errors.append(f"activation={c.activation!r} (allowed {ACTIVATIONS})")
    if not (isinstance(c.layer_norm_eps, int | float) and 0 < c.layer_norm_eps < 1):
        errors.append(f"layer_norm_eps={c.layer_norm_eps!r} (a float in (0, 1))")
    if c.embed_dim % c.pooler_heads:
        errors.append(f"embed_dim={c.embed_dim} is not divisible by pooler_heads={c.pooler_heads}")
    if c.vision_layers < 1:
        errors.append(f"vision_layers={c.vision_layers} (the mixed last block needs at least 1)")
    if not 0 <= c.frozen_positions <= c.context_length:
        errors.append(f"frozen_positions={c.frozen_positions} outside [0, {c.context_length}]")
    if errors:
        raise ValueError("invalid model config: " + "; ".join(errors))


def num_patches(c: ml_collections.ConfigDict) -> int:
    """Patch tokens per image (without CLS)."""
    return (c.image_size // c.patch_size) ** 2


def match_variant(shapes: Mapping[str, Any]) -> str | None:
    """Name of the variant whose tower shapes equal `shapes` (text context and vocab ignored;
    unset MLP widths count as 4 x the width)."""
    keys = [f for f in SHAPE_FIELDS if f not in ("context_length", "vocab_size", "pooler_heads")]
    given = dict(shapes)
    _fill_derived(given)
    for name, v in VARIANTS.items():
        row = dict(v)
        _fill_derived(row)
        if all(given.get(k) == row[k] for k in keys):
            return name
    return None
