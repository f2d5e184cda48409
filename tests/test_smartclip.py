"""SmartCLIP: loss vs a float64 NumPy loop of its equations, straight-through mask, head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beta_clip_jax.methods import smartclip


def _np_smartclip(img, txt, mask, scale, valid, align_weight, sparse_weight):
    """Brute force: explicit masked cosines, loops over slots, images and captions."""
    img, txt, mask = (np.asarray(a, np.float64) for a in (img, txt, mask))
    b, k, d = txt.shape
    i2t, t2i, n = 0.0, 0.0, 0
    density = 0.0
    for s in range(k):
        sim = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                zi = img[i] * mask[j, s]
                sim[i, j] = zi @ txt[j, s] / (np.linalg.norm(zi) * np.linalg.norm(txt[j, s]))
        logits = scale * sim
        cols = [j for j in range(b) if valid[j, s]]
        for i in range(b):
            if not valid[i, s]:
                continue
            n += 1
            row = logits[i, cols]
            i2t += np.log(np.exp(row - row.max()).sum()) + row.max() - logits[i, i]
            col = logits[:, i]
            t2i += np.log(np.exp(col - col.max()).sum()) + col.max() - logits[i, i]
            density += mask[i, s].sum() / d
    return align_weight * (i2t + t2i) / n + sparse_weight * density / n, i2t / n, t2i / n


def _inputs(b=5, k=3, d=16, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(b, d)).astype(np.float32)
    txt = rng.normal(size=(b, k, d)).astype(np.float32)
    mask = (rng.random((b, k, d)) < 0.6).astype(np.float32)
    mask[:, :, 0] = 1.0  # no empty mask, so the reference's cosines are defined
    valid = rng.random((b, k)) < 0.7
    valid[1, -1] = False
    valid[:, 0] = True
    return img, txt, mask, valid


def test_loss_matches_numpy_reference_with_padding():
    img, txt, mask, valid = _inputs()
    loss, metrics = smartclip.smartclip_loss(
        img, txt, mask, 7.5, valid, align_weight=0.8, sparse_weight=0.3
    )
    ref, ref_i2t, ref_t2i = _np_smartclip(img, txt, mask, 7.5, valid, 0.8, 0.3)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["smartclip_i2t"]), ref_i2t, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["smartclip_t2i"]), ref_t2i, rtol=1e-5)


def test_all_ones_mask_is_clip_loss():
    img, txt, _, _ = _inputs(k=1)
    txt = txt[:, 0]
    loss, _ = smartclip.smartclip_loss(img, txt, np.ones_like(txt), 10.0, sparse_weight=0.0)
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = 10.0 * a.astype(np.float64) @ t.T

    def ce(x):
        return np.mean(np.log(np.exp(x).sum(1)) - np.diag(x))

    np.testing.assert_allclose(float(loss), 0.5 * (ce(logits) + ce(logits.T)), rtol=1e-5)


def test_straight_through_forward_hard_backward_sigmoid():
    logits = jnp.linspace(-3.0, 3.0, 13) + 0.01
    weights = jnp.arange(13.0)

    def f(x):
        return jnp.sum(weights * smartclip.straight_through_mask(jax.nn.sigmoid(x)))

    m = smartclip.straight_through_mask(jax.nn.sigmoid(logits))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(logits > 0, np.float32))
    sig = jax.nn.sigmoid(logits)
    np.testing.assert_allclose(jax.grad(f)(logits), weights * sig * (1 - sig), rtol=1e-6)


def test_loss_gradients_finite_with_empty_mask():
    img, txt, mask, valid = _inputs()
    mask[2, 1] = 0.0  # an all-off mask must not give NaN

    def f(i, t, x):
        m = smartclip.straight_through_mask(jax.nn.sigmoid(x))
        return smartclip.smartclip_loss(i, t, m, 5.0, valid)[0]

    x = jnp.where(mask > 0, 1.0, -1.0)
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(img, txt, x)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    assert float(jnp.abs(grads[2]).sum()) > 0


def test_mask_head_shapes_init_padding_and_grads():
    b, k, length, width, d = 2, 3, 6, 16, 8
    rng = np.random.default_rng(1)
    states = jnp.asarray(rng.normal(size=(b, k, length, width)), jnp.float32)
    tok_valid = jnp.arange(length)[None, None, :] < jnp.array([[6, 3, 1], [4, 2, 5]])[..., None]
    head = smartclip.MaskHead(embed_dim=d, num_heads=2)
    params = nn.unbox(jax.jit(head.init)(jax.random.key(0), states, tok_valid)["params"])
    run = jax.jit(lambda p, x: head.apply({"params": p}, x, tok_valid))
    mask, probs = run(params, states)
    assert mask.shape == probs.shape == (b, k, d)
    np.testing.assert_array_equal(np.asarray(mask), 1.0)  # starts as plain CLIP

    # Give the output layer weights; padded token states must then still not matter.
    params["out"]["kernel"] = jnp.asarray(rng.normal(size=(width, d)), jnp.float32)
    params["out"]["bias"] = jnp.zeros((d,))
    m1, p1 = run(params, states)
    _, p2 = run(params, jnp.where(tok_valid[..., None], states, 100.0))
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-6)
    assert set(np.unique(np.asarray(m1))) <= {0.0, 1.0}
    assert 0 < float(m1.mean()) < 1

    img = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    txt = jnp.asarray(rng.normal(size=(b, k, d)), jnp.float32)

    @jax.jit
    @jax.grad
    def grad_fn(p):
        m, _ = head.apply({"params": p}, states, tok_valid)
        return smartclip.smartclip_loss(img, txt, m, 5.0)[0]

    grads = grad_fn(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["out"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["attn"]["query"]["kernel"]).sum()) > 0
