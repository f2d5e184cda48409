"""Holistic CLIP: M2M loss vs a float64 NumPy loop, fusion, CLS attention mask, branched blocks."""

import flax.linen as nn
import holistic_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beta_clip_jax.methods import holistic
from beta_clip_jax.models.layers import ResidualBlock


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lse(x):
    return np.log(np.exp(x - x.max()).sum()) + x.max()


def _np_m2m(img, txt, scale, valid, pairing, margin=0.7, weight=1.0):
    """The released code's rule, written as loops over slots, images and captions."""
    v, t = _unit(img), _unit(txt)
    b, k, _ = v.shape
    m = t.shape[1]
    assign = np.zeros((b, m), int)
    for s in range(m):
        for i in range(b):
            argmax = int(np.argmax([v[i, kk] @ t[i, s] for kk in range(k)]))
            fixed = pairing == "fixed" or (pairing == "auto" and k <= m and s < k)
            assign[i, s] = s if fixed else argmax
    i2t = t2i = 0.0
    n = 0
    for s in range(m):
        for i in range(b):
            if not valid[i, s]:
                continue
            n += 1
            row = [scale * v[i, assign[i, s]] @ t[j, s] for j in range(b) if valid[j, s]]
            pos = scale * v[i, assign[i, s]] @ t[i, s]
            i2t += _lse(np.array(row)) - pos
            col = [scale * v[ii, assign[i, s]] @ t[i, s] for ii in range(b)]
            t2i += _lse(np.array(col)) - pos
    loss = 0.5 * (i2t + t2i) / n
    if k > 1:
        off = np.mean(
            [v[bb, p] @ v[bb, q] for p in range(k) for q in range(k) if p != q for bb in range(b)]
        )
        loss += weight * max(off - margin, 0.0)
    return loss


def _inputs(b, k, m, seed=0, pad=True):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(b, k, 8)).astype(np.float32)
    txt = rng.normal(size=(b, m, 8)).astype(np.float32)
    valid = np.ones((b, m), bool)
    if pad:
        valid[1, -1] = valid[3, 0] = False
    return img, txt, valid


@pytest.mark.parametrize(
    "k,m,pairing",
    [(3, 3, "auto"), (2, 4, "auto"), (4, 2, "auto"), (3, 3, "argmax"), (3, 2, "fixed")],
)
def test_m2m_matches_numpy_reference(k, m, pairing):
    img, txt, valid = _inputs(5, k, m, seed=k * 10 + m)
    # A low margin keeps the diversity hinge active on random vectors.
    loss_fn = jax.jit(lambda *a: holistic.m2m_loss(*a, pairing=pairing, diversity_margin=-0.1)[0])
    loss = loss_fn(img, txt, 6.0, valid)
    ref = _np_m2m(img, txt, 6.0, valid, pairing, margin=-0.1)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_single_branch_single_caption_is_clip_loss():
    img, txt, _ = _inputs(6, 1, 1, pad=False)
    loss, metrics = holistic.m2m_loss(img, txt, 9.0)
    logits = 9.0 * _unit(img[:, 0]) @ _unit(txt[:, 0]).T
    ce = [_lse(r) - r[i] for i, r in enumerate(logits)]
    ce_t = [_lse(c) - c[i] for i, c in enumerate(logits.T)]
    np.testing.assert_allclose(float(loss), 0.5 * (np.mean(ce) + np.mean(ce_t)), rtol=1e-5)
    assert float(metrics["m2m_diversity"]) == 0.0


def test_argmax_gradient_only_through_chosen_branch():
    img, txt, _ = _inputs(4, 3, 1, pad=False)
    img[:, 0] = txt[:, 0] + 0.01  # every sample's best branch is 0
    assign = holistic.branch_assignment(_unit(img), _unit(txt), "argmax")
    np.testing.assert_array_equal(np.asarray(assign), 0)

    grad_fn = jax.jit(jax.grad(lambda x: holistic.m2m_loss(x, txt, 5.0, diversity_weight=0.0)[0]))
    g = np.asarray(grad_fn(jnp.asarray(img)))
    assert np.isfinite(g).all()
    assert np.abs(g[:, 0]).sum() > 0
    np.testing.assert_array_equal(g[:, 1:], 0.0)


def test_fusion_is_mean_of_branch_cosines():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(4, 3, 6)), rng.normal(size=(5, 6))
    per_branch = np.einsum("nke,te->nkt", _unit(img), _unit(txt))
    np.testing.assert_allclose(holistic.fused_logits(img, txt), per_branch.mean(1), rtol=1e-5)
    np.testing.assert_allclose(
        holistic.fused_logits(img, txt, mode="max", branches=[0, 2]),
        per_branch[:, [0, 2]].max(1),
        rtol=1e-5,
    )
    fused = np.asarray(holistic.fuse_branches(img, branches=[1, 2]))
    np.testing.assert_allclose(fused @ _unit(txt).T, per_branch[:, 1:].mean(1), rtol=1e-5)


def test_cls_mask_blocks_cls_to_cls_attention():
    k, p, w, heads = 3, 4, 8, 2
    rng = np.random.default_rng(3)
    patches = jnp.asarray(rng.normal(size=(2, p, w)), jnp.float32)
    tokens_mod = holistic.MultiClassTokens(k)
    params = nn.unbox(jax.jit(tokens_mod.init)(jax.random.key(0), patches)["params"])
    mask = holistic.cls_attention_mask(k, k + p)

    @jax.jit
    def attend(prm):
        x = tokens_mod.apply({"params": prm}, patches)
        q = x.reshape(2, k + p, heads, w // heads)
        weights = nn.dot_product_attention_weights(q, q, mask=mask)
        return weights, jax.nn.dot_product_attention(q, q, q, mask=mask)

    weights, out = attend(params)
    assert weights.shape == (2, heads, k + p, k + p)
    off_diag_cls = ~np.eye(k, dtype=bool)
    assert np.all(np.asarray(weights[:, :, :k, :k])[:, :, off_diag_cls] == 0.0)
    assert np.all(np.asarray(weights[:, :, k:, :]) > 0.0)  # patches see every token

    # Moving CLS 1 leaves CLS 0 and 2 unchanged and changes the patches.
    moved = jax.tree.map(lambda a: a, params)
    moved["class_embedding"] = params["class_embedding"].at[1].add(1.0)
    _, out2 = attend(moved)
    np.testing.assert_allclose(out2[:, [0, 2]], out[:, [0, 2]], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(out2[:, k:] - out[:, k:]).max()) > 1e-4

    bias = np.asarray(holistic.cls_attention_bias(k, k + p))[0, 0]
    assert bias[:k, :k][off_diag_cls].tolist() == [1.0] * (k * k - k)
    assert bias.sum() == k * k - k


def test_branched_mlp_with_equal_fc2_is_plain_mlp():
    k, w = 3, 8
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, k, 5, w)), jnp.float32)
    mlp = holistic_reference.BranchedMLP(k)
    params = nn.unbox(jax.jit(mlp.init)(jax.random.key(0), x)["params"])
    params["fc2_kernel"] = jnp.broadcast_to(params["fc2_kernel"][0], params["fc2_kernel"].shape)
    params["fc2_bias"] = jnp.asarray(rng.normal(size=(w,)), jnp.float32) * jnp.ones((k, 1))
    out = jax.jit(mlp.apply)({"params": params}, x)
    xn = np.asarray(x, np.float64)
    h = xn @ params["fc1"]["kernel"] + params["fc1"]["bias"]
    h = h / (1 + np.exp(-1.702 * h))
    want = h @ np.asarray(params["fc2_kernel"][0]) + np.asarray(params["fc2_bias"][0])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_branched_block_from_pretrained_block_equals_it_per_branch():
    k, w, heads = 3, 16, 2
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 7, w)), jnp.float32)
    block = ResidualBlock(w, heads, mode="full")
    bp = nn.unbox(jax.jit(block.init)(jax.random.key(1), x)["params"])
    # Non-zero biases, so a mis-mapped bias would show.
    bp = jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(np.float32), bp)
    branched = holistic_reference.BranchedBlock(heads, k)
    params = holistic_reference.branched_block_params(bp, k)
    run = jax.jit(lambda p, y: branched.apply({"params": p}, holistic.split_branches(y, k)))
    got = run(params, x)
    want = jax.jit(block.apply)({"params": bp}, x)
    for i in range(k):
        np.testing.assert_allclose(got[:, i], want, rtol=1e-5, atol=1e-5)

    # The branched tree has exactly the shapes BranchedBlock creates itself.
    fresh = jax.eval_shape(branched.init, jax.random.key(0), holistic.split_branches(x, k))
    shapes = jax.tree.map(jnp.shape, nn.unbox(fresh["params"]))
    assert jax.tree.map(jnp.shape, params) == shapes
    # Distinct fc2 per branch: only that branch changes.
    params["mlp"]["fc2_bias"] = params["mlp"]["fc2_bias"].at[1].add(1.0)
    got2 = run(params, x)
    np.testing.assert_allclose(got2[:, 0], got[:, 0], rtol=1e-6)
    np.testing.assert_allclose(got2[:, 1], got[:, 1] + 1.0, rtol=1e-5, atol=1e-5)
