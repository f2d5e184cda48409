"""training_loss: composition, clamping, group checks, mesh independence and linear memory."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from beta_clip_jax import losses, objective
from beta_clip_jax.losses import cal
from beta_clip_jax.methods import siglip
from beta_clip_jax.models.pooler import TextConditionedPooler

K, E = 5, 8


def _outputs(b, seed=0, log_g=2.0, log_c=2.5):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    valid = rng.random((b, K)) < 0.7
    valid[:, 0] = True
    outputs = {
        "image": f(b, E),
        "text": f(b, K, E),
        "pooled": f(b, K, E),
        "logit_scale": np.float32(log_g),
        "pooler_logit_scale": np.float32(log_c),
    }
    return outputs, valid


def _cfg(**kw):
    cfg = objective.default_loss_config()
    cfg.update(kw)
    return cfg


def test_default_config_is_the_reference():
    cfg = objective.default_loss_config()
    assert (cfg.name, cfg.mode, cfg.beta, cfg.alpha, cfg.mask_padding) == (
        "beta_clip",
        "ce",
        0.5,
        1.0,
        True,
    )
    assert (cfg.group_size, cfg.global_weight, cfg.cal_weight) == (64, 1.0, 1.0)


@pytest.mark.parametrize("mode", ["ce", "bce"])
def test_training_loss_is_global_plus_mean_group_cal(mode):
    out, valid = _outputs(6, log_g=7.0, log_c=-1.0)  # both outside [0, ln 100]: clamped
    cfg = _cfg(mode=mode, group_size=2, global_weight=0.3, cal_weight=2.0)
    loss, met = objective.training_loss(out, valid, cfg)
    g, _ = losses.clip_loss(out["image"], out["text"][:, 0], 100.0)
    cal = [
        losses.beta_cal(
            out["pooled"][i : i + 2],
            out["text"][i : i + 2],
            valid[i : i + 2],
            1.0,
            beta=0.5,
            mode=mode,
        )[0]
        for i in range(0, 6, 2)
    ]
    np.testing.assert_allclose(float(loss), 0.3 * float(g) + 2.0 * np.mean(cal), rtol=1e-5)
    np.testing.assert_allclose(float(met["loss_global"]), float(g), rtol=1e-6)
    np.testing.assert_allclose(float(met["loss_cal"]), np.mean(cal), rtol=1e-5)
    np.testing.assert_allclose(float(met["temperature_global"]), 0.01, rtol=1e-5)
    np.testing.assert_allclose(float(met["temperature_cal"]), 1.0, rtol=1e-6)
    assert float(met["loss"]) == float(loss)
    for key in ("global/acc_i2t", "cal/acc_t2i", "cal/pos_sim", "cal/neg_sim", "cal/scale"):
        assert key in met and np.shape(met[key]) == ()
    assert ("cal/target_entropy" in met) == (mode == "ce")


def test_clip_and_siglip_objectives():
    out, valid = _outputs(4)
    s_g = math.exp(2.0)
    loss, met = objective.training_loss(out, valid, _cfg(name="clip"))
    ref, _ = losses.clip_loss(out["image"], out["text"][:, 0], s_g)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    assert "loss_cal" not in met
    with pytest.raises(ValueError, match="logit_bias"):
        objective.training_loss(out, valid, _cfg(name="siglip"))
    out["logit_bias"] = np.float32(-5.0)
    loss, _ = objective.training_loss(out, valid, _cfg(name="siglip"))
    ref, _ = siglip.siglip_loss(out["image"], out["text"][:, 0], s_g, -5.0)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        objective.training_loss(out, valid, _cfg(name="nope"))


def test_group_size_must_divide_batch():
    out, valid = _outputs(6)
    with pytest.raises(ValueError, match=r"batch size 6 .*group_size 4"):
        objective.training_loss(out, valid, _cfg(group_size=4))
    with pytest.raises(ValueError, match="group_size 4"):  # also when traced under jit
        jax.jit(lambda o, v: objective.training_loss(o, v, _cfg(group_size=4)))(out, valid)


def test_clamp_log_temperatures():
    params = {"logit_scale": jnp.float32(9.0), "pooler": {"logit_scale": jnp.float32(-2.0), "w": 1}}
    out = objective.clamp_log_temperatures(params)
    np.testing.assert_allclose(float(out["logit_scale"]), math.log(100.0), rtol=1e-6)
    assert float(out["pooler"]["logit_scale"]) == 0.0 and out["pooler"]["w"] == 1
    assert float(params["logit_scale"]) == 9.0  # the input is not modified
    boxed = {
        "logit_scale": nn.LogicallyPartitioned(jnp.float32(3.0), ()),
        "pooler": {"logit_scale": nn.LogicallyPartitioned(jnp.float32(5.0), ())},
    }
    out = objective.clamp_log_temperatures(boxed)
    assert isinstance(out["pooler"]["logit_scale"], nn.LogicallyPartitioned)
    assert float(out["logit_scale"].unbox()) == 3.0
    np.testing.assert_allclose(float(out["pooler"]["logit_scale"].unbox()), math.log(100.0))


@pytest.mark.parametrize("group_size", [2, 4])
def test_same_value_on_one_device_and_sharded_over_eight(group_size):
    assert jax.device_count() == 8
    b = 16
    out, valid = _outputs(b, seed=3)
    cfg = _cfg(group_size=group_size)
    fn = lambda o, v: objective.training_loss(o, v, cfg)
    grad_fn = jax.grad(lambda o, v: fn(o, v)[0])

    single = jax.jit(fn)(out, valid)
    single_grad = jax.jit(grad_fn)(out, valid)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    out_sh = {k: (rep if np.ndim(x) == 0 else data) for k, x in out.items()}
    sharded = jax.jit(fn, in_shardings=(out_sh, data))(out, valid)
    sharded_grad = jax.jit(grad_fn, in_shardings=(out_sh, data))(out, valid)

    np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-5, atol=1e-6)
    for key in single[1]:
        np.testing.assert_allclose(float(sharded[1][key]), float(single[1][key]), atol=1e-5)
    for key in ("pooled", "text", "image"):
        np.testing.assert_allclose(sharded_grad[key], single_grad[key], atol=1e-6)


# ---- memory: pooler + grouped β-CAL is linear in the number of groups ---------------------

GROUP, MK, MP, ME = 16, 6, 9, 16


def _pool_and_cal(group_size):
    model = TextConditionedPooler(num_heads=4)
    cfg = _cfg(group_size=group_size)

    def f(params, text, patches, valid):
        pooled, _ = model.apply(params, text, patches)
        return cal.grouped_beta_cal(pooled, text, valid, 10.0, cfg)[0]

    params = jax.eval_shape(
        model.init, jax.random.key(0), jnp.ones((1, MK, ME)), jnp.ones((1, MP, ME))
    )
    return jax.grad(f), params


def _abstract_args(b):
    return (
        jax.ShapeDtypeStruct((b, MK, ME), jnp.float32),
        jax.ShapeDtypeStruct((b, MP, ME), jnp.float32),
        jax.ShapeDtypeStruct((b, MK), jnp.bool_),
    )


def _temp_bytes(fn, params, b):
    return (
        jax.jit(fn).lower(params, *_abstract_args(b)).compile().memory_analysis().temp_size_in_bytes
    )


def _all_dims(jaxpr):
    """Every dimension of every value produced anywhere in a (nested) jaxpr."""
    dims = set()
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            dims.update(getattr(var.aval, "shape", ()))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    dims |= _all_dims(inner)
    return dims


def test_memory_grows_linearly_with_groups(capsys):
    fn, params = _pool_and_cal(GROUP)
    temps = {g: _temp_bytes(fn, params, g * GROUP) for g in (1, 2, 4, 8)}
    # One big group of the same 8*GROUP images: what an ungrouped N x N loss would need.
    big_fn, _ = _pool_and_cal(8 * GROUP)
    big = _temp_bytes(big_fn, params, 8 * GROUP)
    with capsys.disabled():
        print(f"\ntemp bytes by groups {temps}; one group of {8 * GROUP} images: {big}")
    assert temps[1] < temps[2] < temps[4] < temps[8]
    assert temps[8] / temps[1] <= 10.0  # linear is 8, quadratic would be 64
    assert big / temps[8] > 3.0  # the measurement does see the quadratic cost

    for g in (2, 8):
        jaxpr = jax.make_jaxpr(fn)(params, *_abstract_args(g * GROUP)).jaxpr
        assert g * GROUP * MK not in _all_dims(jaxpr), f"a cross-group tensor exists at G={g}"
    # The check can fail: a single group over the whole batch does build N x N with N = B*K.
    jaxpr = jax.make_jaxpr(big_fn)(params, *_abstract_args(8 * GROUP)).jaxpr
    assert 8 * GROUP * MK in _all_dims(jaxpr)


@pytest.mark.parametrize("mode", ["ce", "bce"])
def test_cal_start_step_switches_beta_cal_on(mode):
    """Before loss.cal_start_step the objective is the global InfoNCE alone (and β-CAL gives no
    gradient); from that step on it is the full objective."""
    out, valid = _outputs(4)
    full, met = objective.training_loss(out, valid, _cfg(mode=mode, group_size=2))
    cfg = _cfg(mode=mode, group_size=2, cal_start_step=10)
    before, met_before = objective.training_loss(out, valid, cfg, step=9)
    after, _ = objective.training_loss(out, valid, cfg, step=jnp.asarray(10))
    np.testing.assert_allclose(before, met["loss_global"], rtol=1e-6)
    np.testing.assert_allclose(after, full, rtol=1e-6)
    assert float(met_before["loss_cal"]) > 0  # still logged

    def pooled_grad(step):
        fn = lambda pooled: objective.training_loss({**out, "pooled": pooled}, valid, cfg, step)[0]
        return jax.grad(fn)(out["pooled"])

    assert not np.any(pooled_grad(9)) and np.any(pooled_grad(10))
    with pytest.raises(ValueError, match="cal_start_step"):
        objective.training_loss(out, valid, cfg)
