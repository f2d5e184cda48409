"""Losses against float64 NumPy loops written from the equations (docs/methods.md), plus limits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beta_clip_jax import losses
from beta_clip_jax.methods import siglip

B, K, D = 3, 4, 5


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def ref_beta_cal(visual, text, valid, s, beta, mode, alpha=1.0, mask_padding=True):
    """Entry-by-entry transcription of the β-CAL equations (docs/methods.md), float64."""
    b, k, d = visual.shape
    n = b * k
    v = _unit(np.asarray(visual, np.float64).reshape(n, d))
    t = _unit(np.asarray(text, np.float64).reshape(n, d))
    m = np.asarray(valid).reshape(n)
    img = [i // k for i in range(n)]

    def w(i, j):
        if not (m[i] and m[j]):
            return 0.0
        return alpha if i == j else (beta if img[i] == img[j] else 0.0)

    def logit(i, j, i2t):
        return s * float(v[i] @ t[j]) if i2t else s * float(v[j] @ t[i])

    out = {}
    if mode == "ce":
        ent, dirs = [], {True: [], False: []}
        for i in range(n):
            if not m[i]:
                continue
            row_w = [w(i, j) for j in range(n)]
            q = [x / max(sum(row_w), 1e-8) for x in row_w]
            ent.append(-sum(x * math.log(x) for x in q if x > 0))
            cols = [j for j in range(n) if m[j] or not mask_padding]
            for i2t in (True, False):
                lse = math.log(sum(math.exp(logit(i, j, i2t)) for j in cols))
                dirs[i2t].append(-sum(q[j] * (logit(i, j, i2t) - lse) for j in cols))
        out["target_entropy"] = np.mean(ent)
        l_it, l_ti = np.mean(dirs[True]), np.mean(dirs[False])
    else:
        tot = {True: 0.0, False: 0.0}
        for i in range(n):
            for j in range(n):
                if not (m[i] and m[j]):
                    continue  # weight 0 (and padded columns sit at -1e9: contribute 0 anyway)
                y = 1.0 if img[i] == img[j] else 0.0
                om = 1.0 if i == j else (beta if img[i] == img[j] else 1.0)
                for i2t in (True, False):
                    x = logit(i, j, i2t)
                    tot[i2t] += om * (_softplus(x) - x * y)
        l_it, l_ti = tot[True] / n**2, tot[False] / n**2
    out["loss"] = 0.5 * (l_it + l_ti)
    out["loss_i2t"], out["loss_t2i"] = l_it, l_ti
    out["pos_sim"] = np.mean([v[i] @ t[i] for i in range(n) if m[i]])
    neg = [v[i] @ t[j] for i in range(n) for j in range(n) if m[i] and m[j] and img[i] != img[j]]
    out["neg_sim"] = np.mean(neg)
    return out


def _case(seed=0, b=B, k=K, d=D):
    rng = np.random.default_rng(seed)
    visual = rng.normal(size=(b, k, d)).astype(np.float32)
    text = rng.normal(size=(b, k, d)).astype(np.float32)
    valid = rng.random((b, k)) < 0.7
    valid[:, 0] = True  # the caption slot is always there ...
    valid[-1] = False  # ... except in a fully padded image
    valid[0, 1] = True
    return visual, text, valid


@pytest.mark.parametrize("mask_padding", [True, False])
@pytest.mark.parametrize("mode", ["ce", "bce"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_cal_matches_numpy(beta, mode, mask_padding):
    visual, text, valid = _case()
    s = 7.3
    loss, met = losses.beta_cal(
        visual, text, valid, s, beta=beta, mode=mode, mask_padding=mask_padding
    )
    ref = ref_beta_cal(visual, text, valid, s, beta, mode, mask_padding=mask_padding)
    assert loss.dtype == jnp.float32
    for key, val in ref.items():
        np.testing.assert_allclose(float(met.get(key, loss)), val, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(met["scale"]), s, rtol=1e-6)


def test_alpha_enters_the_targets():
    visual, text, valid = _case(2)
    loss, _ = losses.beta_cal(visual, text, valid, 5.0, beta=0.5, mode="ce", alpha=2.0)
    ref = ref_beta_cal(visual, text, valid, 5.0, 0.5, "ce", alpha=2.0)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)


def test_accuracy_metric():
    # Identical visual and text vectors: every row's argmax is its own diagonal.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(B, K, 16)).astype(np.float32)
    valid = np.ones((B, K), bool)
    _, met = losses.beta_cal(x, x, valid, 10.0, beta=0.0, mode="ce")
    assert float(met["acc_i2t"]) == 1.0 and float(met["acc_t2i"]) == 1.0
    # Text of image b paired with visual of image b+1: argmax lands on another image.
    _, met = losses.beta_cal(x, np.roll(x, 1, axis=0), valid, 10.0, beta=1.0, mode="bce")
    assert float(met["acc_i2t"]) == 0.0 and float(met["acc_t2i"]) == 0.0


@pytest.mark.parametrize(
    "mode,beta,mask_padding", [("ce", 0.5, True), ("ce", 1.0, False), ("bce", 0.5, True)]
)
def test_beta_cal_gradients_match_finite_differences(mode, beta, mask_padding):
    visual, text, valid = _case(1, b=2, k=3, d=3)
    valid[-1] = [True, False, True]
    s = 4.0

    def jloss(v, t, sc):
        return losses.beta_cal(v, t, valid, sc, beta=beta, mode=mode, mask_padding=mask_padding)[0]

    with jax.enable_x64(True):
        args = (visual.astype(np.float64), text.astype(np.float64), np.float64(s))
        grads = jax.grad(jloss, argnums=(0, 1, 2))(*args)
        assert all(g.dtype == jnp.float64 for g in grads)
    grads = [np.asarray(g) for g in grads]
    assert all(np.all(np.isfinite(g)) for g in grads)

    def nloss(v, t, sc):
        return ref_beta_cal(v, t, valid, sc, beta, mode, mask_padding=mask_padding)["loss"]

    eps = 1e-6
    for a in range(3):
        base = [np.array(x, np.float64) for x in args]
        flat = base[a].reshape(-1)
        for idx in range(flat.size):
            plus = [x.copy() for x in base]
            minus = [x.copy() for x in base]
            plus[a].reshape(-1)[idx] += eps
            minus[a].reshape(-1)[idx] -= eps
            fd = (nloss(*plus) - nloss(*minus)) / (2 * eps)
            np.testing.assert_allclose(grads[a].reshape(-1)[idx], fd, atol=1e-7, rtol=1e-5)
    # Padded slots get no gradient when they are masked out of everything.
    if mask_padding:
        assert not np.any(grads[0][~valid]) and not np.any(grads[1][~valid])


def test_ce_beta_zero_is_infonce_with_one_positive():
    visual, text, valid = _case(4)
    s = 6.0
    loss, _ = losses.beta_cal(visual, text, valid, s, beta=0.0, mode="ce")
    v = _unit(visual.reshape(-1, D).astype(np.float64))
    t = _unit(text.reshape(-1, D).astype(np.float64))
    m = valid.reshape(-1)
    logits = s * v[m] @ t[m].T  # only valid rows and columns exist when padding is masked
    diag = np.diag(logits)
    lse_r = np.log(np.exp(logits).sum(1))
    lse_c = np.log(np.exp(logits).sum(0))
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(lse_r - diag + lse_c - diag), rtol=1e-5)
    # With one text per image and nothing padded, β-CAL is exactly the CLIP loss.
    one = np.ones((B, 1), bool)
    for beta in (0.0, 0.7):
        cal, _ = losses.beta_cal(visual[:, :1], text[:, :1], one, s, beta=beta, mode="ce")
        clip, _ = losses.clip_loss(visual[:, 0], text[:, 0], s)
        np.testing.assert_allclose(float(cal), float(clip), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bce_directions_equal_ce_not(beta):
    visual, text, valid = _case(5)
    _, met = losses.beta_cal(visual, text, valid, 9.0, beta=beta, mode="bce")
    np.testing.assert_allclose(float(met["loss_i2t"]), float(met["loss_t2i"]), rtol=1e-6)
    _, met = losses.beta_cal(visual, text, valid, 9.0, beta=beta, mode="ce")
    assert abs(float(met["loss_i2t"]) - float(met["loss_t2i"])) > 1e-3


@pytest.mark.parametrize("mode", ["ce", "bce"])
def test_padded_slots_contribute_nothing(mode):
    visual, text, valid = _case(6)
    base, _ = losses.beta_cal(visual, text, valid, 8.0, beta=0.5, mode=mode)
    rng = np.random.default_rng(7)
    v2, t2 = visual.copy(), text.copy()
    v2[~valid] = 100 * rng.normal(size=v2[~valid].shape)
    t2[~valid] = 100 * rng.normal(size=t2[~valid].shape)
    moved, _ = losses.beta_cal(v2, t2, valid, 8.0, beta=0.5, mode=mode)
    np.testing.assert_allclose(float(moved), float(base), rtol=1e-6)
    if mode == "ce":  # the reference's unmasked columns do see padded slots
        a, _ = losses.beta_cal(visual, text, valid, 8.0, beta=0.5, mode=mode, mask_padding=False)
        b, _ = losses.beta_cal(v2, t2, valid, 8.0, beta=0.5, mode=mode, mask_padding=False)
        assert abs(float(a) - float(b)) > 1e-4


def test_all_padded_group_is_finite_zero():
    visual, text, _ = _case(8)
    for mode in ("ce", "bce"):
        loss, met = losses.beta_cal(visual, text, np.zeros((B, K), bool), 5.0, beta=0.5, mode=mode)
        assert float(loss) == 0.0
        assert all(np.isfinite(float(x)) for x in met.values())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_ce_loss_is_at_least_target_entropy(beta):
    for seed in range(3):
        visual, text, valid = _case(seed)
        for s in (1.0, 30.0, 100.0):
            loss, met = losses.beta_cal(visual, text, valid, s, beta=beta, mode="ce")
            assert float(loss) >= float(met["target_entropy"]) - 1e-6
    # The worked example of docs/methods.md: 36 valid texts, β = 0.5 -> floor 3.574 nats.
    x = np.random.default_rng(0).normal(size=(2, 36, 8)).astype(np.float32)
    _, met = losses.beta_cal(x, x, np.ones((2, 36), bool), 1.0, beta=0.5, mode="ce")
    np.testing.assert_allclose(float(met["target_entropy"]), 3.574, atol=1e-3)


def test_bfloat16_inputs_give_float32_loss():
    visual, text, valid = _case(9)
    loss32, _ = losses.beta_cal(visual, text, valid, 5.0, beta=0.5, mode="ce")
    loss16, _ = losses.beta_cal(
        jnp.asarray(visual, jnp.bfloat16),
        jnp.asarray(text, jnp.bfloat16),
        valid,
        5.0,
        beta=0.5,
        mode="ce",
    )
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)


def test_clip_loss_matches_numpy():
    rng = np.random.default_rng(10)
    img, txt = rng.normal(size=(2, 6, D)).astype(np.float32)
    s = 12.0
    loss, met = losses.clip_loss(img, txt, s)
    i, t = _unit(img.astype(np.float64)), _unit(txt.astype(np.float64))
    terms = []
    for a in range(6):
        row = [s * i[a] @ t[c] for c in range(6)]
        col = [s * i[c] @ t[a] for c in range(6)]
        terms.append(math.log(sum(map(math.exp, row))) - row[a])
        terms.append(math.log(sum(map(math.exp, col))) - col[a])
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
    cos = i @ t.T
    np.testing.assert_allclose(float(met["pos_sim"]), np.mean(np.diag(cos)), rtol=1e-5)
    np.testing.assert_allclose(float(met["neg_sim"]), cos[~np.eye(6, dtype=bool)].mean(), atol=1e-6)
    acc = np.mean(np.argmax(cos, 1) == np.arange(6))
    np.testing.assert_allclose(float(met["acc_i2t"]), acc)


def test_siglip_loss_matches_numpy():
    rng = np.random.default_rng(11)
    img, txt = rng.normal(size=(2, 5, D)).astype(np.float32)
    s, bias = 10.0, -3.0
    loss, met = siglip.siglip_loss(img, txt, s, bias)
    i, t = _unit(img.astype(np.float64)), _unit(txt.astype(np.float64))
    tot = 0.0
    for a in range(5):
        for c in range(5):
            z = 1.0 if a == c else -1.0
            tot += _softplus(-z * (s * i[a] @ t[c] + bias))  # -log sigmoid(z x)
    np.testing.assert_allclose(float(loss), tot / 5, rtol=1e-5)
    assert float(met["bias"]) == bias
