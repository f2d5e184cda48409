"""The one name table between our Flax parameters and a Hugging Face `CLIPModel` state_dict.

Import (HF -> Flax) and export (Flax -> HF) both walk this table, so a name or layout fixed here is
fixed in both directions. Each entry names a Flax path, an HF key (with `{i}` for the layer index),
a per-tensor transform and how layers are stacked:

- "vision": HF vision layers 0..L-2 stacked on axis 0 of `visual/blocks/...`;
- "vision_last": HF vision layer L-1 -> `visual/last_block/...` (beta-CLIP's mixed block);
- "text": HF text layers 0..L-1 stacked on axis 0 of `text/blocks/...`.

The pooler has no CLIPModel counterpart. Its own table, POOLER_TABLE, maps it to the state_dict of
`beta_clip_jax.torch_pooler.BetaCLIPPooler` with the same transforms; the exported pooler
file keeps our Flax names ("pooler/query/kernel", ...), which `pooler_file_tensors` writes.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from beta_clip_jax.methods import resolve_model_config
from beta_clip_jax.models.variants import SHAPE_FIELDS


# Transforms: from_hf(torch layout) -> flax layout, and back. `h` is the number of heads.
def _qkv_from_hf(w, h):
    return w.T.reshape(w.shape[1], h, -1)


def _qkv_to_hf(k, h):
    return k.reshape(k.shape[0], -1).T


def _out_from_hf(w, h):
    return w.T.reshape(h, -1, w.shape[0])


def _out_to_hf(k, h):
    return k.reshape(-1, k.shape[-1]).T


# Transforms: (from_hf: torch layout -> flax layout, to_hf: back). `h` is the number of heads.
_TRANSFORMS = {
    # Same layout.
    "copy": (lambda w, h: w, lambda k, h: k),
    # torch Linear (out, in) <-> flax Dense (in, out).
    "linear": (lambda w, h: w.T, lambda k, h: k.T),
    # q/k/v Linear (H*Dh, E) <-> DenseGeneral (E, H, Dh); head h owns rows h*Dh:(h+1)*Dh.
    "qkv_kernel": (_qkv_from_hf, _qkv_to_hf),
    "qkv_bias": (lambda b, h: b.reshape(h, -1), lambda b, h: b.reshape(-1)),
    # out_proj Linear (E, H*Dh) <-> DenseGeneral over (H, Dh) -> E.
    "out_kernel": (_out_from_hf, _out_to_hf),
    # Conv2d OIHW <-> flax Conv HWIO.
    "conv": (lambda w, h: w.transpose(2, 3, 1, 0), lambda k, h: k.transpose(3, 2, 0, 1)),
}

# The HF shape a flax shape becomes under each transform (used to check before converting).
_HF_SHAPES = {
    "copy": lambda s: tuple(s),
    "linear": lambda s: tuple(reversed(s)),
    "qkv_kernel": lambda s: (s[1] * s[2], s[0]),
    "qkv_bias": lambda s: (s[0] * s[1],),
    "out_kernel": lambda s: (s[2], s[0] * s[1]),
    "conv": lambda s: (s[3], s[2], s[0], s[1]),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: Flax path, HF key template, transform, layer stacking and heads field."""

    flax: tuple[str, ...]
    hf: str
    kind: str = "copy"
    stack: str | None = None
    heads: str | None = None
    # Index of this tensor's slice in a fused PyTorch tensor (the pooler's in_proj holds q, k, v).
    part: int | None = None


def _block_entries(flax_prefix: tuple[str, ...], hf_prefix: str, stack: str, heads: str):
    """The 16 tensors of one residual block."""
    out = []
    for ln_ours, ln_hf in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
        out.append(Entry(flax_prefix + (ln_ours, "scale"), f"{hf_prefix}.{ln_hf}.weight"))
        out.append(Entry(flax_prefix + (ln_ours, "bias"), f"{hf_prefix}.{ln_hf}.bias"))
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        w, b = f"{hf_prefix}.self_attn.{theirs}.weight", f"{hf_prefix}.self_attn.{theirs}.bias"
        out.append(Entry(flax_prefix + (ours, "kernel"), w, "qkv_kernel"))
        out.append(Entry(flax_prefix + (ours, "bias"), b, "qkv_bias"))
    out_proj = f"{hf_prefix}.self_attn.out_proj"
    out.append(Entry(flax_prefix + ("out", "kernel"), f"{out_proj}.weight", "out_kernel"))
    out.append(Entry(flax_prefix + ("out", "bias"), f"{out_proj}.bias"))
    for fc in ("fc1", "fc2"):
        out.append(Entry(flax_prefix + (fc, "kernel"), f"{hf_prefix}.mlp.{fc}.weight", "linear"))
        out.append(Entry(flax_prefix + (fc, "bias"), f"{hf_prefix}.mlp.{fc}.bias"))
    return [dataclasses.replace(e, stack=stack, heads=heads) for e in out]


def _build_table() -> tuple[Entry, ...]:
    v, t = "vision_model", "text_model"
    table = [
        Entry(("visual", "conv1", "kernel"), f"{v}.embeddings.patch_embedding.weight", "conv"),
        Entry(("visual", "class_embedding"), f"{v}.embeddings.class_embedding"),
        Entry(("visual", "positional_embedding"), f"{v}.embeddings.position_embedding.weight"),
        Entry(("visual", "ln_pre", "scale"), f"{v}.pre_layrnorm.weight"),
        Entry(("visual", "ln_pre", "bias"), f"{v}.pre_layrnorm.bias"),
        Entry(("visual", "ln_post", "scale"), f"{v}.post_layernorm.weight"),
        Entry(("visual", "ln_post", "bias"), f"{v}.post_layernorm.bias"),
        Entry(("visual", "proj", "kernel"), "visual_projection.weight", "linear"),
        Entry(("text", "token_embedding"), f"{t}.embeddings.token_embedding.weight"),
        Entry(("text", "positional_embedding"), f"{t}.embeddings.position_embedding.weight"),
        Entry(("text", "ln_final", "scale"), f"{t}.final_layer_norm.weight"),
        Entry(("text", "ln_final", "bias"), f"{t}.final_layer_norm.bias"),
        Entry(("text", "proj", "kernel"), "text_projection.weight", "linear"),
        Entry(("logit_scale",), "logit_scale"),
    ]
    v_layer, t_layer = f"{v}.encoder.layers.{{i}}", f"{t}.encoder.layers.{{i}}"
    table += _block_entries(("visual", "blocks"), v_layer, "vision", "vision_heads")
    table += _block_entries(("visual", "last_block"), v_layer, "vision_last", "vision_heads")
    table += _block_entries(("text", "blocks"), t_layer, "text", "text_heads")
    return tuple(table)


TABLE = _build_table()


def _build_pooler_table() -> tuple[Entry, ...]:
    """Pooler tensors -> BetaCLIPPooler state_dict (nn.MultiheadAttention fuses q, k, v)."""
    table = []
    for part, ours in enumerate(("query", "key", "value")):
        table.append(
            Entry(("pooler", ours, "kernel"), "attn.in_proj_weight", "qkv_kernel", part=part)
        )
        table.append(Entry(("pooler", ours, "bias"), "attn.in_proj_bias", "qkv_bias", part=part))
    table += [
        Entry(("pooler", "out", "kernel"), "attn.out_proj.weight", "out_kernel"),
        Entry(("pooler", "out", "bias"), "attn.out_proj.bias"),
        Entry(("pooler", "ln", "scale"), "ln.weight"),
        Entry(("pooler", "ln", "bias"), "ln.bias"),
        Entry(("pooler", "fc1", "kernel"), "fc1.weight", "linear"),
        Entry(("pooler", "fc1", "bias"), "fc1.bias"),
        Entry(("pooler", "fc2", "kernel"), "fc2.weight", "linear"),
        Entry(("pooler", "fc2", "bias"), "fc2.bias"),
        Entry(("pooler", "logit_scale"), "logit_scale"),
    ]
    return tuple(table)


POOLER_TABLE = _build_pooler_table()
# q, k and v share one in_proj tensor in nn.MultiheadAttention.
_FUSED = 3

# HF buffers that may appear in a state_dict and carry no weights.
_IGNORED_SUFFIXES = ("position_ids",)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # what a weight may be stored as


def is_buffer(key: str) -> bool:
    """Whether a state_dict key is an HF buffer (integer `position_ids`), not a weight."""
    return key.endswith(_IGNORED_SUFFIXES)


def check_weights(path: str, tensors: Mapping[str, Any], skip=None) -> None:
    """Raise ValueError naming `path` and the tensor for the first weight that is not a float
    array (int64, bool, ...) or holds a NaN or an infinity: loading it would train or evaluate
    garbage. HF buffers (`position_ids`) and keys `skip(key)` accepts are not weights."""
    for key, value in tensors.items():
        if is_buffer(key) or (skip is not None and skip(key)):
            continue
        array = np.asarray(value)
        if array.dtype.name not in FLOAT_DTYPES:
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {array.dtype}, but weights are floating "
                f"point ({', '.join(FLOAT_DTYPES)}); not a weights file this model can load"
            )
        if array.dtype.kind != "f":  # ml_dtypes' bfloat16
            array = array.astype(np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            nan = int(np.count_nonzero(np.isnan(array)))
            raise ValueError(
                f"{path}: tensor {key!r} {tuple(array.shape)} holds {nan} NaN and "
                f"{finite.size - int(finite.sum()) - nan} infinite values: the file is damaged "
                "or comes from a run that diverged"
            )


def _layer_indices(entry: Entry, cfg) -> list[int | None]:
    """HF layer indices that feed this entry (None: not a per-layer tensor)."""
    if entry.stack == "vision":
        return list(range(cfg.vision_layers - 1))
    if entry.stack == "vision_last":
        return [cfg.vision_layers - 1]
    if entry.stack == "text":
        return list(range(cfg.text_layers))
    return [None]


def _entries_for(cfg):
    """Entries that exist for this config (no vision stack when the tower has one layer)."""
    for e in TABLE:
        if e.stack == "vision" and cfg.vision_layers < 2:
            continue
        if e.stack == "text" and cfg.text_layers < 1:
            continue
        yield e


def expected_flax_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path -> shape for every parameter of TABLE and POOLER_TABLE the model `cfg` builds."""
    return dict(_model_shapes(tuple((f, cfg[f]) for f in SHAPE_FIELDS)))


@functools.lru_cache(maxsize=16)
def _model_shapes(shape_cfg: tuple) -> tuple:
    """Traces the model's init once per shape config (a second or so for the large variants)."""
    from beta_clip_jax.methods import build_model  # heavy; import when used
    from beta_clip_jax.models.clip import param_shapes

    cfg = resolve_model_config(dict(shape_cfg, variant="shapes"))
    tree = param_shapes(build_model(cfg))
    out = {}
    for e in (*_entries_for(cfg), *POOLER_TABLE):
        out[e.flax] = tuple(_get(tree, e.flax).shape)
    return tuple(out.items())


def expected_hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """HF key -> shape for the model `cfg` builds."""
    flax_shapes = expected_flax_shapes(cfg)
    out = {}
    for e in _entries_for(cfg):
        shape = flax_shapes[e.flax]
        if e.stack in ("vision", "text"):
            shape = shape[1:]
        for i in _layer_indices(e, cfg):
            out[e.hf.format(i=i)] = _HF_SHAPES[e.kind](shape)
    return out


def expected_pooler_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """BetaCLIPPooler state_dict key -> shape for the pooler `cfg` builds (q, k, v fused)."""
    flax_shapes = expected_flax_shapes(cfg)
    out: dict[str, tuple[int, ...]] = {}
    for e in POOLER_TABLE:
        shape = _HF_SHAPES[e.kind](flax_shapes[e.flax])
        if e.part:  # later parts of a fused tensor stack on axis 0
            shape = (out[e.hf][0] + shape[0],) + shape[1:]
        out[e.hf] = shape
    return out


def _describe(names: list[str], limit: int = 25) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    state_dict: Mapping[str, Any], cfg, what: str = "checkpoint", expected=None
) -> None:
    """Raises ValueError naming every missing, unexpected and wrongly shaped tensor.

    `expected` (key -> shape) defaults to the HF layout of `cfg`; a converter checking a file in
    its own layout, so that the error names the file's keys, passes that layout's shapes.
    """
    expected = expected_hf_shapes(cfg) if expected is None else expected
    given = {
        k: tuple(np.shape(v)) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)
    }
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k}: {what} {given[k]} vs model {expected[k]}"
        for k in sorted(set(given) & set(expected))
        if given[k] != expected[k]
    ]
    if missing or unexpected or mismatched:
        parts = [f"{what} does not fit model variant {cfg.variant!r}"]
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {_describe(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} missing tensors: {_describe(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors: {_describe(unexpected)}")
        raise ValueError("; ".join(parts))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def hf_state_dict_to_flax(state_dict: Mapping[str, Any], cfg) -> dict:
    """HF CLIPModel tensors (numpy-convertible) -> our nested params (float32 numpy), no pooler.

    The state dict must fit `cfg` exactly (see check_state_dict); positional tables of another
    length must be adapted first (positions.adapt_text_positions).
    """
    check_state_dict(state_dict, cfg)
    params: dict = {}
    for e in _entries_for(cfg):
        heads = cfg[e.heads] if e.heads else None
        from_hf = _TRANSFORMS[e.kind][0]
        arrays = [
            from_hf(np.asarray(state_dict[e.hf.format(i=i)], dtype=np.float32), heads)
            for i in _layer_indices(e, cfg)
        ]
        value = np.stack(arrays) if e.stack in ("vision", "text") else arrays[0]
        _set(params, e.flax, np.array(value, np.float32, order="C"))
    return params


def flax_to_hf_state_dict(params: Mapping, cfg) -> dict[str, np.ndarray]:
    """Our params (any arrays; pooler ignored) -> HF CLIPModel state_dict as float32 numpy."""
    out = {}
    for e in _entries_for(cfg):
        heads = cfg[e.heads] if e.heads else None
        to_hf = _TRANSFORMS[e.kind][1]
        value = np.asarray(_get(params, e.flax), dtype=np.float32)
        for j, i in enumerate(_layer_indices(e, cfg)):
            layer = value[j] if e.stack in ("vision", "text") else value
            out[e.hf.format(i=i)] = np.array(to_hf(layer, heads), np.float32, order="C")
    return out


def table_paths(cfg) -> set[tuple[str, ...]]:
    """Every Flax parameter path the tables cover for `cfg` (export checks it covers the tree)."""
    return {e.flax for e in _entries_for(cfg)} | {e.flax for e in POOLER_TABLE}


def _pooler_heads(pooler: Mapping) -> int:
    """Heads of a Flax pooler tree, read from its query kernel [E, H, Dh]."""
    return int(np.shape(pooler["query"]["kernel"])[1])


def pooler_file_tensors(params: Mapping) -> dict[str, np.ndarray]:
    """The exported pooler file: {"pooler/query/kernel": ...} in Flax layout, float32.

    `params` is the whole tree or its "pooler" sub-tree; a pooler leaf the table does not know is
    an error, so a new parameter cannot be dropped from exports unnoticed.
    """
    pooler = params.get("pooler", params)
    found = {("pooler",) + p for p in _leaf_paths(pooler)}
    known = {e.flax for e in POOLER_TABLE}
    if found != known:
        raise ValueError(
            "pooler parameters differ from POOLER_TABLE: "
            f"untabled {sorted(found - known)}, missing {sorted(known - found)}"
        )
    return {
        "/".join(e.flax): np.array(_get(pooler, e.flax[1:]), np.float32, order="C")
        for e in POOLER_TABLE
    }


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        out += _leaf_paths(v, prefix + (k,)) if isinstance(v, Mapping) else [prefix + (k,)]
    return out


def pooler_to_torch(pooler_flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Pooler file tensors ("pooler/..." names, Flax layout) -> BetaCLIPPooler state_dict."""
    flat = {k.removeprefix("pooler/"): np.asarray(v, np.float32) for k, v in pooler_flat.items()}
    tree: dict = {}
    for name, v in flat.items():
        _set(tree, tuple(name.split("/")), v)
    pooler_file_tensors(tree)  # names every missing or unknown tensor
    heads = _pooler_heads(tree)
    out: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}
    for e in POOLER_TABLE:
        value = np.array(_TRANSFORMS[e.kind][1](_get(tree, e.flax[1:]), heads), np.float32)
        if e.part is None:
            out[e.hf] = value
        else:
            fused.setdefault(e.hf, [None] * _FUSED)[e.part] = value
    out.update({k: np.concatenate(v) for k, v in fused.items()})
    return out


def pooler_from_torch(state_dict: Mapping[str, Any], heads: int) -> dict:
    """BetaCLIPPooler state_dict -> our Flax "pooler" sub-tree (float32 numpy)."""
    tree: dict = {}
    for e in POOLER_TABLE:
        value = np.asarray(state_dict[e.hf], np.float32)
        if e.part is not None:
            value = np.split(value, _FUSED, axis=0)[e.part]
        _set(tree, e.flax[1:], np.array(_TRANSFORMS[e.kind][0](value, heads), np.float32))
    return tree
