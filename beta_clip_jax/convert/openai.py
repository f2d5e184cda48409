"""OpenAI CLIP and Long-CLIP `.pt` checkpoints: read them without running code, rename keys to the
HF layout.

File kinds, all read by `torch_pickle.read_torch_file` (nothing from the file is executed):
- OpenAI's released TorchScript archives (ViT-B-16.pt, ...): `torch.load` would hand them to
  `torch.jit.load`, which runs the archive's code; we read the module tree's tensors instead;
- a plain state_dict saved with torch.save (zip format; the legacy format through
  `torch.load(weights_only=True)`);
- Long-CLIP's longclip-B.pt / longclip-L.pt: a plain state_dict with 248-row `positional_embedding`
  (frozen; rows 0-19 used) and `positional_embedding_res` (trained; rows 20+ used), merged into the
  one table the model holds.

Then the OpenAI names are rewritten to HF CLIPModel names, so the one table in names.py does the
rest. Attention heads are not stored in OpenAI checkpoints; OpenAI models use 64-wide heads. MLP
widths are read off the tensors.

The MLP activation is not stored either, and open_clip's LAION models (GELU) are saved under the
same names and shapes as OpenAI's (QuickGELU), so `openai_activation` only says QuickGELU where the
file shows it:
- a TorchScript archive: OpenAI released its models in this form (open_clip saves plain state
  dicts); its module classes are checked too, and one of another activation (torch.nn.GELU, as a
  scripted open_clip model holds) makes it unknown;
- a Long-CLIP file (`positional_embedding_res`): Long-CLIP fine-tunes OpenAI's models.
A plain state dict tells nothing, whatever its file name (a re-saved LAION ViT-B-16 is as likely
as OpenAI's): it needs `openclip:` or a model config that states `activation`.
"""

import os
import re
import zipfile

import numpy as np

from beta_clip_jax.convert.names import check_weights
from beta_clip_jax.convert.positions import RES_POSITIONS_KEY, effective_text_positions
from beta_clip_jax.convert.torch_pickle import TorchZip, module_classes, read_torch_file
from beta_clip_jax.methods import resolve_model_config
from beta_clip_jax.models.variants import match_variant

OPENAI_ACTIVATION = "quick_gelu"
# Module class names of an activation other than QuickGELU (torch.nn.GELU, ReLU, SiLU, ...).
_OTHER_ACTIVATION = re.compile(r"gelu|relu|silu|swish|mish|tanh|sigmoid", re.IGNORECASE)

# Attributes of the OpenAI module that are not weights.
_NON_WEIGHTS = re.compile(r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask)$")


def read_openai_state_dict(path: str) -> dict[str, np.ndarray]:
    """OpenAI-named tensors of a `.pt` file (TorchScript archive or plain state_dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"expected an OpenAI CLIP checkpoint (.pt, e.g. ViT-B-16.pt) at {path}"
        )
    sd = read_torch_file(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state_dict")
    sd = {k.removeprefix("module."): np.asarray(v) for k, v in sd.items()}
    # attn_mask holds -inf by design; the others are integer attributes, not weights.
    check_weights(path, sd, skip=_NON_WEIGHTS.search)
    return sd


_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def openai_to_hf_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI CLIP names -> HF CLIPModel names (float32). Unknown keys pass through unchanged,
    so the shape check reports them by their own name."""
    if "positional_embedding" in sd and RES_POSITIONS_KEY in sd:
        # Long-CLIP: the model adds both tables row-masked, so it uses one effective table.
        sd = dict(sd)
        frozen, res = sd.pop("positional_embedding"), sd.pop(RES_POSITIONS_KEY)
        sd["positional_embedding"] = effective_text_positions(frozen, res)
    out = {}
    for key, value in sd.items():
        if _NON_WEIGHTS.search(key):
            continue
        value = np.asarray(value, dtype=np.float32)
        m = _BLOCK_KEY.match(key)
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key == "visual.proj":  # stored (in, out): a torch Linear weight is its transpose
            out["visual_projection.weight"] = value.T
        elif key == "text_projection":
            out["text_projection.weight"] = value.T
        elif m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}"
            rest = m.group(3)
            if rest.startswith("attn.in_proj_"):  # fused [3D, ...] -> q, k, v
                kind = rest.removeprefix("attn.in_proj_")
                for name, part in zip(
                    ("q_proj", "k_proj", "v_proj"), np.split(value, 3), strict=True
                ):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = part
                continue
            for ours, theirs in _BLOCK_RENAMES.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours) :]
                    break
            out[f"{prefix}.{rest}"] = value
        else:
            out[key] = value
    return out


def openai_activation(path: str, sd: dict) -> tuple[str | None, str]:
    """(activation, why): QuickGELU where the file shows OpenAI's architecture (see the module
    docstring), else (None, why it cannot be told)."""
    if RES_POSITIONS_KEY in sd:
        return OPENAI_ACTIVATION, "a Long-CLIP checkpoint"
    if not zipfile.is_zipfile(path):
        return None, "a plain (legacy) state dict"
    with TorchZip(path) as z:
        if not z.torchscript:
            return None, "a plain state dict"
        classes = module_classes(z.root())
    names = sorted({c.rsplit(".", 1)[-1] for c in classes})
    other = [n for n in names if n != "QuickGELU" and _OTHER_ACTIVATION.search(n)]
    if other:
        found = ", ".join(other)
        return None, f"a TorchScript archive with {found} modules, not OpenAI's QuickGELU"
    return OPENAI_ACTIVATION, "a TorchScript archive (OpenAI's release format)"


def variant_from_openai_state_dict(sd: dict[str, np.ndarray], heads=None, activation=None):
    """Our resolved model config from OpenAI tensor shapes (OpenAI-named keys).

    `heads` = (vision_heads, text_heads) to use when known; otherwise width // 64. `activation`
    (None: unset, QuickGELU) is the MLP's, which the tensors do not tell.
    """
    try:
        conv = sd["visual.conv1.weight"].shape
        vpos = sd["visual.positional_embedding"].shape
        text_w = sd["ln_final.weight"].shape[0]
        vision_w = conv[0]
        shapes = dict(
            patch_size=conv[-1],
            image_size=conv[-1] * round((vpos[0] - 1) ** 0.5),
            vision_width=vision_w,
            vision_layers=_count_layers(sd, "visual.transformer.resblocks."),
            text_width=text_w,
            text_layers=_count_layers(sd, "transformer.resblocks."),
            vocab_size=sd["token_embedding.weight"].shape[0],
            context_length=sd["positional_embedding"].shape[0],
            embed_dim=sd["text_projection"].shape[1],
            vision_mlp_dim=_mlp_dim(sd, "visual.transformer.resblocks.0."),
            text_mlp_dim=_mlp_dim(sd, "transformer.resblocks.0."),
        )
    except KeyError as e:
        raise ValueError(f"not an OpenAI CLIP state_dict: tensor {e} is missing") from None
    vh, th = heads if heads else (max(vision_w // 64, 1), max(text_w // 64, 1))
    shapes.update(vision_heads=vh, text_heads=th)
    name = match_variant(shapes)
    if name is None:
        shapes["pooler_heads"] = 8 if shapes["embed_dim"] % 8 == 0 else 1
    return resolve_model_config(
        {"variant": name or "custom", **shapes, "activation": activation or ""}
    )


def _mlp_dim(sd, block_prefix: str) -> int | None:
    """The MLP width of the first block (c_fc is [mlp, width]); None for a tower with no block."""
    weight = sd.get(block_prefix + "mlp.c_fc.weight")
    return None if weight is None else int(np.shape(weight)[0])


def _count_layers(sd, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0
