"""loss.global_gradient="local" against the reference's multi-GPU global loss, written in torch.

The reference computes, on each of R ranks, InfoNCE between its own B/R normalised CLS and
caption embeddings (live) and all B of the other modality gathered with an all_gather that has no
backward; DDP then averages the ranks' gradients. Here each rank's loss is formed from detached
copies of the gathered columns, summed with weight 1/R and differentiated by torch autograd:
an independent formulation of the same gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beta_clip_jax import losses, objective

B, D = 12, 6


def _reference_per_rank(image, text, log_scale, ranks):
    img = torch.tensor(image, dtype=torch.float64, requires_grad=True)
    txt = torch.tensor(text, dtype=torch.float64, requires_grad=True)
    log_s = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    s = log_s.exp()
    i_n, t_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    i_all, t_all = i_n.detach(), t_n.detach()  # all_gather: no gradient flows back
    per = B // ranks
    total = 0.0
    for r in range(ranks):
        rows = slice(r * per, (r + 1) * per)
        labels = torch.arange(r * per, (r + 1) * per)
        loss_r = 0.5 * (
            F.cross_entropy(s * i_n[rows] @ t_all.T, labels)
            + F.cross_entropy(s * t_n[rows] @ i_all.T, labels)
        )
        total = total + loss_r / ranks  # DDP averages the ranks' gradients
    total.backward()
    return total.item(), img.grad.numpy(), txt.grad.numpy(), float(log_s.grad)


def _ours(image, text, log_scale, gradient):
    def f(i, t, ls):
        return losses.clip_loss(i, t, jnp.exp(ls), gradient=gradient)[0]

    value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(
        jnp.asarray(image, jnp.float64), jnp.asarray(text, jnp.float64), jnp.float64(log_scale)
    )
    return float(value), *(np.asarray(g) for g in grads)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("ranks", [1, 3, 4])
def test_local_gradient_equals_per_rank_reference(ranks):
    rng = np.random.default_rng(ranks)
    image, text = rng.normal(size=(2, B, D))
    ref = _reference_per_rank(image, text, 2.3, ranks)
    ours = _ours(image, text, 2.3, "local")
    for r, o in zip(ref, ours, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-9, atol=1e-12)


def test_local_and_full_share_the_value_not_the_gradient():
    rng = np.random.default_rng(7)
    image, text = rng.normal(size=(2, B, D))
    full, local = _ours(image, text, 1.5, "full"), _ours(image, text, 1.5, "local")
    np.testing.assert_allclose(full[0], local[0], rtol=1e-12)
    # Full gradients also flow through the columns.
    assert np.abs(full[1] - local[1]).max() > 1e-3
    assert np.abs(full[2] - local[2]).max() > 1e-3


def test_objective_passes_the_setting():
    rng = np.random.default_rng(3)
    image, text = rng.normal(size=(2, B, D)).astype(np.float32)
    outputs = {"image": jnp.asarray(image), "text": jnp.asarray(text)[:, None]}
    outputs["logit_scale"] = jnp.float32(np.log(10.0))
    cfg = objective.default_loss_config()
    cfg.name = "clip"

    def grad_for(setting):
        cfg.global_gradient = setting

        def f(img):
            return objective.training_loss({**outputs, "image": img}, None, cfg)[0]

        return np.asarray(jax.grad(f)(outputs["image"]))

    expected = _ours(image.astype(np.float64), text.astype(np.float64), np.log(10.0), "local")
    np.testing.assert_allclose(grad_for("local"), expected[1], rtol=1e-4, atol=1e-6)
    assert np.abs(grad_for("full") - grad_for("local")).max() > 1e-4
    cfg.global_gradient = "half"
    with pytest.raises(ValueError, match="gradient must be one of"):
        objective.training_loss(outputs, None, cfg)
