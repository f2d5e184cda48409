"""Global β-CAL: negatives from the whole batch, computed blockwise without any N x N matrix.

`contrastive.beta_cal` over one group forms the full (BK) x (BK) logits. With `loss.cal_scope =
"global"` the group is the whole (micro-)batch, which is far too big for that on one device, so
here every device keeps its shard of pooled vectors v and texts t, and the text blocks travel
round a ring of devices (`jax.lax.ppermute` inside `jax.shard_map` over the batch axes):

* I->T (rows = local pooled vectors): an online log-sum-exp over each visiting text block;
* T->I (rows = texts): the column log-sum-exp of each visiting text block is accumulated in a
  buffer that travels with the block and is complete when the block is home again;
* the positive (same-image) terms are local, because an image's K slots live on one device;
* BCE sums weight * loss over every block (its targets and weights are symmetric, so
  L_T->I equals L_I->T exactly).

The ring is a `jax.custom_vjp` (as in ring attention): its residuals are only this device's v,
t, masks, scale and the final row and column log-sum-exps, and its backward pass runs the ring
again. Each visiting text block carries its mask, final column LSE, that LSE's cotangent and a
dt accumulator, and ends the round at home with dt complete; each tile's logits are recomputed:

    ds[r, c] = g_row[r] softmax_row[r, c] + g_col[c] softmax_col[r, c]   (CE)
    ds[r, c] = g omega[r, c] (sigmoid(s[r, c]) - y[r, c])                  (BCE)

then dv += scale ds t, dt += scale ds^T v, dscale += sum ds cos. Each visiting block is cut
into column chunks of at most `block_size` texts, so a device holds O(n D) (n = its slots) plus
one (n x chunk) tile, whatever the number of devices: never O(N D), never O(N^2). The value and
gradient equal `contrastive.beta_cal` on the whole batch as one group.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from beta_clip_jax.losses import contrastive

BATCH_AXES = ("data", "fsdp")
_MASKED = -1e9  # the finite "minus infinity" of contrastive.beta_cal


class _Ring(NamedTuple):
    """Static settings of the ring (hashable: the custom_vjp's non-differentiable argument)."""

    axis: tuple[str, ...] | None  # the batch mesh axes; None: one device, no collectives
    ndev: int  # devices on the ring
    k: int  # text slots per image
    chunk: int  # texts per column tile
    mode: str
    alpha: float
    beta: float
    mask_padding: bool


def _chunk(n: int, block_size: int | None) -> int:
    """The largest divisor of n that is at most block_size (all of n when block_size is None)."""
    if not block_size or block_size >= n:
        return n
    return max(c for c in range(1, block_size + 1) if n % c == 0)


def _vary(cfg: _Ring, x):
    """x typed as differing per device (shard_map's "varying"), as loop carries must be."""
    return x if cfg.axis is None else jax.lax.pcast(x, cfg.axis, to="varying")


def _slot_ids(cfg: _Ring, n: int, step):
    """Global slot ids of the block visiting at ring step `step` (it began on device me - step)."""
    me = 0 if cfg.axis is None else jax.lax.axis_index(cfg.axis)
    src = (me - step) % cfg.ndev
    return (src * n + jnp.arange(n)).astype(jnp.int32)


def _in_chunks(cfg: _Ring, xs):
    """[n, ...] arrays -> [n / chunk, chunk, ...] for a scan over column tiles."""
    return jax.tree.map(lambda x: x.reshape((-1, cfg.chunk) + x.shape[1:]), xs)


def _pass_on(parts, cfg: _Ring):
    """Sends [n] / [n, d] arrays to the next device on the ring as ONE array (one collective).

    Several independent collectives in one step could start in a different order on different
    devices, which XLA's CPU runtime can deadlock on; a single packed send cannot. Flags travel
    as floats.
    """
    if cfg.axis is None:
        return parts
    dt = jnp.result_type(*[p.dtype for p in parts if jnp.issubdtype(p.dtype, jnp.floating)])
    cols = [(p if p.ndim == 2 else p[:, None]).astype(dt) for p in parts]
    packed = jax.lax.ppermute(
        jnp.concatenate(cols, 1), cfg.axis, [(i, (i + 1) % cfg.ndev) for i in range(cfg.ndev)]
    )
    out, at = [], 0
    for p, c in zip(parts, cols, strict=True):
        x = packed[:, at : at + c.shape[1]]
        at += c.shape[1]
        x = x if p.ndim == 2 else x[:, 0]
        out.append(x > 0.5 if p.dtype == jnp.bool_ else x.astype(p.dtype))
    return tuple(out)


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
    """Merges the log-sum-exp partial (mx, se) with logits x reduced along `axis`."""
    new = jnp.maximum(mx, x.max(axis))
    shifted = x - jnp.expand_dims(new, axis)
    return new, se * jnp.exp(mx - new) + jnp.exp(shifted).sum(axis)


def _argmax_merge(best, hit, x, positive, axis):
    """Running (max value, whether the argmax column is positive) along `axis`."""
    idx = jnp.argmax(x, axis=axis)
    val = jnp.take_along_axis(x, jnp.expand_dims(idx, axis), axis=axis).squeeze(axis)
    pos = jnp.take_along_axis(positive, jnp.expand_dims(idx, axis), axis=axis).squeeze(axis)
    better = val > best
    return jnp.where(better, val, best), jnp.where(better, pos, hit)


def _tile_logits(cfg: _Ring, v, t, m_r, m_c, gid_r, gid_c, scale):
    """One (local rows x visiting chunk) tile: cosines, logits and the pair masks.

    x_it / x_ti are the I->T / T->I logits with padded entries as the dense loss masks them
    (BCE masks them too, for the metrics; its padded pairs have weight 0 in the loss).
    """
    cos = v @ t.T
    s = scale * cos
    same = (gid_r // cfg.k)[:, None] == (gid_c // cfg.k)[None, :]
    eye = gid_r[:, None] == gid_c[None, :]
    vv = m_r[:, None] & m_c[None, :]
    masked = cfg.mask_padding or cfg.mode == "bce"
    x_it = jnp.where(m_c[None, :], s, _MASKED) if masked else s
    x_ti = jnp.where(m_r[:, None], s, _MASKED) if masked else s
    return cos, s, x_it, x_ti, same, eye, vv


def _bce_terms(cfg: _Ring, same, eye, vv, dtype):
    """BCE targets y and weights omega of a tile (padded pairs weigh 0)."""
    y = (same & vv).astype(dtype)
    omega = jnp.where(vv, jnp.where(eye, 1.0, jnp.where(same, cfg.beta, 1.0)), 0.0).astype(dtype)
    return y, omega


def _forward_tile(cfg: _Ring, local, row, col, scale):
    """Forward of one tile: updates the row stats, returns the column stats and tile sums."""
    v, m_r, gid_r = local
    r_mx, r_se, r_best, r_hit = row
    t, m_c, gid_c, c_mx, c_se, c_best, c_hit = col
    cos, s, x_it, x_ti, same, eye, vv = _tile_logits(cfg, v, t, m_r, m_c, gid_r, gid_c, scale)
    sums = {}
    if cfg.mode == "ce":
        r_mx, r_se = _online(r_mx, r_se, x_it, 1)
        c_mx, c_se = _online(c_mx, c_se, x_ti, 0)
    else:
        y, omega = _bce_terms(cfg, same, eye, vv, s.dtype)
        ell = jnp.maximum(s, 0.0) - s * y + jnp.log1p(jnp.exp(-jnp.abs(s)))
        sums["bce"] = (omega * ell).sum()
    positive = _positive(same, eye, vv, mode=cfg.mode, alpha=cfg.alpha, beta=cfg.beta)
    r_best, r_hit = _argmax_merge(r_best, r_hit, x_it, positive, 1)
    c_best, c_hit = _argmax_merge(c_best, c_hit, x_ti, positive, 0)
    cross = vv & ~same
    sums["neg_sum"] = jnp.where(cross, cos, 0.0).sum()
    sums["neg_cnt"] = cross.sum().astype(cos.dtype)
    return (r_mx, r_se, r_best, r_hit), (c_mx, c_se, c_best, c_hit), sums


def _ring_forward(cfg: _Ring, v, t, m, scale):
    """The ring's forward: (row LSE, column LSE, BCE sum, metric stats) of this device."""
    n = v.shape[0]
    dt = v.dtype
    neg_inf = _vary(cfg, jnp.full((n,), -jnp.inf, dt))
    zeros = _vary(cfg, jnp.zeros((n,), dt))
    false = _vary(cfg, jnp.zeros((n,), bool))
    names = ("neg_sum", "neg_cnt", "bce") if cfg.mode == "bce" else ("neg_sum", "neg_cnt")
    zero_sums = {name: _vary(cfg, jnp.zeros((), dt)) for name in names}
    local = (v, m, _slot_ids(cfg, n, 0))

    def visit(carry, step):
        """All chunks of the block visiting at `step` against the local rows."""
        row, (t_b, m_b, *stats_b), sums = carry
        chunks = _in_chunks(cfg, (t_b, m_b, _slot_ids(cfg, n, step), *stats_b))

        def tile(carry, ch):
            row, sums = carry
            row, stats, tile_sums = _forward_tile(cfg, local, row, ch, scale)
            return (row, jax.tree.map(jnp.add, sums, tile_sums)), stats

        (row, sums), stats_b = jax.lax.scan(tile, (row, sums), chunks)
        stats_b = tuple(x.reshape(n) for x in stats_b)
        return row, (t_b, m_b, *stats_b), sums

    def ring_step(carry, step):
        row, block, sums = visit(carry, step)
        return (row, _pass_on(block, cfg), sums), None

    row0 = (neg_inf, zeros, neg_inf, false)
    block0 = (t, m, neg_inf, zeros, neg_inf, false)
    steps = jnp.arange(cfg.ndev - 1)
    carry, _ = jax.lax.scan(ring_step, (row0, block0, zero_sums), steps)
    # Last visit: the texts are done with, only the column stats go home.
    (r_mx, r_se, _, r_hit), (_, _, *stats_b), sums = visit(carry, cfg.ndev - 1)
    c_mx, c_se, _, c_hit = _pass_on(tuple(stats_b), cfg)
    if cfg.mode == "ce":
        r_lse, c_lse = r_mx + jnp.log(r_se), c_mx + jnp.log(c_se)
    else:
        r_lse = c_lse = zeros
    bce = sums.get("bce", _vary(cfg, jnp.zeros((), dt)))
    hits = (r_hit.astype(dt), c_hit.astype(dt))
    return (r_lse, c_lse, bce, *hits, sums["neg_sum"], sums["neg_cnt"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, v, t, m, scale):
    """This device's slots against the whole batch, v, t [n, D] normalised, m [n], scale ().

    Returns (row LSE [n], column LSE [n], BCE sum, I->T hits [n], T->I hits [n], cross-image
    cosine sum and count); the hits and cosine stats are metrics, without gradient.
    """
    return _ring_forward(cfg, v, t, m, scale)


def _ring_fwd(cfg: _Ring, v, t, m, scale):
    out = _ring_forward(cfg, v, t, m, scale)
    r_lse, c_lse = out[:2]
    return out, (v, t, m, scale, r_lse, c_lse)  # O(n D): nothing of the visiting blocks


def _ring_bwd(cfg: _Ring, res, g):
    """Runs the ring again: recomputes each tile; dt accumulates in a buffer on the round."""
    v, t, m, scale, r_lse, c_lse = res
    g_row, g_col, g_bce = g[:3]  # the metric stats have no gradient
    n, d = v.shape
    gid = _slot_ids(cfg, n, 0)

    def tile(carry, ch):
        dv, dscale = carry
        t_c, m_c, gid_c, lse_c, g_c = ch
        cos, s, x_it, x_ti, same, eye, vv = _tile_logits(cfg, v, t_c, m, m_c, gid, gid_c, scale)
        if cfg.mode == "ce":
            p_row = jnp.exp(x_it - r_lse[:, None])
            p_col = jnp.exp(x_ti - lse_c[None, :])
            if cfg.mask_padding:  # masked logits are constants: no gradient reaches them
                p_row = jnp.where(m_c[None, :], p_row, 0.0)
                p_col = jnp.where(m[:, None], p_col, 0.0)
            ds = g_row[:, None] * p_row + g_c[None, :] * p_col
        else:
            y, omega = _bce_terms(cfg, same, eye, vv, s.dtype)
            ds = g_bce * omega * (jax.nn.sigmoid(s) - y)
        dv = dv + scale * (ds @ t_c)
        dscale = dscale + (ds * cos).sum()
        return (dv, dscale), scale * (ds.T @ v)

    def visit(carry, step):
        dv, dscale, (t_b, m_b, lse_b, g_b, dt_b) = carry
        chunks = _in_chunks(cfg, (t_b, m_b, _slot_ids(cfg, n, step), lse_b, g_b))
        (dv, dscale), dt_chunks = jax.lax.scan(tile, (dv, dscale), chunks)
        return dv, dscale, (t_b, m_b, lse_b, g_b, dt_b + dt_chunks.reshape(n, d))

    def ring_step(carry, step):
        dv, dscale, block = visit(carry, step)
        return (dv, dscale, _pass_on(block, cfg)), None

    # The texts move first, so that the ring ends with each block at home and its dt complete:
    # no trailing send, and every collective here depends on the one before.
    zeros = _vary(cfg, jnp.zeros((n, d), v.dtype))
    block = (*_pass_on((t, m, c_lse, g_col), cfg), zeros)
    carry0 = (zeros, _vary(cfg, jnp.zeros((), v.dtype)), block)
    carry, _ = jax.lax.scan(ring_step, carry0, jnp.arange(1, cfg.ndev))
    dv, dscale, (*_, dt) = visit(carry, cfg.ndev)
    return dv, dt, None, dscale


_ring.defvjp(_ring_fwd, _ring_bwd)


def _blockwise(v, t, valid, scale, *, axis, block_size, **kw):
    """Per-device body: v, t [b, K, D] (this device's images), valid [b, K], scale ()."""
    b, k, d = v.shape
    dt = contrastive._compute_dtype(v, t)
    n = b * k
    v = contrastive._normalize(v, dt)
    t = contrastive._normalize(t, dt)
    scale = jnp.asarray(scale, dt)
    ndev = 1 if axis is None else jax.lax.psum(1, axis)
    cfg = _Ring(axis=axis, ndev=ndev, k=k, chunk=_chunk(n, block_size), **kw)
    m = valid.reshape(n).astype(bool)
    # The scale is the same on every device; typed per device here, autodiff psums its cotangent.
    ring = _ring(cfg, v.reshape(n, d), t.reshape(n, d), m, _vary(cfg, scale))
    return _finish(v, t, valid, scale, ring, cfg)


def _finish(v, t, valid, scale, ring, cfg: _Ring):
    """The local (same-image) terms and the cross-device sums."""
    b, k, _ = v.shape
    n = b * k
    mode, alpha, beta = cfg.mode, cfg.alpha, cfg.beta
    lse_it, lse_ti, bce, r_hit, c_hit, neg_sum, neg_cnt = ring
    psum = (lambda x: x) if cfg.axis is None else (lambda x: jax.lax.psum(x, cfg.axis))
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
        lse_it, lse_ti = lse_it.reshape(b, k), lse_ti.reshape(b, k)
        l_it = lse_it - (q * s_img).sum(-1)
        l_ti = lse_ti - (q * jnp.swapaxes(s_img, 1, 2)).sum(-1)
        # Padded rows are dropped by the mean; `where` keeps their LSE out of the gradient.
        loss_it = mean(jnp.where(valid, l_it, 0.0).reshape(n))
        loss_ti = mean(jnp.where(valid, l_ti, 0.0).reshape(n))
        ent = -jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0).sum(-1)
        metrics["target_entropy"] = mean(ent.reshape(n))
    else:
        total = n * cfg.ndev
        loss_it = loss_ti = psum(bce) / (total * total)
    loss = 0.5 * (loss_it + loss_ti)
    out = {
        "loss_i2t": loss_it,
        "loss_t2i": loss_ti,
        "acc_i2t": mean(r_hit),
        "acc_t2i": mean(c_hit),
        "pos_sim": mean(jnp.diagonal(cos_img, axis1=1, axis2=2).reshape(n)),
        "neg_sim": psum(neg_sum) / jnp.maximum(psum(neg_cnt), 1.0),
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

    Same arguments, result and metrics as `contrastive.beta_cal` (visual, text [B, K, D],
    valid [B, K],
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
    """global_beta_cal with the settings of `config.loss` (loss.cal_scope="global")."""
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
