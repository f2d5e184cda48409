"""Locked towers (optim.lock_image / lock_text): frozen values never move, hold no optimiser
moments and have no backward pass; an unlocked run's optimiser is exactly the two-group one.

Two tiny train steps are compiled (locked image; both towers locked with one block unlocked);
the cost comparison and the 8-device check only lower the step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_tiny import random_images, random_params, random_tokens
from train_helpers import tiny_config

from beta_clip_jax import optim, sharding
from beta_clip_jax import step as step_lib
from beta_clip_jax.config_check import resolve_config
from beta_clip_jax.methods import build_model
from beta_clip_jax.models.clip import param_shapes

STEPS = 5
SENTENCES, PHRASES, LENGTH = 2, 3, 12  # caption + 1 sentence, 3 phrases


def _config(**optim_fields):
    return resolve_config(tiny_config(**{f"optim.{k}": v for k, v in optim_fields.items()}))


def _batch(config):
    b = int(config.batch_size)
    valid = np.ones((b, SENTENCES + PHRASES), bool)
    valid[::3, -1] = False  # some phrase slots empty
    images = np.clip(random_images(b, config.model.image_size) * 60 + 128, 0, 255)
    return {
        "image": images.astype(np.uint8),
        "caption": random_tokens(b, LENGTH, seed=1),
        "sentences": random_tokens(b, LENGTH, seed=2)[:, None],
        "phrases": random_tokens(b * PHRASES, 6, seed=3).reshape(b, PHRASES, 6),
        "valid": valid,
    }


def _optimizer(config):
    return optim.make_optimizer(
        config.optim, int(config.num_steps), int(config.model.frozen_positions)
    )[0]


def _lowered_step(config):
    """The jitted train step lowered on abstract inputs (traced, not compiled)."""
    model, tx = build_model(config.model), _optimizer(config)
    mesh = sharding.make_mesh(config.mesh)
    params_abs, params_sh, opt_abs, opt_sh = step_lib.state_shardings(model, tx, config, mesh)
    state = step_lib.TrainState(
        step=jax.ShapeDtypeStruct((), np.int32), params=params_abs, opt_state=opt_abs
    )
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(config))
    jitted = step_lib.jit_train_step(model, tx, config, mesh, params_sh, opt_sh)
    with jax.set_mesh(mesh):
        return jitted.lower(state, batch)


def _train(config):
    """(params before, params after STEPS steps, final opt_state) on one device."""
    model, tx = build_model(config.model), _optimizer(config)
    mesh = sharding.make_mesh(config.mesh)
    _, params_sh, _, opt_sh = step_lib.state_shardings(model, tx, config, mesh)
    params, opt_state = step_lib.init_state(
        model, tx, config, mesh, params_sh, opt_sh, random_params(model, seed=1)
    )
    state = step_lib.TrainState(step=np.int32(0), params=params, opt_state=opt_state)
    before = jax.device_get(state.params)  # the state is donated to the step
    jitted = step_lib.jit_train_step(model, tx, config, mesh, params_sh, opt_sh)
    batch = _batch(config)
    with jax.set_mesh(mesh):
        for _ in range(STEPS):
            state, metrics = jitted(state, batch)
            assert float(metrics["finite"]) == 1.0
    return before, jax.device_get(state.params), state.opt_state


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _moment_paths(opt_state):
    """Paths of Adam's first/second moment leaves in an optimiser state."""
    return [k for k in _flat(opt_state) if ".mu[" in k or ".nu[" in k]


def _flops(lowered) -> float:
    """XLA's flop count of the lowered (not yet optimised) step."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_locked_image_tower_never_moves_and_has_no_moments():
    before, after, opt_state = _train(_config(lock_image=True))
    a, b = _flat(before), _flat(after)
    vision = [k for k in a if k.startswith("['visual']")]
    assert len(vision) > 20
    for k in vision:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)  # bit-identical
    for k in a:
        if not k.startswith("['visual']"):
            assert np.any(b[k] != a[k]), f"{k} did not train"
    moments = _moment_paths(opt_state)
    assert not [k for k in moments if "['visual']" in k]
    # Every trainable leaf keeps its two moments: text, pooler, temperatures.
    assert len(moments) == 2 * (len(a) - len(vision))


def test_frozen_tower_backward_is_pruned():
    """The locked step's cost drops by at least the vision tower's forward matmuls: its backward
    (about twice that) is gone. Without the stop_gradient the gradient is still computed (it
    feeds grad_norm) and the cost would not drop."""
    config = _config()
    drop = _flops(_lowered_step(config)) - _flops(_lowered_step(_config(lock_image=True)))
    m = config.model
    tokens = (m.image_size // m.patch_size) ** 2 + 1
    # Per token and block: q, k, v, out (4 d^2) and the MLP (8 d^2) multiply-adds, 2 flops each.
    forward = 2 * 12 * m.vision_width**2 * tokens * m.vision_layers * int(config.batch_size)
    assert drop > forward, (drop, forward)


def test_lock_text_and_last_blocks_unlocked():
    """Both towers locked with one block unlocked: the last block of each tower and what follows
    it (ln_post / ln_final, proj) train, nothing else of the towers moves. The text blocks are
    one stacked leaf: only its last row trains."""
    config = _config(
        lock_image=True,
        lock_image_unlocked_blocks=1,
        lock_text=True,
        lock_text_unlocked_blocks=1,
    )
    before, after, opt_state = _train(config)
    a, b = _flat(before), _flat(after)
    trains = ("['visual']['last_block']", "['visual']['ln_post']", "['visual']['proj']")
    trains += ("['text']['ln_final']", "['text']['proj']", "['pooler']", "['logit_scale']")
    for k in a:
        if k.startswith("['text']['blocks']"):
            np.testing.assert_array_equal(b[k][0], a[k][0], err_msg=k)
            assert np.any(b[k][1] != a[k][1]), f"{k} row 1 did not train"
        elif k.startswith(trains):
            assert np.any(b[k] != a[k]), f"{k} did not train"
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    moments = _moment_paths(opt_state)
    for frozen in ("['visual']['blocks']", "['visual']['conv1']", "['text']['token_embedding']"):
        assert not [k for k in moments if frozen in k], frozen
    # A split stack keeps its moments; its frozen row's stay zero (its gradient is zero).
    state = _flat(opt_state)
    split = [k for k in moments if "['text']['blocks']['fc1']['kernel']" in k]
    assert len(split) == 2 and all(not np.any(np.asarray(state[k])[0]) for k in split)


def test_lock_text_whole_tower_without_moments():
    config = _config(lock_text=True)
    shapes = param_shapes(build_model(config.model))
    mask = _flat(optim.frozen_mask(shapes, config.optim))
    assert all(m.all() == k.startswith("['text']") for k, m in mask.items())
    opt = jax.eval_shape(_optimizer(config).init, shapes)
    moments = _moment_paths(opt)
    assert moments and not [k for k in moments if "['text']" in k]


def _reference_optimizer(cfg, total_steps, frozen_positions):
    """The two-group optimiser built from optax directly, as it was before locking existed."""

    def adamw(schedule):
        return optax.adamw(
            schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=optim.decay_mask
        )

    groups = {
        "main": adamw(optim.main_schedule(cfg, total_steps)),
        "pooler": adamw(optim.pooler_schedule(cfg, total_steps)),
    }
    return optax.chain(
        optax.multi_transform(groups, optim.group_labels),
        optim.freeze_text_rows(frozen_positions),
    )


def _small_params():
    """A few leaves of each kind the optimiser tells apart (towers, pooler, temperature)."""
    rng = np.random.default_rng(0)

    def draw(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "visual": {"proj": {"kernel": draw(4, 3)}, "ln_pre": {"scale": draw(4), "bias": draw(4)}},
        "text": {"positional_embedding": draw(24, 4), "blocks": {"fc1": {"kernel": draw(2, 4, 4)}}},
        "pooler": {"fc1": {"kernel": draw(4, 4), "bias": draw(4)}, "logit_scale": draw()},
        "logit_scale": draw(),
    }


def test_unlocked_optimizer_state_and_updates_unchanged():
    """Lock off: the state tree of the tiny model's params and a few updates are exactly those
    of the two-group optimiser built from optax directly."""
    config = _config()
    ours, ref = _optimizer(config), _reference_optimizer(config.optim, config.num_steps, 20)
    shapes = param_shapes(build_model(config.model))
    tree = jax.tree.structure(jax.eval_shape(ref.init, shapes))
    assert jax.tree.structure(jax.eval_shape(ours.init, shapes)) == tree
    params = _small_params()
    grads = jax.tree.map(lambda x: jnp.sin(100 * x), params)
    s_ours, s_ref = ours.init(params), ref.init(params)
    for _ in range(2):
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_ref, s_ref = ref.update(grads, s_ref, params)
        ours_leaves, ref_leaves = jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref))
        for x, y in zip(ours_leaves, ref_leaves, strict=True):
            np.testing.assert_array_equal(x, y)
    # Locking changes the tree (old checkpoints of unlocked runs are unaffected by the feature).
    locked = jax.eval_shape(_optimizer(_config(lock_text=True)).init, shapes)
    assert jax.tree.structure(locked) != tree


def test_sharded_locked_state_follows_params_on_eight_devices():
    """With FSDP on 8 devices every remaining moment takes its parameter's sharding and the
    locked step lowers with those shardings."""
    config = _config(lock_image=True, lock_text=True, lock_text_unlocked_blocks=1)
    config.mesh.num_devices, config.mesh.fsdp = 0, 4
    model, tx = build_model(config.model), _optimizer(config)
    mesh = sharding.make_mesh(config.mesh)
    _, params_sh, _, opt_sh = step_lib.state_shardings(model, tx, config, mesh)
    by_param, by_opt = _flat(params_sh), _flat(opt_sh)
    moments = _moment_paths(opt_sh)
    assert moments
    for k in moments:  # "....mu['text']['proj']['kernel']" -> "['text']['proj']['kernel']"
        param_path = k[k.index(".mu[" if ".mu[" in k else ".nu[") + 3 :]
        assert by_opt[k] == by_param[param_path], k
    assert any(s.spec != jax.sharding.PartitionSpec() for s in by_param.values())
    _lowered_step(config)  # in/out shardings agree with the locked state tree


def test_method_subtrees():
    """SmartCLIP's mask head and Holistic's branch class tokens train in a locked tower;
    Holistic 'mlp' branches are refused unless every branched block trains."""
    smart = _config(lock_image=True, lock_text=True)
    smart.model.method = "smartclip"
    shapes = param_shapes(build_model(smart.model))
    mask = _flat(optim.frozen_mask(shapes, smart.optim))
    assert not any(m.any() for k, m in mask.items() if k.startswith("['smart_mask']"))
    cls = _config(lock_image=True)
    cls.model.method, cls.model.image_branches = "holistic", 3
    shapes = param_shapes(build_model(cls.model))
    mask = _flat(optim.frozen_mask(shapes, cls.optim))
    tokens = [k for k in mask if "['branch_tokens']" in k]
    assert tokens and not any(mask[k].any() for k in tokens)
    assert mask["['visual']['class_embedding']"].all()
    mlp = _config(lock_image=True, lock_image_unlocked_blocks=1)
    mlp.model.method, mlp.model.image_branches, mlp.model.branch_type = "holistic", 3, "mlp"
    mlp.model.branch_layers = 2
    with pytest.raises(ValueError, match="model.branch_layers=2"):
        optim.check_lock(mlp.optim, mlp.model)
    mlp.optim.lock_image_unlocked_blocks = 2
    optim.check_lock(mlp.optim, mlp.model)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lock_image": "yes"}, "optim.lock_image must be True or False"),
        ({"lock_text": True, "lock_text_unlocked_blocks": 1.5}, "must be an integer"),
        ({"lock_text": True, "lock_text_unlocked_blocks": -1}, "must be >= 0"),
        ({"lock_image_unlocked_blocks": 1}, "no effect without optim.lock_image=True"),
        ({"lock_image": True, "lock_image_unlocked_blocks": 3}, r"more than the 2 blocks"),
    ],
)
def test_bad_lock_fields_are_named(fields, message):
    config = _config()
    cfg = config.optim.to_dict()
    cfg.update(fields)  # a plain dict: ConfigDict would refuse some of these types itself
    with pytest.raises(ValueError, match=message):
        optim.check_lock(cfg, config.model)


def test_frozen_mask_refuses_unknown_tower_entries():
    config = _config(lock_text=True)
    shapes = param_shapes(build_model(config.model))
    shapes["text"]["adapter"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    with pytest.raises(ValueError, match=r"no locking rule for its entries \['adapter'\]"):
        optim.frozen_mask(shapes, config.optim)
