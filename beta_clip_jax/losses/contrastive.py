"""Contrastive losses: β-CAL (CE and BCE) and the CLIP InfoNCE.

All are pure functions `(...) -> (loss, metrics)` with scalar metrics. Embeddings are L2-normalised
inside, and all logit, softmax and loss math runs in at least float32 whatever the input dtype
(float64 inputs stay float64, which the gradient tests use). docs/methods.md (β-CLIP itself)
writes out the β-CAL and InfoNCE equations.
"""

import jax
import jax.numpy as jnp

# A finite "minus infinity": masked logits must not make 0 * (-inf) = nan in the soft-target sums.
_MASKED_LOGIT = -1e9


def _compute_dtype(*xs):
    """float32, or float64 when an input already is (never below float32)."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _normalize(x, dtype):
    x = x.astype(dtype)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _safe_mean(x, mask):
    """Mean of x over mask; 0 when the mask is empty (an all-padded group must not give nan)."""
    mask = mask.astype(x.dtype)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _argmax_hits(logits, positive, row_valid):
    """Fraction of valid rows whose argmax column is a positive."""
    idx = jnp.argmax(logits, axis=-1)
    hit = jnp.take_along_axis(positive, idx[:, None], axis=-1)[:, 0]
    return _safe_mean(hit.astype(logits.dtype), row_valid)


def beta_cal(visual, text, valid, logit_scale, *, beta, mode, alpha=1.0, mask_padding=True):
    """β-CAL over one group of B images with K text slots each.

    Args:
      visual: [B, K, D] pooled visual vectors v_{b,k} (image b as seen by its text k).
      text: [B, K, D] text embeddings t_{b,k}.
      valid: [B, K] bool slot validity m.
      logit_scale: the multiplier s_c (not its log).
      beta: weight of same-image siblings (CE: soft target mass; BCE: loss weight).
      mode: "ce" (soft targets, softmax) or "bce" (hard targets, sigmoid).
      alpha: CE target weight of the query's own pair.
      mask_padding: CE only; True removes padded columns from both softmaxes, False keeps them as
        zero-target negatives like the reference code. BCE always gives them logit -1e9.

    Returns:
      (loss, metrics) with metrics loss_i2t, loss_t2i (the two directions), acc_i2t, acc_t2i
      (row argmax on a positive column: target W > 0 for CE, y = 1 for BCE), pos_sim (mean
      diagonal cosine), neg_sim (mean cross-image cosine), scale,
      and for CE target_entropy, the floor the loss cannot go below.
    """
    if visual.ndim != 3 or visual.shape != text.shape or valid.shape != visual.shape[:2]:
        raise ValueError(
            f"beta_cal wants visual, text [B,K,D] and valid [B,K]; got {visual.shape}, "
            f"{text.shape}, {valid.shape}"
        )
    if mode not in ("ce", "bce"):
        raise ValueError(f"beta_cal mode must be 'ce' or 'bce', got {mode!r}")
    b, k, d = visual.shape
    n = b * k
    dt = _compute_dtype(visual, text)
    v = _normalize(visual, dt).reshape(n, d)
    t = _normalize(text, dt).reshape(n, d)
    m = valid.reshape(n).astype(bool)
    scale = jnp.asarray(logit_scale, dt)

    cos = v @ t.T  # [N, N]: row i = pooled v_i, column j = text t_j
    s = scale * cos
    img = jnp.arange(n) // k
    same = img[:, None] == img[None, :]
    eye = jnp.eye(n, dtype=bool)
    vv = m[:, None] & m[None, :]
    col_valid = jnp.broadcast_to(m[None, :], (n, n))

    if mode == "ce":
        w = jnp.where(vv, alpha * eye + beta * (same & ~eye), 0.0).astype(dt)
        q = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-8)
        positive = w > 0
        s_it = jnp.where(col_valid, s, _MASKED_LOGIT) if mask_padding else s
        s_ti = jnp.where(col_valid, s.T, _MASKED_LOGIT) if mask_padding else s.T
        # W is symmetric, so the same row-normalised targets serve both directions.
        l_it = -(q * jax.nn.log_softmax(s_it, axis=-1)).sum(-1)
        l_ti = -(q * jax.nn.log_softmax(s_ti, axis=-1)).sum(-1)
        loss_it, loss_ti = _safe_mean(l_it, m), _safe_mean(l_ti, m)
        ent = -jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0).sum(-1)
        extra = {"target_entropy": _safe_mean(ent, m)}
    else:
        y = (same & vv).astype(dt)
        omega = jnp.where(vv, jnp.where(eye, 1.0, jnp.where(same, beta, 1.0)), 0.0).astype(dt)
        positive = y > 0
        s_it = jnp.where(col_valid, s, _MASKED_LOGIT)
        s_ti = jnp.where(col_valid, s.T, _MASKED_LOGIT)

        def bce(x):
            # max(x,0) - x y + log(1 + e^{-|x|}): stable BCE with logits; mean over all N^2.
            ell = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
            return (omega * ell).sum() / (n * n)

        loss_it, loss_ti = bce(s_it), bce(s_ti)
        extra = {}

    loss = 0.5 * (loss_it + loss_ti)
    cross = vv & ~same
    metrics = {
        "loss_i2t": loss_it,
        "loss_t2i": loss_ti,
        "acc_i2t": _argmax_hits(s_it, positive, m),
        "acc_t2i": _argmax_hits(s_ti, positive, m),
        "pos_sim": _safe_mean(jnp.diagonal(cos), m),
        "neg_sim": _safe_mean(cos, cross),
        "scale": scale,
        **extra,
    }
    return loss, metrics


def _pair_metrics(logits, cos, scale):
    b = logits.shape[0]
    eye = jnp.eye(b, dtype=bool)
    rows = jnp.ones((b,), bool)
    return {
        "acc_i2t": _argmax_hits(logits, eye, rows),
        "acc_t2i": _argmax_hits(logits.T, eye, rows),
        "pos_sim": jnp.diagonal(cos).mean(),
        "neg_sim": _safe_mean(cos, ~eye),
        "scale": scale,
    }


GLOBAL_GRADIENTS = ("full", "local")


def clip_loss(image, text, logit_scale, *, gradient="full"):
    """Symmetric InfoNCE between image [B, D] and text [B, D], pair b being (image b, text b).

    `logit_scale` is the multiplier s (not its log). `gradient`:
      "full": every logit is differentiated in both its row and its column embedding;
      "local": each row's own embedding is differentiated, its columns are a constant copy
        (logits s·I·sg(T)ᵀ and s·T·sg(I)ᵀ). This is the gradient of the reference's multi-GPU
        loss, whose columns come from an all_gather that carries no gradient: each embedding
        learns only as the query of its own row. The loss value is the same in both.
    Returns (loss, metrics) with acc_i2t, acc_t2i, pos_sim, neg_sim and scale.
    """
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"clip_loss wants image, text [B,D]; got {image.shape}, {text.shape}")
    if gradient not in GLOBAL_GRADIENTS:
        raise ValueError(f"clip_loss gradient must be one of {GLOBAL_GRADIENTS}, got {gradient!r}")
    dt = _compute_dtype(image, text)
    scale = jnp.asarray(logit_scale, dt)
    img, txt = _normalize(image, dt), _normalize(text, dt)
    cos = img @ txt.T
    logits = scale * cos
    if gradient == "full":
        rows_i2t, rows_t2i = logits, logits.T
    else:
        sg = jax.lax.stop_gradient
        rows_i2t, rows_t2i = scale * (img @ sg(txt).T), scale * (txt @ sg(img).T)
    loss_it = (jax.nn.logsumexp(rows_i2t, axis=1) - jnp.diagonal(rows_i2t)).mean()
    loss_ti = (jax.nn.logsumexp(rows_t2i, axis=1) - jnp.diagonal(rows_t2i)).mean()
    return 0.5 * (loss_it + loss_ti), _pair_metrics(logits, cos, scale)
