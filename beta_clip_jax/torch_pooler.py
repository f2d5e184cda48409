"""PyTorch side of an export: beta-CLIP's dense patch path and text-conditioned pooler on top of a
`transformers.CLIPModel` (docs/export.md, docs/methods.md).

CLIPModel already gives the standard image embedding (CLS) and text embedding. What it lacks:

- dense patch features: the last vision layer with CLS in full attention but patch rows on the
  value-only path a_p = W_o (W_v U_p + b_v) + b_o, then its MLP residual; post_layernorm and
  visual_projection on every token;
- text-conditioned pooling: the L2-normalised text embedding queries the L2-normalised patch
  features of its own image through nn.MultiheadAttention, then o + fc2(QuickGELU(fc1(LN(o)))).

Usage:

    clip, pooler = from_pretrained(OUT)
    dense = pooler.dense_features(pixel_values)            # [B, h, w, E]
    pooled = pooler.pooled_embeddings(pixel_values, ids)   # [B, E] (ids [B, L]) or [B, K, E]

This file stands alone: it imports torch, numpy, safetensors and transformers only, never JAX or
the rest of beta_clip_jax, so every export carries a copy of it as `beta_clip_pooler.py` and runs
where only PyTorch is installed. The pooler file keeps our Flax names and layout
("pooler/query/kernel" [E, H, Dh], ...); `pooler_state_dict` maps them to this module's
state_dict with the transforms of POOLER_TABLE in beta_clip_jax/convert/names.py (a test holds
the two equal, since this file cannot import that table).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POOLER_FILE = "beta_clip_pooler.safetensors"  # beta_clip_jax.convert.POOLER_FILE
LN_EPS = 1e-5
_QKV = ("query", "key", "value")  # fused, in this order, into nn.MultiheadAttention's in_proj
# Flax names (after "pooler/") copied as they are, and torch Linear kernels stored transposed.
_COPIED = {
    "out/bias": "attn.out_proj.bias",
    "ln/scale": "ln.weight",
    "ln/bias": "ln.bias",
    "fc1/bias": "fc1.bias",
    "fc2/bias": "fc2.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"fc1/kernel": "fc1.weight", "fc2/kernel": "fc2.weight"}
_FLAX_NAMES = frozenset(
    [f"{n}/{p}" for n in _QKV for p in ("kernel", "bias")] + ["out/kernel", *_COPIED, *_TRANSPOSED]
)


def pooler_state_dict(flat: Mapping, path: str = POOLER_FILE) -> dict[str, np.ndarray]:
    """Pooler file tensors ("pooler/query/kernel", ..., Flax layout) -> BetaCLIPPooler
    state_dict (float32 numpy); a missing or unknown tensor is an error naming `path`."""
    t = {k.removeprefix("pooler/"): np.asarray(v, np.float32) for k, v in flat.items()}
    missing, unknown = sorted(_FLAX_NAMES - set(t)), sorted(set(t) - _FLAX_NAMES)
    if missing or unknown:
        raise ValueError(
            f"{path} is not a beta-CLIP pooler file: missing tensors {missing}, "
            f"unknown tensors {unknown} (names are 'pooler/' + {sorted(_FLAX_NAMES)})"
        )
    embed = t["query/kernel"].shape[0]
    # q/k/v DenseGeneral [E, H, Dh] -> Linear [H*Dh, E]; out [H, Dh, E] -> Linear [E, H*Dh].
    state = {
        "attn.in_proj_weight": np.concatenate(
            [t[f"{n}/kernel"].reshape(embed, -1).T for n in _QKV]
        ),
        "attn.in_proj_bias": np.concatenate([t[f"{n}/bias"].reshape(-1) for n in _QKV]),
        "attn.out_proj.weight": t["out/kernel"].reshape(-1, t["out/kernel"].shape[-1]).T,
    }
    state.update((theirs, t[ours]) for ours, theirs in _COPIED.items())
    state.update((theirs, t[ours].T) for ours, theirs in _TRANSPOSED.items())
    return {k: np.ascontiguousarray(v) if v.ndim else v for k, v in state.items()}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor or, in newer transformers, an output with pooler_output."""
    return getattr(out, "pooler_output", out)


class BetaCLIPPooler(nn.Module):
    """The text-conditioned pooler; with a CLIPModel attached, also the dense and pooled paths.

    The CLIPModel is held outside this module's parameters (state_dict holds the pooler only), so
    move it with `clip.to(...)` as well as this module.
    """

    def __init__(self, embed_dim: int, num_heads: int = 8, mlp_ratio: int = 4, clip_model=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.fc1 = nn.Linear(embed_dim, mlp_ratio * embed_dim)
        self.fc2 = nn.Linear(mlp_ratio * embed_dim, embed_dim)
        # log of the beta-CAL scale (trained; kept for completeness, unused by inference).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))
        object.__setattr__(self, "clip_model", clip_model)  # not a registered submodule

    @classmethod
    def from_file(cls, path: str, clip_model=None) -> BetaCLIPPooler:
        """A pooler with the weights of an exported `beta_clip_pooler.safetensors`."""
        from safetensors.numpy import load_file

        flat = load_file(path)
        state = {k: torch.from_numpy(v) for k, v in pooler_state_dict(flat, path).items()}
        embed_dim = state["attn.out_proj.weight"].shape[0]
        mlp = state["fc1.weight"].shape[0] // embed_dim
        heads = flat["pooler/query/kernel"].shape[1]  # Flax layout [E, H, Dh]
        pooler = cls(embed_dim, heads, mlp, clip_model=clip_model)
        pooler.load_state_dict(state, strict=True)
        return pooler.eval()

    def forward(self, text_emb: torch.Tensor, patches: torch.Tensor):
        """(text [B, K, E], patches [B, P, E]) -> (pooled [B, K, E], attention [B, H, K, P]).

        Both inputs are L2-normalised here; each image's texts attend to its own patches only.
        """
        q = F.normalize(text_emb, dim=-1)
        kv = F.normalize(patches, dim=-1)
        o, attn = self.attn(q, kv, kv, need_weights=True, average_attn_weights=False)
        # LayerNorm in float32 whatever the module dtype, as in training.
        y = F.layer_norm(
            o.float(), o.shape[-1:], self.ln.weight.float(), self.ln.bias.float(), LN_EPS
        )
        return o + self.fc2(_quick_gelu(self.fc1(y.to(o.dtype)))), attn

    def _clip(self):
        if self.clip_model is None:
            raise ValueError("attach a CLIPModel first: BetaCLIPPooler(..., clip_model=clip)")
        return self.clip_model

    def encode_image(self, pixel_values: torch.Tensor):
        """pixel_values [B, 3, H, W] (CLIPProcessor output) -> (cls [B, E], patches [B, P, E]),
        projected, not normalised; cls equals CLIPModel.get_image_features."""
        clip = self._clip()
        vm = clip.vision_model
        out = vm(pixel_values=pixel_values, output_hidden_states=True)
        x = out.hidden_states[-2]  # the last layer's input
        layer = vm.encoder.layers[-1]
        attn = layer.self_attn
        # Value-only path: each patch attends to itself, so softmax weights drop out.
        x = x + attn.out_proj(attn.v_proj(layer.layer_norm1(x)))
        x = x + layer.mlp(layer.layer_norm2(x))
        # CLS keeps full attention: the standard last layer's output row 0.
        tokens = torch.cat([out.last_hidden_state[:, :1], x[:, 1:]], dim=1)
        emb = clip.visual_projection(vm.post_layernorm(tokens))
        return emb[:, 0], emb[:, 1:]

    def dense_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, h, w, E] projected patch features (not normalised)."""
        _, patches = self.encode_image(pixel_values)
        side = math.isqrt(patches.shape[1])
        return patches.reshape(patches.shape[0], side, side, patches.shape[-1])

    def encode_text(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """input_ids [..., L] -> [..., E], CLIPModel's projected text embedding at the first EOT."""
        lead, length = input_ids.shape[:-1], input_ids.shape[-1]
        mask = None if attention_mask is None else attention_mask.reshape(-1, length)
        text = self._clip().get_text_features(
            input_ids=input_ids.reshape(-1, length), attention_mask=mask
        )
        text = _features(text)
        return text.reshape(*lead, text.shape[-1])

    def pooled_embeddings(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None
    ) -> torch.Tensor:
        """Text-conditioned image embeddings, not normalised: input_ids [B, L] (one text per
        image) -> [B, E]; [B, K, L] (K texts per image) -> [B, K, E]."""
        single = input_ids.dim() == 2
        text = self.encode_text(input_ids, attention_mask)
        _, patches = self.encode_image(pixel_values)
        pooled, _ = self(text[:, None] if single else text, patches)
        return pooled[:, 0] if single else pooled


def from_pretrained(out_dir: str, **clip_kwargs):
    """(CLIPModel, BetaCLIPPooler) from an exported directory, both in eval mode on the same
    device and dtype; `clip_kwargs` go to CLIPModel.from_pretrained."""
    from transformers import CLIPModel

    pooler_path = os.path.join(out_dir, POOLER_FILE)
    if not os.path.isfile(pooler_path):
        raise FileNotFoundError(
            f"expected {POOLER_FILE} in {out_dir}: a directory written by "
            "`python -m beta_clip_jax.export --workdir=DIR --out=OUT`"
        )
    clip = CLIPModel.from_pretrained(out_dir, **clip_kwargs).eval()
    pooler = BetaCLIPPooler.from_file(pooler_path, clip_model=clip)
    pooler.to(device=clip.device, dtype=clip.dtype)
    return clip, pooler
