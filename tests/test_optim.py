"""Optimiser groups, schedules, weight-decay mask and the frozen text positions."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from beta_clip_jax.optim import (
    decay_mask,
    group_labels,
    main_schedule,
    make_optimizer,
    optim_defaults,
    pooler_schedule,
)


def _params():
    return {
        "visual": {
            "proj": jnp.ones((4, 3)),
            "ln_pre": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        },
        "text": {"positional_embedding": jnp.ones((6, 4)), "dense": {"kernel": jnp.ones((4, 4))}},
        "pooler": {"fc1": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, "logit_scale": 2.0},
        "logit_scale": jnp.asarray(4.6),
    }


def test_groups_and_decay_mask():
    labels = group_labels(_params())
    assert labels["pooler"]["fc1"]["kernel"] == "pooler"
    assert labels["visual"]["proj"] == "main" and labels["logit_scale"] == "main"
    mask = decay_mask(_params())
    assert mask["visual"]["proj"] and mask["text"]["positional_embedding"]
    assert not mask["visual"]["ln_pre"]["scale"] and not mask["visual"]["ln_pre"]["bias"]
    assert not mask["pooler"]["logit_scale"] and not mask["logit_scale"]


def test_schedules_follow_reference_shape():
    cfg = optim_defaults()
    cfg.warmup_steps = 5
    sched = main_schedule(cfg, 100)
    assert float(sched(0)) == pytest.approx(1e-9, rel=1e-3)
    assert float(sched(5)) == pytest.approx(cfg.lr, rel=1e-6)
    assert float(sched(100)) == pytest.approx(cfg.final_lr, rel=1e-3)
    # Cosine: final + (base - final)(1 + cos(pi i / n)) / 2 after the warm-up.
    i, n = 50 - 5, 100 - 5
    want = cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + np.cos(np.pi * i / n))
    assert float(sched(50)) == pytest.approx(want, rel=1e-5)


def test_pooler_schedule_can_start_late():
    """With a start step the pooler's rate is 0 before it, then the same cosine shape over the
    remaining steps."""
    cfg = optim_defaults()
    plain = pooler_schedule(cfg, 60)
    late = pooler_schedule(cfg, 100, start_step=40)
    assert all(float(late(s)) == 0.0 for s in (0, 20, 39))
    for i in (0, 15, 30, 60):
        assert float(late(40 + i)) == pytest.approx(float(plain(i)), rel=1e-6)
    assert float(late(100)) == pytest.approx(cfg.pooler_final_lr, rel=1e-5)
    # No update and no weight decay while the rate is 0.
    tx, _ = make_optimizer(cfg, total_steps=100, frozen_positions=0, pooler_start_step=40)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(updates["pooler"]["fc1"]["kernel"]) and np.any(updates["visual"]["proj"])


def test_frozen_rows_never_change_and_groups_use_their_own_lr():
    cfg = optim_defaults()
    cfg.lr, cfg.final_lr, cfg.pooler_lr, cfg.pooler_final_lr = 1e-2, 1e-2, 1e-1, 1e-1
    cfg.warmup_steps = 0
    cfg.warmup_fraction = 0.0
    tx, _ = make_optimizer(cfg, total_steps=10, frozen_positions=2)
    params = _params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    new = params
    for _ in range(3):
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    pos0, pos1 = params["text"]["positional_embedding"], new["text"]["positional_embedding"]
    np.testing.assert_array_equal(pos1[:2], pos0[:2])  # frozen, weight decay included
    assert np.all(np.asarray(pos1[2:]) < np.asarray(pos0[2:]))
    # Adam's first steps move each weight by about lr: the pooler 10x more than the towers.
    d_pool = float(params["pooler"]["fc1"]["bias"][0] - new["pooler"]["fc1"]["bias"][0])
    d_main = float(params["visual"]["ln_pre"]["bias"][0] - new["visual"]["ln_pre"]["bias"][0])
    assert d_pool == pytest.approx(10 * d_main, rel=1e-3)


def test_grad_clip_optional():
    cfg = optim_defaults()
    cfg.grad_clip = 1.0
    tx, _ = make_optimizer(cfg, total_steps=10, frozen_positions=0)
    tx.init(_params())
    assert isinstance(cfg, ml_collections.ConfigDict)
