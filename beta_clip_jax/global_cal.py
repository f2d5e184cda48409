"""Global β-CAL: negatives from the whole batch, computed blockwise without any N x N matrix.

`losses.beta_cal` over one group forms the full (BK) x (BK) logits. With `loss.cal_scope =
"global"` the group is the whole (micro-)batch, which is far too big for that on one device, so
here every device keeps its shard of pooled vectors v and texts t, and the text blocks travel
round a ring of devices (`jax.lax.ppermute` inside `jax.shard_map` over the batch axes):

* I->T (rows = local pooled vectors): an online log-sum-exp over each visiting text block;
* T->I (rows = texts): the column log-sum-exp of each visiting text block is accumulated in a
  buffer that travels with the block and is complete when the block is home again;
* the positive (same-image) terms are local, because an image's K slots live on one device;
* BCE sums weight * loss over every block (L_T->I equals L_I->T exactly, spec 2.4).

Each visiting block is further cut into column chunks of at most `block_size` texts, and each
chunk's step is rematerialised, so a device holds O(N D) saved inputs plus one (n x chunk) tile,
never O(N^2). The value and gradient equal `losses.beta_cal` on the whole batch as one group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from beta_clip_jax import losses

BATCH_AXES = ("data", "fsdp")
_MASKED = -1e9  # the finite "minus infinity" of losses.beta_cal


def _chunk(n: int, block_size: int | None) -> int:
    """The largest divisor of n that is at most block_size (all of n when block_size is None)."""
    if not block_size or block_size >= n:
        return n
    return max(c for c in range(1, block_size + 1) if n % c == 0)


def _positive(same, eye, vv, *, mode, alpha, beta):
    """Columns that count as a hit for the argmax accuracy (CE: W > 0; BCE: y = 1)."""
    if mode == "bce":
        return same & vv
    pos = jnp.zeros_like(vv)
    if alpha > 0:
        pos = pos | eye
    if beta > 0:
        pos = pos | (same & ~eye)
    return pos & vv


def _online(mx, se, x, axis):
    """Merges the log-sum-exp partial (mx, se) with logits x reduced along `axis`.

    The max is a constant for differentiation (LSE does not depend on the shift), so the
    gradient is the softmax and no -inf ever enters an exp's derivative.
    """
    new = jax.lax.stop_gradient(jnp.maximum(mx, x.max(axis)))
    shifted = x - jnp.expand_dims(new, axis)
    return new, se * jnp.exp(mx - new) + jnp.exp(shifted).sum(axis)


def _argmax_merge(best, hit, x, positive, axis):
    """Running (max value, whether the argmax column is positive) along `axis`."""
    idx = jnp.argmax(x, axis=axis)
    val = jnp.take_along_axis(x, jnp.expand_dims(idx, axis), axis=axis).squeeze(axis)
    pos = jnp.take_along_axis(positive, jnp.expand_dims(idx, axis), axis=axis).squeeze(axis)
    better = val > best
    return jnp.where(better, val, best), jnp.where(better, pos, hit)


def _tile(local, row, col, scale, *, k, mode, alpha, beta, mask_padding):
    """One (local rows x visiting chunk) tile: updates row stats, returns the column stats."""
    v, m_r, gid_r = local
    r_mx, r_se, r_best, r_hit = row
    t, m_c, gid_c, c_mx, c_se, c_best, c_hit = col
    cos = v @ t.T
    s = scale * cos
    same = (gid_r // k)[:, None] == (gid_c // k)[None, :]
    eye = gid_r[:, None] == gid_c[None, :]
    vv = m_r[:, None] & m_c[None, :]
    stats = {}
    if mode == "ce":
        x_it = jnp.where(m_c[None, :], s, _MASKED) if mask_padding else s
        x_ti = jnp.where(m_r[:, None], s, _MASKED) if mask_padding else s
        r_mx, r_se = _online(r_mx, r_se, x_it, 1)
        c_mx, c_se = _online(c_mx, c_se, x_ti, 0)
    else:
        # Padded pairs have weight 0, so masking their logits (as the dense loss does) is moot.
        y = (same & vv).astype(s.dtype)
        omega = jnp.where(vv, jnp.where(eye, 1.0, jnp.where(same, beta, 1.0)), 0.0)
        ell = jnp.maximum(s, 0.0) - s * y + jnp.log1p(jnp.exp(-jnp.abs(s)))
        stats["bce"] = (omega * ell).sum()
        x_it = jnp.where(m_c[None, :], s, _MASKED)
        x_ti = jnp.where(m_r[:, None], s, _MASKED)
    # Metrics only: no gradient.
    x_it, x_ti, cos = map(jax.lax.stop_gradient, (x_it, x_ti, cos))
    positive = _positive(same, eye, vv, mode=mode, alpha=alpha, beta=beta)
    r_best, r_hit = _argmax_merge(r_best, r_hit, x_it, positive, 1)
    c_best, c_hit = _argmax_merge(c_best, c_hit, x_ti, positive, 0)
    cross = vv & ~same
    stats["neg_sum"] = jnp.where(cross, cos, 0.0).sum()
    stats["neg_cnt"] = cross.sum().astype(cos.dtype)
    row = (r_mx, r_se, r_best, r_hit)
    col = (t, m_c, gid_c, c_mx, c_se, c_best, c_hit)
    return row, col, stats


def _blockwise(v, t, valid, scale, *, axis, block_size, **kw):
    """Per-device body: v, t [b, K, D] (this device's images), valid [b, K], scale ()."""
    b, k, d = v.shape
    dt = losses._compute_dtype(v, t)
    n = b * k
    v = losses._normalize(v, dt)
    t = losses._normalize(t, dt)
    scale = jnp.asarray(scale, dt)
    m = valid.reshape(n).astype(bool)
    if axis is None:
        ndev, me = 1, 0
    else:
        ndev = jax.lax.psum(1, axis)
        me = jax.lax.axis_index(axis)
    gid = (me * n + jnp.arange(n)).astype(jnp.int32)
    c = _chunk(n, block_size)
    nchunks = n // c
    neg_inf = jnp.full((n,), -jnp.inf, dt)
    zeros = jnp.zeros((n,), dt)
    false = jnp.zeros((n,), bool)
    vf, tf = v.reshape(n, d), t.reshape(n, d)
    local = (vf, m, gid)  # loop constants: saved once, not per step
    # Loop carries differ per device ("varying" in shard_map's type system) from the start.
    vary = (lambda x: x) if axis is None else (lambda x: jax.lax.pcast(x, axis, to="varying"))
    neg_inf, zeros, false = vary(neg_inf), vary(zeros), vary(false)
    row0 = (neg_inf, zeros, neg_inf, false)
    col0 = (tf, m, gid, neg_inf, zeros, neg_inf, false)
    tile = jax.checkpoint(functools.partial(_tile, **kw, k=k))
    names = ("neg_sum", "neg_cnt", "bce") if kw["mode"] == "bce" else ("neg_sum", "neg_cnt")
    zero_stats = {name: vary(jnp.zeros((), dt)) for name in names}

    def visit(row, col):
        """All chunks of one visiting block against the local rows."""
        chunks = jax.tree.map(lambda x: x.reshape((nchunks, c) + x.shape[1:]), col)

        def step(carry, ch):
            row, acc = carry
            row, ch, stats = tile(local, row, ch, scale)
            return (row, jax.tree.map(jnp.add, acc, stats)), ch

        (row, acc), chunks = jax.lax.scan(step, (row, zero_stats), chunks)
        return row, jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), chunks), acc

    def ring(carry, _):
        row, col, acc = carry
        row, col, stats = visit(row, col)
        if axis is not None:
            col = _pass_on(col, axis, ndev)
        return (row, col, jax.tree.map(jnp.add, acc, stats)), None

    (row, col, acc), _ = jax.lax.scan(ring, (row0, col0, zero_stats), None, length=ndev)
    r_mx, r_se, _, r_hit = row
    _, _, _, c_mx, c_se, _, c_hit = col
    return _finish(v, t, valid, scale, r_mx, r_se, r_hit, c_mx, c_se, c_hit, acc, axis, ndev, kw)


def _pass_on(col, axis, ndev):
    """Sends the visiting block to the next device as ONE array (one collective per step).

    Several independent collectives in one step could start in a different order on different
    devices, which XLA's CPU runtime can deadlock on; a single packed send cannot. Flags and slot
    ids travel as floats (exact below 2^24 slots).
    """
    t, m_c, gid_c, c_mx, c_se, c_best, c_hit = col
    dt = t.dtype
    extra = jnp.stack([m_c.astype(dt), gid_c.astype(dt), c_mx, c_se, c_best, c_hit.astype(dt)], 1)
    packed = jax.lax.ppermute(
        jnp.concatenate([t, extra], 1), axis, [(i, (i + 1) % ndev) for i in range(ndev)]
    )
    t, extra = packed[:, : t.shape[1]], packed[:, t.shape[1] :]
    m_c, gid_c, c_mx, c_se, c_best, c_hit = (extra[:, i] for i in range(6))
    return (t, m_c > 0, gid_c.astype(jnp.int32), c_mx, c_se, c_best, c_hit > 0)


def _finish(v, t, valid, scale, r_mx, r_se, r_hit, c_mx, c_se, c_hit, acc, axis, ndev, kw):
    """The local (same-image) terms and the cross-device sums."""
    b, k, _ = v.shape
    n = b * k
    mode, alpha, beta = kw["mode"], kw["alpha"], kw["beta"]
    psum = (lambda x: x) if axis is None else (lambda x: jax.lax.psum(x, axis))
    mf = valid.reshape(n).astype(v.dtype)
    count = jnp.maximum(psum(mf.sum()), 1.0)
    mean = lambda x: psum((x * mf).sum()) / count

    cos_img = jnp.einsum("bkd,bld->bkl", v, t)  # [b, K(v), K(t)], same image only
    s_img = scale * cos_img
    eye = jnp.eye(k, dtype=bool)
    vv = valid[:, :, None] & valid[:, None, :]
    metrics = {}
    if mode == "ce":
        w = jnp.where(vv, alpha * eye + beta * ~eye, 0.0).astype(v.dtype)
        q = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-8)
        lse_it = (r_mx + jnp.log(r_se)).reshape(b, k)
        lse_ti = (c_mx + jnp.log(c_se)).reshape(b, k)
        l_it = lse_it - (q * s_img).sum(-1)
        l_ti = lse_ti - (q * jnp.swapaxes(s_img, 1, 2)).sum(-1)
        # Padded rows are dropped by the mean; `where` keeps their LSE out of the gradient.
        loss_it = mean(jnp.where(valid, l_it, 0.0).reshape(n))
        loss_ti = mean(jnp.where(valid, l_ti, 0.0).reshape(n))
        ent = -jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0).sum(-1)
        metrics["target_entropy"] = mean(ent.reshape(n))
    else:
        total = n * ndev
        loss_it = loss_ti = psum(acc["bce"]) / (total * total)
    loss = 0.5 * (loss_it + loss_ti)
    out = {
        "loss_i2t": loss_it,
        "loss_t2i": loss_ti,
        "acc_i2t": mean(r_hit.astype(v.dtype)),
        "acc_t2i": mean(c_hit.astype(v.dtype)),
        "pos_sim": mean(jnp.diagonal(cos_img, axis1=1, axis2=2).reshape(n)),
        "neg_sim": psum(acc["neg_sum"]) / jnp.maximum(psum(acc["neg_cnt"]), 1.0),
        "scale": scale,
        **metrics,
    }
    out = {
        key: (val if key.startswith("loss") else jax.lax.stop_gradient(val))
        for key, val in out.items()
    }
    return loss, out


def batch_axes(mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over (those of BATCH_AXES the mesh has)."""
    if mesh is None or not mesh.axis_names:
        return ()
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def global_beta_cal(
    visual,
    text,
    valid,
    logit_scale,
    *,
    beta,
    mode,
    alpha=1.0,
    mask_padding=True,
    block_size: int | None = 1024,
    mesh=None,
    axes: tuple[str, ...] | None = None,
):
    """β-CAL with the whole batch as one group, blockwise over the devices of the batch axes.

    Same arguments, result and metrics as `losses.beta_cal` (visual, text [B, K, D], valid [B, K],
    logit_scale the multiplier), plus:
      block_size: most texts per column tile (a divisor of the per-device slot count is used).
      mesh: the mesh (default: the one `jax.set_mesh` installed; none means one device).
      axes: mesh axes the batch is split over (default: "data" and "fsdp").
    Argmax ties between equal logits may resolve to another column than the dense loss's.
    """
    if visual.ndim != 3 or visual.shape != text.shape or valid.shape != visual.shape[:2]:
        raise ValueError(
            f"global_beta_cal wants visual, text [B,K,D] and valid [B,K]; got {visual.shape}, "
            f"{text.shape}, {valid.shape}"
        )
    if mode not in ("ce", "bce"):
        raise ValueError(f"beta_cal mode must be 'ce' or 'bce', got {mode!r}")
    kw = dict(mode=mode, alpha=float(alpha), beta=float(beta), mask_padding=bool(mask_padding))
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    axes = batch_axes(mesh) if axes is None else tuple(axes)
    valid = jnp.asarray(valid, bool)
    scale = jnp.asarray(logit_scale)
    if not axes:
        return _blockwise(visual, text, valid, scale, axis=None, block_size=block_size, **kw)
    ndev = math.prod(mesh.shape[a] for a in axes)
    if visual.shape[0] % ndev:
        raise ValueError(
            f"global β-CAL: batch {visual.shape[0]} is not divisible by the {ndev} devices of "
            f"mesh axes {axes}"
        )
    spec = P(axes)
    body = functools.partial(_blockwise, axis=axes, block_size=block_size, **kw)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=P())
    return fn(visual, text, valid, scale)


def from_loss_config(pooled, text, valid, scale, loss_cfg):
    """global_beta_cal with the settings of `config.loss` (objective's cal_scope="global")."""
    return global_beta_cal(
        pooled,
        text,
        valid,
        scale,
        beta=loss_cfg.beta,
        mode=loss_cfg.mode,
        alpha=loss_cfg.alpha,
        mask_padding=loss_cfg.mask_padding,
    )
