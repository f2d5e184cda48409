"""Hugging Face CLIP directories: read/write weights and translate `config.json` <-> our config.

Weights are read without running code from the files: safetensors first, then `pytorch_model.bin`
through `torch.load(weights_only=True)`. A file that is cut short, holds a tensor of a
non-float dtype (int, bool, float8) or a NaN / infinity is refused naming the file and tensor.
"""

import json
import math
import os
from typing import Any

import ml_collections
import numpy as np

from beta_clip_jax.convert.names import check_weights, is_buffer
from beta_clip_jax.convert.torch_pickle import torch_load_numpy
from beta_clip_jax.models.variants import match_variant, resolve_model_config

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


def read_hf_dir(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state_dict, config.json contents) of a HF CLIPModel directory."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path) or not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"expected a Hugging Face CLIP directory with {CONFIG_FILE} and {WEIGHTS_FILE} at "
            f"{path} (for example one written by CLIPModel.save_pretrained)"
        )
    with open(cfg_path) as f:
        config_json = json.load(f)
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
    return state, config_json


def write_hf_dir(path: str, state_dict: dict[str, np.ndarray], config_json: dict) -> None:
    """Writes config.json + model.safetensors (float32) that transformers.CLIPModel loads."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config_json, f, indent=2)
    # np.ascontiguousarray would turn 0-d tensors (logit_scale) into shape (1,).
    arrays = {k: np.array(v, np.float32, order="C") for k, v in state_dict.items()}
    save_file(arrays, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


def _check_supported(name: str, sub: dict) -> None:
    act, eps = sub["hidden_act"], sub["layer_norm_eps"]
    width, mlp = sub["hidden_size"], sub["intermediate_size"]
    problems = []
    if act != "quick_gelu":
        problems.append(f"hidden_act={act!r} (only quick_gelu)")
    if not math.isclose(eps, 1e-5):
        problems.append(f"layer_norm_eps={eps} (only 1e-5)")
    if mlp != 4 * width:
        problems.append(f"intermediate_size={mlp} (only 4 x hidden_size = {4 * width})")
    if problems:
        raise ValueError(f"unsupported {name} in HF config: " + "; ".join(problems))


def variant_from_hf_config(config_json: dict | str) -> ml_collections.ConfigDict:
    """Our resolved model config for a HF CLIPConfig (a dict or a path to config.json).

    The variant name is the matching table entry (so pooler_heads comes from there) or "custom"
    (pooler_heads 8 when the embedding width allows it).
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
    )
    name = match_variant(shapes)
    if name is None:
        e = shapes["embed_dim"]
        shapes["pooler_heads"] = 8 if e % 8 == 0 else 1
    return resolve_model_config({"variant": name or "custom", **shapes})


def hf_config_from_variant(cfg) -> dict[str, Any]:
    """A HF CLIPConfig dict (config.json) for our resolved model config."""

    def tower(width, layers, heads):
        return dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=cfg.embed_dim,
        )

    vision = tower(cfg.vision_width, cfg.vision_layers, cfg.vision_heads)
    vision.update(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3)
    text = tower(cfg.text_width, cfg.text_layers, cfg.text_heads)
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
    from beta_clip_jax.models.clip import OPENAI_MEAN, OPENAI_STD

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
