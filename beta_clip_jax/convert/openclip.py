"""open_clip checkpoints (`openclip:PATH` / `openclip:PATH@MODEL`): weights plus the model config.

open_clip's CLIP models keep OpenAI's tensor names and layout, but not always its architecture:
LAION's models use GELU (open_clip's default) unless the config sets `quick_gelu`, and its larger
towers use other MLP widths (`mlp_ratio`) and head widths (`head_width`). Those facts live in the
model config, never in the weights, so a checkpoint is read together with one:

- `open_clip_config.json` beside the weights (what open_clip's hub uploads hold: {"model_cfg":
  ..., "preprocess_cfg": ...}; a bare model config, as in open_clip's model_configs/, also does);
- or `@MODEL`, one of MODEL_CONFIGS below (open_clip's configs of those names, as facts).

PATH is a weights file (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`, a training
checkpoint `epoch_N.pt` holding {"state_dict": ...}), a directory holding one of WEIGHT_FILES, or a
hub id ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k") in the local Hugging Face cache. Torch files
are read as in openai.py (no code from the file runs). A CustomTextCLIP's "text." names are
mapped to CLIP's. Config options our towers cannot compute (layer scale, attentional pooling, a
timm or HF tower, another tokenizer, ...) are refused by name.
"""

import json
import os
from typing import Any

import ml_collections
import numpy as np

from beta_clip_jax.convert.hf import is_hub_id, local_hf_dir, read_safetensors
from beta_clip_jax.convert.openai import read_openai_state_dict
from beta_clip_jax.methods import resolve_model_config
from beta_clip_jax.models.variants import match_variant

OPENCLIP_CONFIG = "open_clip_config.json"
# Weight files of an open_clip directory, in open_clip's order of preference.
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def _vit(image, patch, width, layers, text_width, text_heads, text_layers, embed, **extra):
    vision = {"image_size": image, "layers": layers, "width": width, "patch_size": patch}
    vision.update(extra)
    text = {"context_length": 77, "vocab_size": 49408, "width": text_width}
    text.update(heads=text_heads, layers=text_layers)
    return {"embed_dim": embed, "vision_cfg": vision, "text_cfg": text}


# open_clip's model configs (model_configs/*.json) of the common ViT CLIPs; "-quickgelu" adds
# "quick_gelu": true (the OpenAI-trained and DFN / MetaCLIP checkpoints), the others are GELU.
_BASE_CONFIGS = {
    "ViT-B-32": _vit(224, 32, 768, 12, 512, 8, 12, 512),
    "ViT-B-16": _vit(224, 16, 768, 12, 512, 8, 12, 512),
    "ViT-L-14": _vit(224, 14, 1024, 24, 768, 12, 12, 768),
    "ViT-L-14-336": _vit(336, 14, 1024, 24, 768, 12, 12, 768),
    "ViT-H-14": _vit(224, 14, 1280, 32, 1024, 16, 24, 1024, head_width=80),
    "ViT-g-14": _vit(224, 14, 1408, 40, 1024, 16, 24, 1024, head_width=88, mlp_ratio=4.3637),
    "ViT-bigG-14": _vit(224, 14, 1664, 48, 1280, 20, 32, 1280, head_width=104, mlp_ratio=4.9231),
}
_QUICKGELU = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14")
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    **_BASE_CONFIGS,
    **{f"{n}-quickgelu": {**_BASE_CONFIGS[n], "quick_gelu": True} for n in _QUICKGELU},
}

# Config keys read here (shapes, activation, eps) or that change nothing our towers compute at
# inference (training-only options, dtypes, values the weights hold).
_KNOWN_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "cast_dtype",
              "init_logit_scale", "nonscalar_logit_scale"}  # fmt: skip
_KNOWN_VISION = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size",
                 "act_kwargs", "norm_kwargs", "patch_dropout", "output_tokens",
                 # only used by an attentional pooler or a timm tower, refused below
                 "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool",
                 "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}  # fmt: skip
_KNOWN_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
               "act_kwargs", "norm_kwargs", "output_tokens",
               # only used by embed_cls or "eos" pooling, refused below
               "pad_id", "eos_id"}  # fmt: skip
# Options our towers compute only at these (open_clip's default) values.
_TOP_DEFAULTS = {"init_logit_bias": None}  # sigmoid-loss models
_VISION_DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}  # fmt: skip
_TEXT_DEFAULTS = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
    "proj_type": "linear", "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    # another text tower or tokenizer than OpenAI's BPE, which ours is
    "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None,
    "tokenizer_kwargs": None,
}  # fmt: skip


def split_model_name(path: str) -> tuple[str, str | None]:
    """`PATH@MODEL` -> (PATH, MODEL); a PATH that exists as given keeps any "@" in it."""
    head, sep, tail = path.rpartition("@")
    if not sep or os.path.exists(path) or "/" in tail:
        return path, None
    return head, tail


def read_openclip(spec_path: str) -> tuple[dict[str, np.ndarray], dict, str]:
    """(OpenAI-named tensors, open_clip model config, weights file) for `openclip:` PATH[@MODEL]."""
    path, model_name = split_model_name(spec_path)
    weights = _weights_file(path)
    if model_name is not None:
        if model_name not in MODEL_CONFIGS:
            raise ValueError(
                f"openclip:{spec_path}: unknown open_clip model {model_name!r}; known: "
                f"{', '.join(MODEL_CONFIGS)} (for another, put its {OPENCLIP_CONFIG} beside the "
                "weights)"
            )
        model_cfg = MODEL_CONFIGS[model_name]
    else:
        model_cfg = _config_beside(weights, spec_path)
    if weights.endswith(".safetensors"):
        state = read_safetensors(weights)
    else:
        state = read_openai_state_dict(weights)
    return _clip_names(state), model_cfg, weights


def _weights_file(path: str) -> str:
    """The weights file PATH names: itself, or the preferred one in a directory / hub snapshot."""
    if is_hub_id(path):
        path = local_hf_dir(path, "openclip")
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"no open_clip weights in {path}: expected one of {WEIGHT_FILES}")
    raise FileNotFoundError(
        f"expected an open_clip checkpoint at {path}: a weights file ({', '.join(WEIGHT_FILES)}, "
        "or a training checkpoint .pt), a directory holding one, or a hub id in the local cache"
    )


def _config_beside(weights: str, spec_path: str) -> dict:
    config_path = os.path.join(os.path.dirname(weights), OPENCLIP_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"openclip:{spec_path}: no {OPENCLIP_CONFIG} beside {weights}, and no model named: the "
            "activation and MLP widths are in the model config, not the weights. Name it as "
            f"openclip:{spec_path}@MODEL (known: {', '.join(MODEL_CONFIGS)}) or put the "
            f"checkpoint's {OPENCLIP_CONFIG} beside it"
        )
    with open(config_path) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not {"vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ValueError(
            f"{config_path}: no open_clip model config in it (expected a 'model_cfg' entry "
            "with 'embed_dim', 'vision_cfg' and 'text_cfg')"
        )
    return model_cfg


def _clip_names(state: dict) -> dict:
    """A CustomTextCLIP keeps its text tower under "text."; CLIP's names drop the prefix. A
    one-element logit_scale (nonscalar_logit_scale) becomes a scalar."""
    out = {k.removeprefix("text."): v for k, v in state.items()}
    if "logit_scale" in out and np.size(out["logit_scale"]) == 1:
        out["logit_scale"] = np.reshape(out["logit_scale"], ())
    return out


def _unsupported(where: str, cfg: dict, known: set, defaults: dict) -> list[str]:
    """Each option of `cfg` our towers cannot compute (unknown, or not at its default), as
    "where.key=value"."""
    bad = [f"{where}{k}={cfg[k]!r}" for k in sorted(set(cfg) - known - set(defaults))]
    bad += [f"{where}{k}={cfg[k]!r}" for k, d in defaults.items() if k in cfg and cfg[k] != d]
    return bad


def _activation(model_cfg: dict, what: str) -> str:
    """Our activation name for open_clip's act_layer: QuickGELU with `quick_gelu`, else
    torch.nn.GELU (exact; approximate="tanh" through act_kwargs is gelu_pytorch_tanh)."""
    kwargs = [c.get("act_kwargs") for c in (model_cfg["vision_cfg"], model_cfg["text_cfg"])]
    if model_cfg.get("quick_gelu"):
        if any(kwargs):
            raise ValueError(f"{what}: act_kwargs {kwargs} with quick_gelu (QuickGELU takes none)")
        return "quick_gelu"
    approx = {(k or {}).get("approximate", "none") for k in kwargs}
    extra = [k for k in kwargs if k and set(k) != {"approximate"}]
    if extra or len(approx) > 1 or not approx <= {"none", "tanh"}:
        raise ValueError(f"{what}: unsupported GELU act_kwargs {kwargs}")
    return "gelu_pytorch_tanh" if approx == {"tanh"} else "gelu"


def _layer_norm_eps(model_cfg: dict, what: str) -> float:
    eps = {
        float((c.get("norm_kwargs") or {}).get("eps", 1e-5))
        for c in (model_cfg["vision_cfg"], model_cfg["text_cfg"])
    }
    kwargs = [c.get("norm_kwargs") for c in (model_cfg["vision_cfg"], model_cfg["text_cfg"])]
    if len(eps) > 1 or any(k and set(k) != {"eps"} for k in kwargs):
        raise ValueError(f"{what}: norm_kwargs {kwargs} (one eps shared by both towers only)")
    return eps.pop()


def variant_from_openclip_config(model_cfg: dict, what: str) -> ml_collections.ConfigDict:
    """Our resolved model config for an open_clip model config (`what` names it in errors)."""
    v, t = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    bad = _unsupported("", model_cfg, _KNOWN_TOP, _TOP_DEFAULTS)
    bad += _unsupported("vision_cfg.", v, _KNOWN_VISION, _VISION_DEFAULTS)
    bad += _unsupported("text_cfg.", t, _KNOWN_TEXT, _TEXT_DEFAULTS)
    if bad:
        raise ValueError(f"{what}: open_clip options this model cannot compute: {'; '.join(bad)}")
    try:
        shapes = _shapes(model_cfg, v, t)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(
            f"{what}: not an open_clip ViT CLIP config ({type(e).__name__}: {e})"
        ) from None
    name = match_variant(shapes)
    if name is None:
        shapes["pooler_heads"] = 8 if shapes["embed_dim"] % 8 == 0 else 1
    return resolve_model_config(
        {
            "variant": name or "custom",
            **shapes,
            "activation": _activation(model_cfg, what),
            "layer_norm_eps": _layer_norm_eps(model_cfg, what),
        }
    )


def _shapes(model_cfg: dict, v: dict, t: dict) -> dict:
    """Shape fields from open_clip's config, with open_clip's defaults for what it leaves out."""
    image = v.get("image_size", 224)
    if isinstance(image, list | tuple):
        if len(set(image)) != 1:
            raise ValueError(f"image_size {image} is not square")
        image = image[0]
    layers, width = v.get("layers", 12), v.get("width", 768)
    if not isinstance(layers, int):
        raise ValueError(f"vision layers {layers!r}: a ResNet tower, not a ViT")
    head_width = v.get("head_width", 64)
    if width % head_width:
        raise ValueError(f"vision width {width} is not a multiple of head_width {head_width}")
    text_width = t.get("width", 512)
    return dict(
        image_size=int(image),
        patch_size=int(v.get("patch_size", 16)),
        vision_width=int(width),
        vision_layers=layers,
        vision_heads=width // head_width,
        # open_clip's ResidualAttentionBlock: mlp_width = int(d_model * mlp_ratio).
        vision_mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
        text_width=int(text_width),
        text_layers=int(t.get("layers", 12)),
        text_heads=int(t.get("heads", 8)),
        text_mlp_dim=int(text_width * t.get("mlp_ratio", 4.0)),
        vocab_size=int(t.get("vocab_size", 49408)),
        context_length=int(t.get("context_length", 77)),
        embed_dim=int(model_cfg["embed_dim"]),
    )
