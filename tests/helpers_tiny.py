"""Tiny random CLIP checkpoints for tests: HF `CLIPModel` directories and OpenAI-layout `.pt` files.

Also reference computations written with torch from the HF weights, independently of our
converters, so a test can compare our JAX outputs against them. Import from tests as
`from helpers_tiny import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import CLIPModel

SOT, EOT = 49406, 49407

# fmt: off
# Towers of width 64, 2 layers, 2 heads; 32px images in 8px patches; joint width 32.
TINY = dict(
    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8),
    text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77),
    projection_dim=32,
)
# ViT-B/16 widths, heads, patch and resolution, with fewer layers to stay fast.
B16 = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                num_attention_heads=12, image_size=224, patch_size=16),
    text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=77),
    projection_dim=512,
)
# fmt: on


def clip_config(layout: dict = TINY, **text_overrides):
    """A transformers CLIPConfig for one of the layouts above."""
    from transformers import CLIPConfig

    text = {**layout["text"], **text_overrides}
    return CLIPConfig(
        text_config=text,
        vision_config=layout["vision"],
        projection_dim=layout["projection_dim"],
    )


def make_hf_model(layout: dict = TINY, seed: int = 0, **text_overrides) -> CLIPModel:
    """A random CLIPModel in eval mode; every tensor gets noise so that zero biases and unit
    LayerNorm scales cannot hide a mapping error."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(layout, **text_overrides)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def save_hf_dir(model: CLIPModel, path: str) -> str:
    """save_pretrained into `path` (created) and return it."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def hf_to_openai_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The same weights under OpenAI CLIP's names and layouts (fused in_proj, (in, out) projs)."""
    sd = model.state_dict()
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": sd["logit_scale"],
        # Non-weight entries OpenAI checkpoints carry; readers must skip them.
        "input_resolution": torch.tensor(model.config.vision_config.image_size),
        "context_length": torch.tensor(model.config.text_config.max_position_embeddings),
        "vocab_size": torch.tensor(model.config.text_config.vocab_size),
    }
    for tower, ours in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        n = getattr(model.config, f"{tower.split('_')[0]}_config").num_hidden_layers
        for i in range(n):
            h, o = f"{tower}.encoder.layers.{i}", f"{ours}.resblocks.{i}"
            for part in ("weight", "bias"):
                qkv = [sd[f"{h}.self_attn.{x}_proj.{part}"] for x in "qkv"]
                out[f"{o}.attn.in_proj_{part}"] = torch.cat(qkv, 0)
                out[f"{o}.attn.out_proj.{part}"] = sd[f"{h}.self_attn.out_proj.{part}"]
                out[f"{o}.ln_1.{part}"] = sd[f"{h}.layer_norm1.{part}"]
                out[f"{o}.ln_2.{part}"] = sd[f"{h}.layer_norm2.{part}"]
                out[f"{o}.mlp.c_fc.{part}"] = sd[f"{h}.mlp.fc1.{part}"]
                out[f"{o}.mlp.c_proj.{part}"] = sd[f"{h}.mlp.fc2.{part}"]
    return {k: v.clone() for k, v in out.items()}


def save_openai_pt(model: CLIPModel, path: str, half: bool = False) -> str:
    """torch.save of the OpenAI-named state dict (fp16 like OpenAI's releases when half=True)."""
    sd = hf_to_openai_state_dict(model)
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(sd, path)
    return path


class _Holder(torch.nn.Module):
    """A module tree that only holds tensors under given dotted names (for TorchScript files)."""

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_openai_torchscript(model: CLIPModel, path: str) -> str:
    """A TorchScript archive with OpenAI names, like OpenAI's released ViT-B-16.pt (fp16)."""
    root = _Holder()
    for name, value in hf_to_openai_state_dict(model).items():
        *parents, leaf = name.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, _Holder())
            node = getattr(node, p)
        value = value.half() if value.is_floating_point() else value
        node.register_buffer(leaf, value)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        torch.jit.script(root).save(path)
    return path


def random_tokens(n: int, length: int, seed: int = 0, vocab: int = 49408) -> np.ndarray:
    """int32 [n, length]: SOT, random BPE ids, EOT, zero padding, with varied text lengths."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, length), np.int32)
    for i in range(n):
        k = int(rng.integers(1, length - 1))  # content tokens
        out[i, 0] = SOT
        out[i, 1 : 1 + k] = rng.integers(1, vocab - 2, size=k)
        out[i, 1 + k] = EOT
    return out


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """float32 [n, size, size, 3], roughly like OpenAI-normalised pixels."""
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@torch.no_grad()
def hf_image_features(model: CLIPModel, images: np.ndarray) -> np.ndarray:
    """Projected CLS embeddings [n, E] from transformers (images NHWC, already normalised)."""
    out = model.get_image_features(pixel_values=_nchw(images))
    return getattr(out, "pooler_output", out).numpy()


@torch.no_grad()
def hf_text_features(model: CLIPModel, tokens: np.ndarray) -> np.ndarray:
    """Projected text embeddings [n, E] from transformers."""
    out = model.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)))
    return getattr(out, "pooler_output", out).numpy()


@torch.no_grad()
def value_only_patch_tokens(model: CLIPModel, images: np.ndarray) -> np.ndarray:
    """beta-CLIP patch tokens [n, P, E] computed in torch from HF weights: the last layer's
    attention replaced by a_p = W_o (W_v LN1(x_p) + b_v) + b_o, then MLP, ln_post, projection."""
    vm = model.vision_model
    hidden = vm(pixel_values=_nchw(images), output_hidden_states=True).hidden_states
    x = hidden[-2]  # input of the last layer
    layer = vm.encoder.layers[-1]
    x = x + layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(x)))
    x = x + layer.mlp(layer.layer_norm2(x))
    return model.visual_projection(vm.post_layernorm(x))[:, 1:].numpy()


def fast_jit(fn, **kwargs):
    """jax.jit with XLA's backend optimisations off: tests compile 2-3x faster, same numbers
    up to float rounding."""
    import jax

    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def random_params(model, seed: int = 0, std: float = 0.05) -> dict:
    """Random float32 numpy params for a BetaCLIP without compiling its init (shapes only);
    LayerNorm-like leaves named "scale" centre on 1."""
    import jax

    from beta_clip_jax.models.clip import param_shapes

    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = std * rng.standard_normal(s.shape).astype(np.float32)
        return x + 1.0 if getattr(path[-1], "key", None) == "scale" else x

    return jax.tree_util.tree_map_with_path(draw, param_shapes(model))
