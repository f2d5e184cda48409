"""Official β-CLIP training checkpoints for tests, written from a transformers CLIPModel.

The mapping HF -> official layout (timm vision tower, OpenAI text tower, the pooler under
`text_conditioned_patches_block.`) is spelled out here on its own, independently of
beta_clip_jax/convert, so tests check the converter rather than restate it.
"""

import argparse
import copy
import math
from collections import OrderedDict

import torch

POOL = "text_conditioned_patches_block."


class _QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OfficialPooler(torch.nn.Module):
    """The official pooler's computation under its state_dict names."""

    def __init__(self, e: int, heads: int = 8):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(e, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(e, eps=1e-5)
        mlp = [("c_fc", torch.nn.Linear(e, 4 * e)), ("gelu", _QuickGELU())]
        self.mlp = torch.nn.Sequential(OrderedDict(mlp + [("c_proj", torch.nn.Linear(4 * e, e))]))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, q, kv):
        out = self.attn(q, kv, kv, need_weights=False)[0]
        return out + self.mlp(self.ln_2(out))


def official_state_dict(hf, pooler, frozen, res) -> dict[str, torch.Tensor]:
    """HF CLIPModel + pooler -> the official key layout (timm vision tower, OpenAI text tower)."""
    sd = hf.state_dict()
    v, t = "vision_model.", "text_model."
    out = {
        "visual.patch_embed.proj.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.cls_token": sd[v + "embeddings.class_embedding"].reshape(1, 1, -1),
        "visual.pos_embed": sd[v + "embeddings.position_embedding.weight"][None],
        "image_projection": sd["visual_projection.weight"].T,
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "positional_embedding": frozen,
        "positional_embedding_res": res,
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
    }
    for p in ("weight", "bias"):
        out[f"visual.norm_pre.{p}"] = sd[f"{v}pre_layrnorm.{p}"]
        out[f"visual.norm.{p}"] = sd[f"{v}post_layernorm.{p}"]
        out[f"ln_final.{p}"] = sd[f"{t}final_layer_norm.{p}"]
        for i in range(hf.config.vision_config.num_hidden_layers):
            o, h = f"visual.blocks.{i}.", f"{v}encoder.layers.{i}."
            qkv = [sd[f"{h}self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"{o}attn.qkv.{p}"] = torch.cat(qkv)
            out[f"{o}attn.proj.{p}"] = sd[f"{h}self_attn.out_proj.{p}"]
            out[f"{o}norm1.{p}"] = sd[f"{h}layer_norm1.{p}"]
            out[f"{o}norm2.{p}"] = sd[f"{h}layer_norm2.{p}"]
            out[f"{o}mlp.fc1.{p}"] = sd[f"{h}mlp.fc1.{p}"]
            out[f"{o}mlp.fc2.{p}"] = sd[f"{h}mlp.fc2.{p}"]
        for i in range(hf.config.text_config.num_hidden_layers):
            o, h = f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
            for x in ("q", "k", "v", "out"):
                out[f"{o}attn.{x}_proj.{p}"] = sd[f"{h}self_attn.{x}_proj.{p}"]
            out[f"{o}ln_1.{p}"] = sd[f"{h}layer_norm1.{p}"]
            out[f"{o}ln_2.{p}"] = sd[f"{h}layer_norm2.{p}"]
            out[f"{o}mlp.c_fc.{p}"] = sd[f"{h}mlp.fc1.{p}"]
            out[f"{o}mlp.c_proj.{p}"] = sd[f"{h}mlp.fc2.{p}"]
    out.update({POOL + k: w for k, w in pooler.state_dict().items()})
    return {k: w.detach().clone().contiguous() for k, w in out.items()}


def save_training_checkpoint(path, state_dict, pooler) -> str:
    """torch.save in main_clip_ft.py's format, with a real AdamW state and DDP's prefix."""
    trained = copy.deepcopy(pooler)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    q = torch.randn(2, 3, pooler.ln_2.normalized_shape[0])
    trained(q, q).square().sum().backward()
    opt.step()
    args = argparse.Namespace(model="CLIP_VITB16_OPENAI", lr=1e-5, betas=(0.9, 0.98), k=36)
    torch.save(
        {
            "epoch": 5,
            "state_dict": OrderedDict(("module." + k, w) for k, w in state_dict.items()),
            "optimizer": opt.state_dict(),
            "optimizer_conditioner": None,
            "scaler": torch.amp.GradScaler("cpu").state_dict(),
            "best_acc1": 0,
            "args": args,
        },
        path,
    )
    return str(path)


def _linear(name, n_out, n_in):
    return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}


def _norm(name, w):
    return {f"{name}.weight": (w,), f"{name}.bias": (w,)}


def official_shapes(vw, vl, tw, tl, e, vocab, patch=14, grid=16, ctx=248):
    """Official key -> shape, written out from the model definition (MLPs 4x wide)."""
    out = {
        "visual.patch_embed.proj.weight": (vw, 3, patch, patch),
        "visual.cls_token": (1, 1, vw),
        "visual.pos_embed": (1, 1 + grid * grid, vw),
        "image_projection": (vw, e),
        "token_embedding.weight": (vocab, tw),
        "positional_embedding": (ctx, tw),
        "positional_embedding_res": (ctx, tw),
        "text_projection": (tw, e),
        "logit_scale": (),
        POOL + "logit_scale": (),
        **_norm("visual.norm_pre", vw),
        **_norm("visual.norm", vw),
        **_norm("ln_final", tw),
        **_linear(POOL + "attn.in_proj", 3 * e, e),
        **_linear(POOL + "attn.out_proj", e, e),
        **_norm(POOL + "ln_2", e),
        **_linear(POOL + "mlp.c_fc", 4 * e, e),
        **_linear(POOL + "mlp.c_proj", e, 4 * e),
    }
    out = {k.replace("in_proj.", "in_proj_"): s for k, s in out.items()}
    for i in range(vl):
        b = f"visual.blocks.{i}."
        out |= _norm(b + "norm1", vw) | _norm(b + "norm2", vw)
        out |= _linear(b + "attn.qkv", 3 * vw, vw) | _linear(b + "attn.proj", vw, vw)
        out |= _linear(b + "mlp.fc1", 4 * vw, vw) | _linear(b + "mlp.fc2", vw, 4 * vw)
    for i in range(tl):
        b = f"transformer.resblocks.{i}."
        out |= _norm(b + "ln_1", tw) | _norm(b + "ln_2", tw)
        for x in ("q", "k", "v", "out"):
            out |= _linear(f"{b}attn.{x}_proj", tw, tw)
        out |= _linear(b + "mlp.c_fc", 4 * tw, tw) | _linear(b + "mlp.c_proj", tw, 4 * tw)
    return out
