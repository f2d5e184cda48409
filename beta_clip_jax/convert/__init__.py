"""Pretrained weights in and out: `load_pretrained(SPEC, cfg)` / `import_pretrained(SPEC, cfg)`.

Init specs (`config.init`, `api.load`):
- `hf:DIR`: a Hugging Face CLIP directory (`config.json` + safetensors, or pytorch_model.bin),
  optionally an export of ours with `beta_clip_pooler.safetensors` (keys: flax paths joined by
  "/", e.g. "pooler/query/kernel") and `beta_clip_meta.json` (its "model" entry: our model config);
- `openai:FILE.pt`: an OpenAI CLIP checkpoint (TorchScript archive or plain state_dict), or a
  Long-CLIP one (longclip-B.pt, longclip-L.pt: two positional tables, merged; see openai.py);
- `bclip:FILE.pt`: a checkpoint of the official β-CLIP training script, pooler included
  (bclip.py);
- `workdir:DIR`: a workdir of ours (has `checkpoints/`), handed to `beta_clip_jax.checkpoint`.
A bare path is classified by what it holds, in this order: a directory with `checkpoints/` is a
workdir, another directory is `hf:`, a torch zip whose `state_dict` has pooler keys is `bclip:`
(only its small data.pkl is read to tell), any other file is `openai:`.

No file's code is executed: `.pt` zips go through torch_pickle's restricted unpickler, safetensors
hold no code, and legacy `.pt` / `.bin` files load with `torch.load(weights_only=True)`.
Parameters the source does not hold (the pooler, for plain CLIP weights) keep a fresh
initialisation; their names are returned by `import_pretrained` and logged by `load_pretrained`.
"""

import functools
import json
import logging
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
    openai_to_hf_state_dict,
    read_openai_state_dict,
    variant_from_openai_state_dict,
)
from beta_clip_jax.convert.positions import KEEP, adapt_text_positions, stretch_positions
from beta_clip_jax.models.variants import ALL_FIELDS, resolve_model_config

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

_log = logging.getLogger(__name__)


def parse_spec(spec: str) -> tuple[str, str]:
    """("hf" | "openai" | "bclip" | "workdir", path) for an init spec; a bare path is classified
    by what it holds (see the module docstring)."""
    for kind in ("hf", "openai", "bclip", "workdir"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1 :]
    if os.path.isdir(os.path.join(spec, "checkpoints")):
        return "workdir", spec
    if os.path.isdir(spec):
        return "hf", spec
    if is_bclip_checkpoint(spec):
        return "bclip", spec
    if spec.endswith(".pt") or os.path.isfile(spec):
        return "openai", spec
    raise FileNotFoundError(
        f"no weights at {spec!r}: expected 'hf:DIR' (a Hugging Face CLIP directory), "
        "'openai:FILE.pt' (an OpenAI or Long-CLIP checkpoint), 'bclip:FILE.pt' (an official "
        "β-CLIP training checkpoint) or a workdir with checkpoints/"
    )


def _from_workdir(path: str, step=None):
    try:
        from beta_clip_jax.checkpoint import load_params_from_workdir
    except ImportError as e:
        raise NotImplementedError(
            f"reading workdir {path} needs beta_clip_jax.checkpoint.load_params_from_workdir"
        ) from e
    # It returns (params, model config, step); the step is of no use to an import.
    params, cfg, *_ = load_params_from_workdir(path, step=step)
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


@functools.lru_cache(maxsize=8)
def _pooler_init_fn(embed_dim: int, heads: int):
    """One compiled pooler init per shape, reused across loads."""
    import flax.linen as nn

    from beta_clip_jax.models.pooler import TextConditionedPooler

    dummy = jnp.zeros((1, 1, embed_dim), jnp.float32)
    pooler = TextConditionedPooler(num_heads=heads)
    return jax.jit(lambda r: nn.unbox(pooler.init(r, dummy, dummy)["params"]))


def _check_pooler(flat: dict, cfg) -> None:
    abstract = jax.eval_shape(_pooler_init_fn(cfg.embed_dim, cfg.pooler_heads), jax.random.key(0))
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
    pooler_flat = None
    if kind == "hf":
        state, config_json = read_hf_dir(path)
        ckpt_cfg = _cfg_dict(variant_from_hf_config(config_json))
        meta_path = os.path.join(path, META_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta_model = json.load(f).get("model") or {}
            ckpt_cfg.update({k: v for k, v in meta_model.items() if k in ALL_FIELDS})
        pooler_path = os.path.join(path, POOLER_FILE)
        if os.path.isfile(pooler_path):
            flat = read_safetensors(pooler_path)
            pooler_flat = {k.removeprefix("pooler/"): v for k, v in flat.items()}
    elif kind == "bclip":
        raw, _ = read_bclip_checkpoint(path)
        ckpt_cfg = _cfg_dict(variant_from_bclip_state_dict(raw, _given_heads(model_cfg)))
    else:
        raw = read_openai_state_dict(path)
        ckpt_cfg = _cfg_dict(variant_from_openai_state_dict(raw, _given_heads(model_cfg)))
        state = openai_to_hf_state_dict(raw)

    cfg = resolve_model_config(ckpt_cfg if model_cfg is None else model_cfg)
    # Head counts leave no trace in tensor shapes, so a wrong one would load silently. The
    # official pooler always has 8 heads, so a bclip file fixes pooler_heads too.
    fields = _HEADS + (("pooler_heads",) if kind == "bclip" else ())
    wrong = [
        f"{f}: checkpoint {ckpt_cfg[f]} vs model {cfg[f]}" for f in fields if cfg[f] != ckpt_cfg[f]
    ]
    if wrong:
        raise ValueError(f"{spec} has other attention heads than the model: " + "; ".join(wrong))
    if kind == "bclip":
        state, pooler = bclip_to_hf_state_dict(raw, cfg)
        pooler_flat = _flatten(pooler)
    state = adapt_text_positions(state, cfg.context_length, keep=STRETCH_KEEP)
    params = hf_state_dict_to_flax(state, cfg)

    not_provided = []
    if pooler_flat is not None:
        _check_pooler(pooler_flat, cfg)
        params["pooler"] = _unflatten(
            {k: np.asarray(v, np.float32) for k, v in pooler_flat.items()}
        )
    else:
        rng = jax.random.key(0) if rng is None else rng
        params["pooler"] = _init_pooler(cfg, rng)
        not_provided = sorted(f"pooler/{k}" for k in _flatten(params["pooler"]))
    return params, cfg, not_provided


def load_pretrained(spec: str, model_cfg=None, *, rng=None, step=None):
    """(params, model_cfg) for `config.init`; logs which parameters were freshly initialised."""
    params, cfg, not_provided = import_pretrained(spec, model_cfg, rng=rng, step=step)
    if not_provided:
        _log.info("%s does not provide %s; they keep their initialisation", spec, not_provided)
    return params, ml_collections.ConfigDict(cfg)
