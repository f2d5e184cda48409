"""Pretrained weights in and out: `load_pretrained(SPEC, cfg)` / `import_pretrained(SPEC, cfg)`.

Init specs (`config.init`, `api.load`):
- `hf:DIR`: a Hugging Face CLIP directory (`config.json` + safetensors, or pytorch_model.bin) of
  any CLIPModel-family config (activation, MLP width, LayerNorm eps, widths, heads, layers, patch
  and image size from config.json), or a directory holding `vision/` and `text/`
  (CLIPVisionModelWithProjection + CLIPTextModelWithProjection; no logit_scale, which then keeps
  CLIP's initial value); optionally an export of ours with `beta_clip_pooler.safetensors` (keys:
  flax paths joined by "/", e.g. "pooler/query/kernel") and `beta_clip_meta.json` (its "model"
  entry: our model config). See hf.py;
- `hf:ORG/NAME`: a hub id, read from its snapshot in the local Hugging Face cache (HF_HUB_CACHE);
  nothing is downloaded, and an id that is not cached is an error naming the id and the cache;
- `openai:FILE.pt`: an OpenAI CLIP checkpoint (TorchScript archive or plain state_dict), or a
  Long-CLIP one (longclip-B.pt, longclip-L.pt: two positional tables, merged; see openai.py). A
  plain state dict does not say its activation (LAION's GELU models share OpenAI's names): it is
  refused unless the model config states `activation` (its LayerNorm eps, not in the file
  either, is then the model config's);
- `openclip:PATH[@MODEL]`: an open_clip checkpoint with `open_clip_config.json` beside it, or
  with MODEL naming an open_clip model config (openclip.py); PATH may be a hub id in the cache;
- `bclip:FILE.pt`: a checkpoint of the official β-CLIP training script, pooler included
  (bclip.py);
- `workdir:DIR`: a workdir of ours (has `checkpoints/`), handed to `beta_clip_jax.checkpoint`.
A bare path is classified by what it holds, in this order: a directory with `checkpoints/` is a
workdir, a directory with `open_clip_config.json` and no `config.json` is `openclip:`, another
directory is `hf:`, a torch zip whose `state_dict` has pooler keys is `bclip:` (only its small
data.pkl is read to tell), a file with `open_clip_config.json` beside it is `openclip:`, any
other file is `openai:`.

With a model config given, the checkpoint must agree with it: heads, MLP widths, activation and
LayerNorm eps that differ are one error naming each (an unset `model.activation` means
QuickGELU), and tensors of other shapes another.

No file's code is executed: `.pt` zips go through torch_pickle's restricted unpickler, safetensors
hold no code, and legacy `.pt` / `.bin` files load with `torch.load(weights_only=True)`.
Parameters the source does not hold (the pooler, for plain CLIP weights) keep a fresh
initialisation; their names are returned by `import_pretrained` and logged by `load_pretrained`.
"""

import dataclasses
import functools
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from beta_clip_jax.convert.bclip import (
    bclip_to_hf_state_dict,
    is_bclip_checkpoint,
    read_bclip_checkpoint,
    variant_from_bclip_state_dict,
)
from beta_clip_jax.convert.hf import (
    hf_config_from_variant,
    hf_layout,
    local_hf_dir,
    read_hf_dir,
    read_safetensors,
    variant_from_hf_config,
    write_hf_dir,
)
from beta_clip_jax.convert.names import (
    check_state_dict,
    flax_to_hf_state_dict,
    hf_state_dict_to_flax,
)
from beta_clip_jax.convert.openai import (
    openai_activation,
    openai_to_hf_state_dict,
    read_openai_state_dict,
    variant_from_openai_state_dict,
)
from beta_clip_jax.convert.openclip import (
    OPENCLIP_CONFIG,
    read_openclip,
    variant_from_openclip_config,
)
from beta_clip_jax.convert.positions import KEEP, adapt_text_positions, stretch_positions
from beta_clip_jax.methods import resolve_model_config
from beta_clip_jax.models.variants import ALL_FIELDS

__all__ = [
    "POOLER_FILE",
    "META_FILE",
    "check_state_dict",
    "flax_to_hf_state_dict",
    "hf_config_from_variant",
    "hf_state_dict_to_flax",
    "import_pretrained",
    "load_pretrained",
    "parse_spec",
    "read_hf_dir",
    "stretch_positions",
    "variant_from_hf_config",
    "write_hf_dir",
]

POOLER_FILE = "beta_clip_pooler.safetensors"
META_FILE = "beta_clip_meta.json"
# Rows of the 77-row table that Long-CLIP stretching keeps as they are (convert/positions.py).
STRETCH_KEEP = KEEP
_HEADS = ("vision_heads", "text_heads")
# Architecture fields a checkpoint fixes besides its tensor shapes.
_ARCH = ("vision_mlp_dim", "text_mlp_dim", "activation", "layer_norm_eps")
_KINDS = ("hf", "openai", "openclip", "bclip", "workdir")

_log = logging.getLogger(__name__)


def parse_spec(spec: str) -> tuple[str, str]:
    """("hf" | "openai" | "openclip" | "bclip" | "workdir", path) for an init spec; a bare path
    is classified by what it holds (see the module docstring)."""
    for kind in _KINDS:
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1 :]
    if os.path.isdir(os.path.join(spec, "checkpoints")):
        return "workdir", spec
    if os.path.isdir(spec):
        beside = os.path.isfile(os.path.join(spec, OPENCLIP_CONFIG))
        return ("openclip" if beside and not _has_hf_config(spec) else "hf"), spec
    if is_bclip_checkpoint(spec):
        return "bclip", spec
    if os.path.isfile(spec) and os.path.isfile(
        os.path.join(os.path.dirname(spec), OPENCLIP_CONFIG)
    ):
        return "openclip", spec
    if spec.endswith(".pt") or os.path.isfile(spec):
        return "openai", spec
    raise FileNotFoundError(
        f"no weights at {spec!r}: expected 'hf:DIR' (a Hugging Face CLIP directory) or "
        "'hf:ORG/NAME' (in the local Hugging Face cache), 'openai:FILE.pt' (an OpenAI or "
        "Long-CLIP checkpoint), 'openclip:PATH[@MODEL]' (an open_clip checkpoint), "
        "'bclip:FILE.pt' (an official β-CLIP training checkpoint) or a workdir with checkpoints/"
    )


def weights_location(spec: str) -> str:
    """The local file or directory an init spec reads: its path, a hub id's snapshot in the
    local Hugging Face cache, an open_clip PATH@MODEL's PATH. Raises FileNotFoundError (with
    what to do) when there is none; it may not exist when a prefix names it."""
    from beta_clip_jax.convert.hf import is_hub_id, local_hf_dir
    from beta_clip_jax.convert.openclip import split_model_name

    kind, path = parse_spec(spec)
    if kind == "openclip":
        path = split_model_name(path)[0]
    if kind in ("hf", "openclip") and is_hub_id(path):
        path = local_hf_dir(path, kind)
    return path


def _has_hf_config(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _from_workdir(path: str, step=None):
    try:
        from beta_clip_jax.checkpoint import load_params_from_workdir
        from beta_clip_jax.step import abstract_params
    except ImportError as e:
        raise NotImplementedError(
            f"reading workdir {path} needs beta_clip_jax.checkpoint.load_params_from_workdir"
        ) from e
    # It returns (params, model config, step); the step is of no use to an import.
    params, cfg, *_ = load_params_from_workdir(path, abstract_params, step=step)
    return params, cfg


def _cfg_dict(cfg) -> dict:
    return dict(cfg.items())


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _init_pooler(cfg, rng) -> dict:
    """Fresh pooler parameters (numpy), as BetaCLIP would initialise them."""
    return jax.tree_util.tree_map(np.asarray, _pooler_init_fn(cfg.embed_dim, cfg.pooler_heads)(rng))


def _pooler(embed_dim: int, heads: int):
    """(the pooler BetaCLIP builds, the smallest input that creates its parameters)."""
    from beta_clip_jax.models.pooler import TextConditionedPooler

    return TextConditionedPooler(num_heads=heads), jnp.zeros((1, 1, embed_dim), jnp.float32)


@functools.lru_cache(maxsize=8)
def _pooler_init_fn(embed_dim: int, heads: int):
    """One compiled pooler init per shape, reused across loads."""
    import flax.linen as nn

    pooler, dummy = _pooler(embed_dim, heads)
    return jax.jit(lambda r: nn.unbox(pooler.init(r, dummy, dummy)["params"]))


def _check_pooler(flat: dict, cfg) -> None:
    from beta_clip_jax.models.layers import abstract_params

    pooler, dummy = _pooler(cfg.embed_dim, cfg.pooler_heads)
    abstract = abstract_params(pooler, dummy, dummy)
    want = {k: tuple(v.shape) for k, v in _flatten(abstract).items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    differ = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
    bad = [f"pooler/{k}: file {got.get(k)} vs model {want.get(k)}" for k in differ]
    if bad:
        raise ValueError(f"{POOLER_FILE} does not fit the model: " + "; ".join(bad))


def _given_heads(model_cfg):
    """(vision_heads, text_heads) of a given model config: files do not record them."""
    if model_cfg is None:
        return None
    given = resolve_model_config(model_cfg)
    return given.vision_heads, given.text_heads


def _stated_activation(model_cfg) -> str:
    """The activation a given model config states ("" when none is given or it is unset)."""
    return (model_cfg.get("activation") if model_cfg is not None else "") or ""


@dataclasses.dataclass
class _Source:
    """What one checkpoint provides: its tensors (HF CLIPModel names; for `bclip:` the official
    ones, renamed once the model config is known), the model config it implies, and what it
    cannot tell or does not hold."""

    state: dict
    ckpt_cfg: dict
    pooler_flat: dict | None = None
    # Why the file does not tell its MLP activation; "" when it does.
    unknown_activation: str = ""
    # Flax paths of tower parameters the source lacks, filled with their initial value.
    filled: list[str] = dataclasses.field(default_factory=list)


def _read_hf(path: str, model_cfg) -> _Source:
    path = local_hf_dir(path)
    pair = hf_layout(path) == "pair"
    state, config_json = read_hf_dir(path)
    src = _Source(state, _cfg_dict(variant_from_hf_config(config_json)))
    if pair:  # two towers hold no temperature: CLIP's initial one
        from beta_clip_jax.models.clip import LOGIT_SCALE_INIT

        state["logit_scale"] = np.float32(LOGIT_SCALE_INIT)
        src.filled.append("logit_scale")
    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta_model = json.load(f).get("model") or {}
        src.ckpt_cfg.update({k: v for k, v in meta_model.items() if k in ALL_FIELDS})
    pooler_path = os.path.join(path, POOLER_FILE)
    if os.path.isfile(pooler_path):
        flat = read_safetensors(pooler_path)
        src.pooler_flat = {k.removeprefix("pooler/"): v for k, v in flat.items()}
    return src


def _read_openai(path: str, model_cfg) -> _Source:
    raw = read_openai_state_dict(path)
    activation, why = openai_activation(path, raw)
    ckpt_cfg = _cfg_dict(variant_from_openai_state_dict(raw, _given_heads(model_cfg), activation))
    if model_cfg is not None:  # no eps in the file either: a given model's (OpenAI's is 1e-5)
        ckpt_cfg["layer_norm_eps"] = resolve_model_config(model_cfg).layer_norm_eps
    src = _Source(openai_to_hf_state_dict(raw), ckpt_cfg)
    if activation is None:
        src.unknown_activation = (
            f"{path} is {why} with OpenAI CLIP names, which does not tell its MLP activation: "
            "OpenAI's models use QuickGELU and LAION's open_clip models GELU, under the same "
            "names and shapes, and the wrong one loads silently into wrong embeddings. Load it "
            f"as openclip:{path}@MODEL (e.g. @ViT-B-32 for GELU, @ViT-B-32-quickgelu) or with "
            f"its {OPENCLIP_CONFIG} beside it, or state the activation in the model config "
            "(model.activation='quick_gelu' or 'gelu')"
        )
    return src


def _read_openclip(path: str, model_cfg) -> _Source:
    raw, model_json, _ = read_openclip(path)
    ckpt_cfg = variant_from_openclip_config(model_json, f"openclip:{path}")
    return _Source(openai_to_hf_state_dict(raw), _cfg_dict(ckpt_cfg))


def _read_bclip(path: str, model_cfg) -> _Source:
    raw, _ = read_bclip_checkpoint(path)
    return _Source(raw, _cfg_dict(variant_from_bclip_state_dict(raw, _given_heads(model_cfg))))


_READERS = {
    "hf": _read_hf,
    "openai": _read_openai,
    "openclip": _read_openclip,
    "bclip": _read_bclip,
}


def _check_agrees(spec: str, kind: str, ckpt_cfg: dict, cfg) -> None:
    """Refuses a model config other than the checkpoint's where tensor shapes cannot tell
    (heads) or tell it by another name (MLP widths), and in activation and eps."""
    # Head counts leave no trace in tensor shapes, so a wrong one would load silently. The
    # official pooler always has 8 heads, so a bclip file fixes pooler_heads too.
    fields = _HEADS + (("pooler_heads",) if kind == "bclip" else ())
    wrong = [
        f"{f}: checkpoint {ckpt_cfg[f]} vs model {cfg[f]}" for f in fields if cfg[f] != ckpt_cfg[f]
    ]
    if wrong:
        raise ValueError(f"{spec} has other attention heads than the model: " + "; ".join(wrong))
    ckpt = resolve_model_config(ckpt_cfg)
    differ = [f for f in _ARCH if not _same(ckpt[f], cfg[f])]
    if differ:
        detail = "; ".join(f"{f}: checkpoint {ckpt[f]!r} vs model {cfg[f]!r}" for f in differ)
        fix = ", ".join(f"model.{f}={ckpt[f]!r}" for f in differ)
        raise ValueError(
            f"{spec} has another architecture than the model config: {detail} (an unset "
            f"model.activation is quick_gelu); set {fix}"
        )


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def import_pretrained(spec: str, model_cfg=None, *, rng=None, step=None):
    """(params, model_cfg, not_provided): numpy params for `model_cfg` (default: the checkpoint's
    own shapes), with the names of the parameters that were freshly initialised.

    A model context of 248 with a 77-position checkpoint stretches the positional table; any
    other difference in shapes is a ValueError naming every tensor that differs.
    """
    kind, path = parse_spec(spec)
    if kind == "workdir":
        params, cfg = _from_workdir(path, step)
        return params, cfg, []
    src = _READERS[kind](path, model_cfg)
    if src.unknown_activation:
        stated = _stated_activation(model_cfg)
        if not stated:
            raise ValueError(src.unknown_activation)
        src.ckpt_cfg["activation"] = stated
    cfg = resolve_model_config(src.ckpt_cfg if model_cfg is None else model_cfg)
    _check_agrees(spec, kind, src.ckpt_cfg, cfg)
    state, pooler_flat = src.state, src.pooler_flat
    if kind == "bclip":
        state, pooler = bclip_to_hf_state_dict(state, cfg)
        pooler_flat = _flatten(pooler)
    state = adapt_text_positions(state, cfg.context_length, keep=STRETCH_KEEP)
    params = hf_state_dict_to_flax(state, cfg)

    not_provided = list(src.filled)
    if pooler_flat is not None:
        _check_pooler(pooler_flat, cfg)
        params["pooler"] = _unflatten(
            {k: np.asarray(v, np.float32) for k, v in pooler_flat.items()}
        )
    else:
        rng = jax.random.key(0) if rng is None else rng
        params["pooler"] = _init_pooler(cfg, rng)
        not_provided += [f"pooler/{k}" for k in _flatten(params["pooler"])]
    return params, cfg, sorted(not_provided)


def load_pretrained(spec: str, model_cfg=None, *, rng=None, step=None):
    """(params, model_cfg) for `config.init`; logs which parameters were freshly initialised."""
    params, cfg, not_provided = import_pretrained(spec, model_cfg, rng=rng, step=step)
    if not_provided:
        _log.info("%s does not provide %s; they keep their initialisation", spec, not_provided)
    return params, ml_collections.ConfigDict(cfg)
