"""Holistic CLIP: K image embeddings per image, M captions per image, multi-to-multi loss.

docs/methods.md has the options, commands and caveats. Pieces:

- `m2m_loss`: per caption slot m, a CLIP loss between slot m's captions and one image branch.
  Branch choice per (image, slot), as in the released code: slot m uses branch m when K = M
  (and for m < K when K < M); otherwise the branch with the largest positive similarity, a hard
  argmax with gradient through the chosen branch only. Plus the diversity hinge
  max(0, mean_{k != l} mean_b <v_bk, v_bl> - 0.7), which the released training loop adds.
- Two ways to get K image embeddings from the ViT, both ending in the tower's shared `ln_post`
  and projection applied to each branch's CLS output:
  * CLS form: `MultiClassTokens` prepends K class tokens; every block then uses
    `cls_attention_mask` so CLS i never attends to CLS j; the ViT returns rows 0..K-1.
  * MLP form: in the last n blocks the token stream [B, L, W] is copied into K streams
    [B, K, L, W] (`split_branches`); LN, attention and the first MLP layer are shared, the
    second MLP layer (`fc2`, `BranchedDense`) is per branch; each stream attends only within
    itself. The blocks are the tower's own ResidualBlock with that fc2, so a pretrained block
    becomes a branched one by tiling its fc2 K times (`complete_params`).
- `HolisticModel` / `HolisticVisionTower` put these into the model: the tower is the plain
  VisionTower with its `extra_rows` (CLS form) or `trunk` (MLP form) stage replaced, so every
  other parameter keeps its name and pretrained weights load unchanged.
- Inference fuses branches by averaging per-branch cosine logits (`fused_logits`); equivalently
  score texts against `fuse_branches` (the mean of the L2-normalised branch embeddings, kept
  unnormalised). `branches=` selects a subset (the paper's embedding customisation).
"""

import jax
import jax.numpy as jnp

from beta_clip_jax.losses import cal
from beta_clip_jax.methods import holistic_model
from beta_clip_jax.methods.holistic_model import (  # noqa: F401  (the method's public names)
    MODEL_DEFAULTS,
    HolisticModel,
    MultiClassTokens,
    _unit,
    cls_attention_bias,
    cls_attention_mask,
    fuse_branches,
    fused_logits,
    split_branches,
)
from beta_clip_jax.methods.registry import LockLayout, Method, register

_NEG = -1e9  # finite "minus infinity" for padded columns (see smartclip._NEG)


def branch_assignment(image, text, pairing: str = "auto"):
    """Branch index per (image, caption slot) -> int32 [B, M].

    image [B, K, E], text [B, M, E], both L2-normalised. pairing: "auto" (the released code:
    fixed k = m when K = M, fixed for m < K and argmax beyond when K < M, argmax for every
    slot when K > M), "fixed" (k = m; needs M <= K) or "argmax" (every slot).
    """
    b, k, _ = image.shape
    m = text.shape[1]
    fixed = jnp.broadcast_to(jnp.arange(m), (b, m))
    best = jnp.argmax(jnp.einsum("bke,bme->bmk", image, text), axis=-1)
    if pairing == "fixed":
        if m > k:
            raise ValueError(f"fixed pairing needs M <= K caption slots; got M={m}, K={k}")
        return fixed.astype(jnp.int32)
    if pairing == "argmax" or (pairing == "auto" and k > m):
        return best.astype(jnp.int32)
    if pairing == "auto":
        return jnp.where(fixed < k, fixed, best).astype(jnp.int32)
    raise ValueError(f"unknown pairing {pairing!r}; expected 'auto', 'fixed' or 'argmax'")


def m2m_loss(
    image,
    text,
    logit_scale,
    valid=None,
    *,
    pairing: str = "auto",
    diversity_margin: float = 0.7,
    diversity_weight: float = 1.0,
):
    """Multi-to-multi contrastive loss -> (loss, metrics).

    image: [B, K, E] branch embeddings; text: [B, M, E] caption slots; valid: [B, M] bool
    (None = all valid); logit_scale: the multiplier s (not its log). Normalised inside.
    With a[b, m] the chosen branch (`branch_assignment`), for each slot m:

        i2t row (i, m):    s <v[i, a[i, m]], t[j, m]> over valid j, positive j = i
        t2i column (j, m): s <v[i, a[j, m]], t[j, m]> over all images i, positive i = j

    loss = (mean_valid CE_i2t + mean_valid CE_t2i) / 2 + diversity_weight * hinge. K = M = 1
    is the standard CLIP loss.
    """
    v, t = _unit(image), _unit(text)
    b, k, _ = v.shape
    m = t.shape[1]
    if valid is None:
        valid = jnp.ones((b, m), bool)
    scale = jnp.asarray(logit_scale, v.dtype)

    assign = branch_assignment(jax.lax.stop_gradient(v), jax.lax.stop_gradient(t), pairing)
    pick = jax.nn.one_hot(assign, k, dtype=v.dtype)  # [B, M, K]
    # Rows: each image under its own chosen branch; columns: every image under the branch the
    # caption's own image chose. One-hot contractions avoid a [K, M, B, B] logit tensor.
    v_row = jnp.einsum("bmk,bke->bme", pick, v)
    rows = scale * jnp.einsum("ime,jme->mij", v_row, t)
    cols = scale * jnp.einsum("ike,jmk,jme->mji", v, pick, t)
    pos = jnp.einsum("ime,ime->mi", v_row, t) * scale

    slot_valid = valid.T  # [M, B]
    ce_i2t = jax.nn.logsumexp(jnp.where(slot_valid[:, None, :], rows, _NEG), axis=-1) - pos
    ce_t2i = jax.nn.logsumexp(cols, axis=-1) - pos
    w = slot_valid.astype(v.dtype)
    count = jnp.maximum(w.sum(), 1.0)
    loss_i2t = (ce_i2t * w).sum() / count
    loss_t2i = (ce_t2i * w).sum() / count
    loss = 0.5 * (loss_i2t + loss_t2i)

    if k > 1:
        sim = jnp.einsum("bke,ble->kl", v, v) / b
        off = (sim.sum() - jnp.trace(sim)) / (k * (k - 1))
        hinge = jnp.maximum(off - diversity_margin, 0.0)
    else:
        off = hinge = jnp.zeros((), v.dtype)
    loss = loss + diversity_weight * hinge

    metrics = {
        "m2m_i2t": loss_i2t,
        "m2m_t2i": loss_t2i,
        "m2m_diversity": hinge,
        "m2m_branch_similarity": jax.lax.stop_gradient(off),
    }
    return loss, metrics


# ---- the method ------------------------------------------------------------------------------


def holistic_objective(outputs, valid, loss_cfg, step, scale):
    """The multi-to-multi loss: K image branches vs the caption + sentence slots, alone (the
    global InfoNCE is only logged)."""
    _, metrics = cal.global_loss(outputs, loss_cfg, scale)
    text = outputs["sentence_text"]
    cfg = loss_cfg.get("holistic") or {}
    loss, m_x = m2m_loss(
        outputs["image_branches"],
        text,
        scale,
        valid[:, : text.shape[1]],
        pairing=cfg.get("pairing", "auto"),
        diversity_margin=cfg.get("diversity_margin", 0.7),
        diversity_weight=cfg.get("diversity_weight", 1.0),
    )
    return loss, {**metrics, **m_x}


def _check_model(c) -> list[str]:
    errors = []
    if c.image_branches < 1:
        errors.append(f"image_branches={c.image_branches} (at least 1)")
    if c.branch_type not in holistic_model.BRANCH_TYPES:
        errors.append(f"branch_type={c.branch_type!r} (allowed {holistic_model.BRANCH_TYPES})")
    if c.branch_cls_attention not in holistic_model.CLS_ATTENTION:
        errors.append(f"branch_cls_attention={c.branch_cls_attention!r} (allowed block, bias)")
    if c.branch_type == "mlp" and not 1 <= c.branch_layers <= c.vision_layers:
        errors.append(f"branch_layers={c.branch_layers} outside [1, {c.vision_layers}]")
    return errors


def _branched(model_cfg) -> bool:
    return int(model_cfg.get("image_branches", 1)) > 1 and model_cfg.get("branch_type") == "mlp"


def _check_lock(optim_cfg, model_cfg, locked: dict) -> None:
    """The branched blocks start as copies: frozen, the branches could never differ."""
    if _branched(model_cfg) and "visual" in locked and locked["visual"] < model_cfg.branch_layers:
        raise ValueError(
            f"optim.lock_image with Holistic 'mlp' branches needs optim.lock_image_unlocked_"
            f"blocks >= model.branch_layers={model_cfg.branch_layers} (got {locked['visual']}): "
            "the branched blocks start as copies and, frozen, the branches could never differ"
        )


def _export_refusal(cfg) -> str | None:
    if cfg.image_branches <= 1:
        return None
    # Both forms have several image embeddings per image (K class tokens, or K fc2 kernels in
    # the last blocks): a Hugging Face CLIPModel has room for one.
    return (
        f"a Holistic CLIP model with {cfg.image_branches} image branches "
        f"(branch_type={cfg.branch_type!r}) has no Hugging Face CLIPModel form; load the "
        "workdir with beta_clip_jax.api.load, which fuses the branches"
    )


METHOD = register(
    Method(
        name="holistic",
        loss=holistic_objective,
        title="Holistic CLIP",
        summary="CLIP fine-tuned with Holistic CLIP's multi-to-multi loss over several image "
        "branches",
        model_class=HolisticModel,
        outputs=("sentence_text", "image_branches"),
        model_defaults=MODEL_DEFAULTS,
        loss_defaults={"pairing": "auto", "diversity_margin": 0.7, "diversity_weight": 1.0},
        check_model=_check_model,
        claims_model=lambda c: [f"image_branches={c.image_branches}"] * (c.image_branches > 1),
        complete_params=holistic_model.complete_params,
        # One branch is the plain model; several are part of inference (fused).
        inference_model=lambda cfg: "holistic" if cfg.image_branches > 1 else "beta_clip",
        # The class tokens start as copies of the class token and differ only by what they
        # learn, so they train even in a locked tower.
        lock_layout=LockLayout(
            stacked_blocks={"visual": ("branch_blocks",)},
            always_train={"visual": frozenset({"branch_tokens"})},
        ),
        check_lock=_check_lock,
        packed_texts=False,
        export_refusal=_export_refusal,
    )
)
