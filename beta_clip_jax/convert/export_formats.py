"""The other layouts an export can take besides transformers' CLIPModel (docs/export.md):

- open_clip: `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}) and
  `open_clip_model.safetensors` (OpenAI / open_clip tensor names), which
  `open_clip.create_model_and_transforms("local-dir:OUT")` and `open_clip.get_tokenizer(...)`
  load; the text tower keeps the model's context (248 positions for beta-CLIP);
- a diffusers text encoder: `text_encoder/` (transformers CLIPTextModel, Stable Diffusion 1.x
  and SDXL's first encoder) or `text_encoder_2/` (CLIPTextModelWithProjection, SDXL's second)
  with its `tokenizer/` or `tokenizer_2/`, all at the model's context length.

Every tensor starts from the HF CLIPModel state_dict that convert/names.py's table writes, so the
layouts cannot disagree with the CLIPModel export. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from beta_clip_jax.convert.hf import hf_config_from_variant
from beta_clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD
from beta_clip_jax.tokenizer import Tokenizer

OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's own safetensors name: the first file it looks for in a local dir or Hub repo.
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_FILES = (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)
# Diffusers subfolders: (text encoder, tokenizer, transformers class) per SD slot.
TEXT_ENCODER_SLOTS = {
    "text_encoder": ("text_encoder", "tokenizer", "CLIPTextModel"),
    "sdxl_text_encoder_2": ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
}
TEXT_ENCODER_DIRS = tuple(d for slot in TEXT_ENCODER_SLOTS.values() for d in slot[:2])
_WEIGHTS = "model.safetensors"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # Hugging Face's names of the tanh GELU
_CONFIG = "config.json"

# HF CLIPModel name -> open_clip name, for tensors outside the layers.
_HF_TO_OPEN_CLIP = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
# Projections: a torch Linear weight (out, in) in HF, a plain (in, out) matrix in open_clip.
_HF_TO_OPEN_CLIP_TRANSPOSED = {
    "visual_projection.weight": "visual.proj",
    "text_projection.weight": "text_projection",
}
_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_QKV_KEY = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_TOWER_PREFIX = {"vision_model": "visual.transformer", "text_model": "transformer"}


def open_clip_state_dict(hf_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF CLIPModel tensors -> open_clip CLIP tensors (the OpenAI names; q, k and v fused into
    nn.MultiheadAttention's in_proj). A key of no known place is an error, never dropped."""
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    for key, value in hf_state.items():
        value = np.asarray(value, np.float32)
        if key in _HF_TO_OPEN_CLIP:
            out[_HF_TO_OPEN_CLIP[key]] = value
            continue
        if key in _HF_TO_OPEN_CLIP_TRANSPOSED:
            out[_HF_TO_OPEN_CLIP_TRANSPOSED[key]] = value.T
            continue
        layer = _LAYER_KEY.match(key)
        if layer is None:
            raise ValueError(f"HF tensor {key!r} has no place in the open_clip layout")
        tower, index, rest = layer.groups()
        prefix = f"{_TOWER_PREFIX[tower]}.resblocks.{index}"
        qkv = _QKV_KEY.match(rest)
        if qkv:
            fused.setdefault(f"{prefix}.attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = value
            continue
        for ours, theirs in _LAYER_RENAMES.items():
            if rest.startswith(ours + "."):
                out[f"{prefix}.{theirs}{rest[len(ours) :]}"] = value
                break
        else:
            raise ValueError(f"HF tensor {key!r} has no place in the open_clip layout")
    for name, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{name}: the HF state_dict holds only {sorted(parts)} of q, k, v")
        out[name] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}


def _mlp_ratio(width: int, mlp_dim: int) -> float:
    """open_clip's mlp_ratio for an MLP `mlp_dim` wide: it builds int(width * ratio) units, so
    the ratio is nudged up past any float rounding that would lose one (bigG: 8192 / 1664)."""
    ratio = mlp_dim / width
    while int(width * ratio) < mlp_dim:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _open_clip_tower(cfg, tower: str) -> dict:
    """Architecture options of one tower: MLP ratio, tanh GELU and LayerNorm eps when they are
    not open_clip's defaults (4, exact GELU / QuickGELU, 1e-5)."""
    width = int(cfg[f"{tower}_width"])
    mlp_dim = int(cfg.get(f"{tower}_mlp_dim") or 4 * width)
    extra = {} if mlp_dim == 4 * width else {"mlp_ratio": _mlp_ratio(width, mlp_dim)}
    if (cfg.get("activation") or "quick_gelu") in _TANH_GELUS:
        extra["act_kwargs"] = {"approximate": "tanh"}
    eps = float(cfg.get("layer_norm_eps") or 1e-5)
    if not math.isclose(eps, 1e-5):
        extra["norm_kwargs"] = {"eps": eps}
    return extra


def open_clip_model_cfg(cfg) -> dict:
    """open_clip's model_cfg for our resolved model config: a ViT CLIP with the model's
    activation (QuickGELU for OpenAI's), MLP widths and LayerNorm eps, the text tower at
    cfg.context_length positions, pooled at the EOT (argmax of the ids)."""
    activation = cfg.get("activation") or "quick_gelu"
    if activation not in ("quick_gelu", "gelu", *_TANH_GELUS):
        raise ValueError(f"model.activation={activation!r} has no open_clip form")
    return {
        "embed_dim": int(cfg.embed_dim),
        "quick_gelu": activation == "quick_gelu",
        "vision_cfg": {
            "image_size": int(cfg.image_size),
            "layers": int(cfg.vision_layers),
            "width": int(cfg.vision_width),
            "head_width": int(cfg.vision_width) // int(cfg.vision_heads),
            "patch_size": int(cfg.patch_size),
            **_open_clip_tower(cfg, "vision"),
        },
        "text_cfg": {
            "context_length": int(cfg.context_length),
            "vocab_size": int(cfg.vocab_size),
            "width": int(cfg.text_width),
            "heads": int(cfg.text_heads),
            "layers": int(cfg.text_layers),
            **_open_clip_tower(cfg, "text"),
        },
    }


def open_clip_preprocess_cfg(image_size: int) -> dict:
    """Evaluation preprocessing as api.Encoder does it: bicubic resize of the shortest side,
    centre crop, OpenAI mean/std."""
    return {
        "size": int(image_size),
        "mode": "RGB",
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def write_open_clip(out: str, hf_state: dict[str, np.ndarray], cfg) -> list[str]:
    """Writes the open_clip config and weights into `out`; returns the names written."""
    from safetensors.numpy import save_file

    config = {
        "model_cfg": open_clip_model_cfg(cfg),
        "preprocess_cfg": open_clip_preprocess_cfg(cfg.image_size),
    }
    _write_json(os.path.join(out, OPEN_CLIP_CONFIG), config)
    save_file(
        open_clip_state_dict(hf_state),
        os.path.join(out, OPEN_CLIP_WEIGHTS),
        metadata={"format": "pt"},
    )
    return list(OPEN_CLIP_FILES)


def text_encoder_config(cfg, with_projection: bool) -> dict:
    """config.json of a transformers CLIPTextModel (or ...WithProjection) for the text tower."""
    text = dict(hf_config_from_variant(cfg)["text_config"])
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", **text}


def text_encoder_state_dict(hf_state: dict[str, np.ndarray], with_projection: bool) -> dict:
    """The text tower's tensors under CLIPTextModel names (the CLIPModel names, text_model.*),
    plus text_projection.weight for CLIPTextModelWithProjection."""
    keep = {k: v for k, v in hf_state.items() if k.startswith("text_model.")}
    if with_projection:
        keep["text_projection.weight"] = hf_state["text_projection.weight"]
    return {k: np.array(v, np.float32, order="C") for k, v in keep.items()}


def write_text_encoder(out: str, hf_state: dict[str, np.ndarray], cfg, slot: str) -> list[str]:
    """Writes a diffusers text encoder + tokenizer pair for `slot` (a TEXT_ENCODER_SLOTS key)
    into `out`; returns the two subfolder names."""
    from safetensors.numpy import save_file

    encoder_dir, tokenizer_dir, arch = TEXT_ENCODER_SLOTS[slot]
    with_projection = arch == "CLIPTextModelWithProjection"
    encoder_path = os.path.join(out, encoder_dir)
    os.makedirs(encoder_path, exist_ok=True)
    _write_json(os.path.join(encoder_path, _CONFIG), text_encoder_config(cfg, with_projection))
    tensors = text_encoder_state_dict(hf_state, with_projection)
    save_file(tensors, os.path.join(encoder_path, _WEIGHTS), metadata={"format": "pt"})
    tokenizer_path = os.path.join(out, tokenizer_dir)
    Tokenizer().save_hf(tokenizer_path, model_max_length=int(cfg.context_length))
    if slot == "sdxl_text_encoder_2":
        # SDXL's second tokenizer pads with "!" (id 0), which is also what ours pads with.
        config_path = os.path.join(tokenizer_path, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as f:
            tokenizer_config = json.load(f)
        _write_json(config_path, {**tokenizer_config, "pad_token": "!"})
    return [encoder_dir, tokenizer_dir]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
