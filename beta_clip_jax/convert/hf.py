"""Hugging Face CLIP directories: read/write weights and translate `config.json` <-> our config.

Two layouts are read (`hf_layout`):
- "clip": one CLIPModel directory (`config.json` with model_type "clip" + weights);
- "pair": a directory holding `vision/` (a CLIPVisionModelWithProjection, model_type
  "clip_vision_model") and `text/` (a CLIPTextModelWithProjection, "clip_text_model", e.g.
  SDXL's text_encoder_2), each as save_pretrained writes it. The pair has no logit_scale.
Any member of the CLIP family loads: the activation (`hidden_act`: quick_gelu, gelu, gelu_new,
gelu_pytorch_tanh), the MLP width (`intermediate_size`), `layer_norm_eps`, widths, heads, layers,
patch and image size all come from the config; both towers must share one activation and eps.

A hub id (`org/name`) is looked up in the local Hugging Face cache only (`local_hf_dir`):
nothing is downloaded.

Weights are read without running code from the files: safetensors first, then `pytorch_model.bin`
through `torch.load(weights_only=True)`. A file that is cut short, holds a tensor of a
non-float dtype (int, bool, float8) or a NaN / infinity is refused naming the file and tensor.
"""

import json
import math
import os
import re
from typing import Any

import ml_collections
import numpy as np

from beta_clip_jax.convert.names import check_weights, is_buffer
from beta_clip_jax.convert.torch_pickle import torch_load_numpy
from beta_clip_jax.methods import resolve_model_config
from beta_clip_jax.models.variants import ACTIVATIONS, match_variant

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_TORCH_FILE = "pytorch_model.bin"

# transformers' CLIP defaults: older config.json files leave out fields equal to these.
_HF_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)  # fmt: skip
_HF_TEXT_DEFAULTS = dict(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)  # fmt: skip


# safetensors dtype names of the float types weights may have (names.FLOAT_DTYPES).
_SAFETENSORS_FLOATS = ("F16", "BF16", "F32", "F64")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy (bfloat16 widened to float32 by torch:
    numpy has none), after checking each dtype in the header and each value (check_weights)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            _check_dtypes(path, dtypes)  # before reading: numpy cannot even hold float8
            out = {k: f.get_tensor(k) for k, d in dtypes.items() if d != "BF16"}
        if "BF16" in dtypes.values():
            with safe_open(path, framework="pt") as f:
                out.update((k, f.get_tensor(k).float().numpy()) for k in dtypes if k not in out)
    except SafetensorError as e:
        raise ValueError(_safetensors_damage(path, e)) from None
    check_weights(path, out)
    return {k: out[k] for k in dtypes}


def _check_dtypes(path: str, dtypes: dict[str, str]) -> None:
    for key, dtype in dtypes.items():
        if dtype not in _SAFETENSORS_FLOATS and not is_buffer(key):
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {dtype}, but weights are floating point "
                f"({', '.join(_SAFETENSORS_FLOATS)}); not a weights file this model can load"
            )


def _safetensors_damage(path: str, error) -> str:
    """What is wrong with a file the safetensors library refused: a cut header, the tensors
    whose bytes lie past the end of a cut file, else the library's own words."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            return (
                f"{path}: a safetensors header cut short ({size} bytes in the file, the header "
                f"declares {length}): the file is truncated or not safetensors ({error})"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return f"{path}: unreadable safetensors header ({error})"
    data_size = size - 8 - length
    entries = header.items() if isinstance(header, dict) else ()
    cut = [k for k, v in entries if _data_end(v) > data_size]
    if cut:
        more = f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
        return (
            f"{path}: file cut short: tensor {cut[0]!r}{more} ends past its {size} bytes; "
            "the download or copy did not finish"
        )
    return f"{path}: not a valid safetensors file ({error})"


def _data_end(entry) -> int:
    """Where a header entry's bytes end (0 for the metadata or a malformed entry)."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    ok = isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[1], int)
    return offsets[1] if ok else 0


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Public reader used for our extra files (e.g. the exported pooler)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected a safetensors file at {path}")
    return _read_safetensors(path)


# A hub repository id: "org/name" (what huggingface_hub accepts, no path separators beyond one).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PAIR_TOWERS = {"vision": "clip_vision_model", "text": "clip_text_model"}


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once,
    at import): HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, else the library default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_hub_id(path: str) -> bool:
    """Whether `path` reads as a hub id ("org/name") and is not a file or directory here."""
    return bool(_HUB_ID.fullmatch(path)) and not os.path.exists(path)


def local_hf_dir(path: str, what: str = "hf") -> str:
    """`path` itself when it exists, else the cached snapshot of hub id `path` (refs/main of the
    local Hugging Face cache, huggingface_hub.snapshot_download with local_files_only=True).
    Raises FileNotFoundError naming the id and the cache when it is not there."""
    if not is_hub_id(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{what}:{path} is no directory here, and looking it up as a hub id in the local "
            "Hugging Face cache needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    cache = hub_cache_dir()
    try:
        return snapshot_download(path, local_files_only=True, cache_dir=cache)
    except Exception as e:  # LocalEntryNotFoundError, an invalid id, an unreadable cache
        raise FileNotFoundError(
            f"{what}:{path}: no such directory, and hub id {path!r} is not in the local Hugging "
            f"Face cache {cache} ({type(e).__name__}); nothing is downloaded here: fetch it "
            f"first (`hf download {path}`), point HF_HUB_CACHE at a cache that holds it, or "
            f"give the directory as {what}:DIR"
        ) from None


def hf_layout(path: str) -> str:
    """The directory's layout: "clip" (config.json here) or "pair" (vision/ and text/ tower
    directories); see the module docstring. Raises FileNotFoundError saying what was expected."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return "clip"
    if all(os.path.isfile(os.path.join(path, t, CONFIG_FILE)) for t in _PAIR_TOWERS):
        return "pair"
    raise FileNotFoundError(
        f"expected a Hugging Face CLIP directory with {CONFIG_FILE} and {WEIGHTS_FILE} at "
        f"{path} (for example one written by CLIPModel.save_pretrained), or one holding vision/ "
        "and text/ (CLIPVisionModelWithProjection and CLIPTextModelWithProjection directories)"
    )


def read_hf_dir(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state_dict, CLIPConfig dict) of a HF CLIP directory in either layout (hf_layout); a
    pair's towers are merged into one CLIPModel state_dict (without logit_scale) and config."""
    if hf_layout(path) == "pair":
        return _read_pair(path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config_json = json.load(f)
    kind = config_json.get("model_type", "clip")
    if kind != "clip":
        hint = ""
        if kind in _PAIR_TOWERS.values():
            sub = [t for t, k in _PAIR_TOWERS.items() if k == kind][0]
            hint = f"; a single tower loads as DIR/{sub} beside the other tower's directory"
        raise ValueError(
            f"{os.path.join(path, CONFIG_FILE)}: model_type {kind!r}, not a CLIPModel ('clip')"
            + hint
        )
    return _read_weights(path), config_json


def _read_pair(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    state, configs = {}, {}
    for tower, kind in _PAIR_TOWERS.items():
        sub = os.path.join(path, tower)
        with open(os.path.join(sub, CONFIG_FILE)) as f:
            configs[tower] = json.load(f)
        if configs[tower].get("model_type") != kind:
            raise ValueError(
                f"{os.path.join(sub, CONFIG_FILE)}: model_type "
                f"{configs[tower].get('model_type')!r}, expected {kind!r} in {tower}/"
            )
        state.update(_read_weights(sub))
    dims = {t: c.get("projection_dim", 512) for t, c in configs.items()}
    if dims["vision"] != dims["text"]:
        raise ValueError(
            f"{path}: the towers project to different widths (vision/ projection_dim "
            f"{dims['vision']}, text/ {dims['text']}); they are not one CLIP"
        )
    config_json = {
        "model_type": "clip",
        "projection_dim": dims["vision"],
        "vision_config": configs["vision"],
        "text_config": configs["text"],
    }
    return state, config_json


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """The tensors of one save_pretrained directory (single, sharded or torch weights)."""
    single = os.path.join(path, WEIGHTS_FILE)
    index = os.path.join(path, _INDEX_FILE)
    torch_bin = os.path.join(path, _TORCH_FILE)
    if os.path.isfile(single):
        state = _read_safetensors(single)
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise ValueError(f"{index}: shard {shard!r} is not a file name in {path}")
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{index} names shard {shard}, which is not in {path}")
            state.update(_read_safetensors(os.path.join(path, shard)))
    elif os.path.isfile(torch_bin):
        state = torch_load_numpy(torch_bin)
        if not isinstance(state, dict):
            raise ValueError(f"{torch_bin} holds a {type(state).__name__}, not a state_dict")
        check_weights(torch_bin, state)
    else:
        raise FileNotFoundError(
            f"no weights in {path}: expected {WEIGHTS_FILE}, {_INDEX_FILE} or {_TORCH_FILE}"
        )
    return state


def write_hf_dir(path: str, state_dict: dict[str, np.ndarray], config_json: dict) -> None:
    """Writes config.json + model.safetensors (float32) that transformers.CLIPModel loads."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config_json, f, indent=2)
    # np.ascontiguousarray would turn 0-d tensors (logit_scale) into shape (1,).
    arrays = {k: np.array(v, np.float32, order="C") for k, v in state_dict.items()}
    save_file(arrays, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_supported(name: str, sub: dict) -> None:
    """Refuses, naming each field, what our towers cannot compute."""
    act, eps = sub["hidden_act"], sub["layer_norm_eps"]
    problems = []
    if act not in ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (supported: {', '.join(ACTIVATIONS)})")
    if not isinstance(eps, int | float) or not 0 < eps < 1:
        problems.append(f"layer_norm_eps={eps!r} (a positive float)")
    for field in _INT_FIELDS:
        if not isinstance(sub[field], int) or sub[field] < 1:
            problems.append(f"{field}={sub[field]!r} (a positive integer)")
    if sub.get("num_channels", 3) != 3:
        problems.append(f"num_channels={sub['num_channels']} (RGB images: 3)")
    if problems:
        raise ValueError(f"unsupported {name} in HF config: " + "; ".join(problems))


def _shared(v: dict, t: dict, field: str):
    """The value both towers give `field`; our model has one activation and one eps."""
    if v[field] != t[field] and not (
        field == "layer_norm_eps" and math.isclose(v[field], t[field], rel_tol=1e-6)
    ):
        raise ValueError(
            f"unsupported HF config: vision_config.{field}={v[field]!r} but "
            f"text_config.{field}={t[field]!r}; both towers must share one {field}"
        )
    return v[field]


def variant_from_hf_config(config_json: dict | str) -> ml_collections.ConfigDict:
    """Our resolved model config for a HF CLIPConfig (a dict or a path to config.json).

    The variant name is the matching table entry (so pooler_heads comes from there) or "custom"
    (pooler_heads 8 when the embedding width allows it). Activation, MLP widths and LayerNorm
    eps come from the config (transformers' defaults where it leaves them out).
    """
    if isinstance(config_json, str):
        with open(config_json) as f:
            config_json = json.load(f)
    # Configs from 2021 may carry the towers only as "*_config_dict".
    v = config_json.get("vision_config") or config_json.get("vision_config_dict") or {}
    t = config_json.get("text_config") or config_json.get("text_config_dict") or {}
    v, t = {**_HF_VISION_DEFAULTS, **v}, {**_HF_TEXT_DEFAULTS, **t}
    _check_supported("vision_config", v)
    _check_supported("text_config", t)
    shapes = dict(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        vision_width=v["hidden_size"],
        vision_layers=v["num_hidden_layers"],
        vision_heads=v["num_attention_heads"],
        text_width=t["hidden_size"],
        text_layers=t["num_hidden_layers"],
        text_heads=t["num_attention_heads"],
        vocab_size=t["vocab_size"],
        context_length=t["max_position_embeddings"],
        embed_dim=config_json.get("projection_dim", 512),
        vision_mlp_dim=v["intermediate_size"],
        text_mlp_dim=t["intermediate_size"],
    )
    arch = {f: _shared(v, t, f) for f in ("hidden_act", "layer_norm_eps")}
    name = match_variant(shapes)
    if name is None:
        e = shapes["embed_dim"]
        shapes["pooler_heads"] = 8 if e % 8 == 0 else 1
    return resolve_model_config(
        {
            "variant": name or "custom",
            **shapes,
            "activation": arch["hidden_act"],
            "layer_norm_eps": float(arch["layer_norm_eps"]),
        }
    )


def hf_config_from_variant(cfg) -> dict[str, Any]:
    """A HF CLIPConfig dict (config.json) for our model config (resolved here)."""
    cfg = resolve_model_config(cfg)

    def tower(width, layers, heads, mlp_dim):
        return dict(
            hidden_size=width,
            intermediate_size=mlp_dim,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            hidden_act=cfg.activation,
            layer_norm_eps=cfg.layer_norm_eps,
            projection_dim=cfg.embed_dim,
        )

    vision = tower(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_dim)
    vision.update(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3)
    text = tower(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp_dim)
    text.update(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.context_length,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": vision,
        "text_config": text,
    }


def hf_preprocessor_config(image_size: int) -> dict[str, Any]:
    """preprocessor_config.json for CLIPImageProcessor: CLIP evaluation's bicubic resize of the
    shortest side, centre crop and OpenAI mean/std (what api.Encoder does)."""
    from beta_clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD

    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD),
    }
