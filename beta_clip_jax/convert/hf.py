"""Hugging Face CLIP directories: read/write weights and translate `config.json` <-> our config.

Weights are read without running code from the files: safetensors first, then `pytorch_model.bin`
through `torch.load(weights_only=True)`.
"""

import json
import math
import os
from typing import Any

import ml_collections
import numpy as np

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


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 numpy (bf16/fp16 go through torch)."""
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (TypeError, ValueError):
        # numpy has no bfloat16; torch reads every dtype safetensors can hold.
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float().numpy()
    return out


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
            state.update(_read_safetensors(os.path.join(path, shard)))
    elif os.path.isfile(torch_bin):
        import torch

        sd = torch.load(torch_bin, map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() for k, v in sd.items()}
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
