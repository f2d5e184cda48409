"""Pooler: PyTorch MultiheadAttention + LN + MLP parity, init statistics, per-image locality."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beta_clip_jax.models.pooler import LOGIT_SCALE_INIT, TextConditionedPooler

torch = pytest.importorskip("torch")

B, K, P, E, H = 3, 4, 7, 32, 4


def _init(e=E, h=H, seed=0):
    model = TextConditionedPooler(num_heads=h)
    text = jnp.ones((1, 2, e))
    patches = jnp.ones((1, 3, e))
    variables = model.init(jax.random.key(seed), text, patches)
    return model, variables


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(B, K, E)).astype(np.float32)
    patches = rng.normal(size=(B, P, E)).astype(np.float32)
    return text, patches


class _TorchPooler(torch.nn.Module):
    """The reference block written directly from its equations (docs/methods.md) with PyTorch
    building blocks."""

    def __init__(self, e, h, m):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(e, h, batch_first=True)
        self.ln = torch.nn.LayerNorm(e, eps=1e-5)
        self.fc1 = torch.nn.Linear(e, m)
        self.fc2 = torch.nn.Linear(m, e)

    def forward(self, text, patches):
        q = torch.nn.functional.normalize(text, dim=-1)
        kv = torch.nn.functional.normalize(patches, dim=-1)
        o, w = self.attn(q, kv, kv, need_weights=True, average_attn_weights=False)
        x = self.fc1(self.ln(o))
        return o + self.fc2(x * torch.sigmoid(1.702 * x)), w


def _to_torch(p, e, h):
    """Maps our tree to the PyTorch module's state dict (the mapping export relies on)."""
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32).copy())
    in_w = np.concatenate(
        [np.asarray(p[n]["kernel"]).reshape(e, e).T for n in ("query", "key", "value")]
    )
    in_b = np.concatenate([np.asarray(p[n]["bias"]).reshape(e) for n in ("query", "key", "value")])
    return {
        "attn.in_proj_weight": t(in_w),
        "attn.in_proj_bias": t(in_b),
        "attn.out_proj.weight": t(np.asarray(p["out"]["kernel"]).reshape(e, e).T),
        "attn.out_proj.bias": t(p["out"]["bias"]),
        "ln.weight": t(p["ln"]["scale"]),
        "ln.bias": t(p["ln"]["bias"]),
        "fc1.weight": t(np.asarray(p["fc1"]["kernel"]).T),
        "fc1.bias": t(p["fc1"]["bias"]),
        "fc2.weight": t(np.asarray(p["fc2"]["kernel"]).T),
        "fc2.bias": t(p["fc2"]["bias"]),
    }


def test_matches_torch_multihead_attention():
    model, variables = _init()
    params = nn.unbox(variables["params"])
    # Random biases and LN params so that every mapped tensor matters.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    text, patches = _inputs()
    pooled, attn = model.apply({"params": params}, text, patches)
    assert pooled.shape == (B, K, E) and attn.shape == (B, H, K, P)

    ref = _TorchPooler(E, H, 4 * E)
    ref.load_state_dict(_to_torch(params, E, H))
    with torch.no_grad():
        t_pooled, t_attn = ref(torch.from_numpy(text), torch.from_numpy(patches))
    np.testing.assert_allclose(np.asarray(pooled), t_pooled.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(attn), t_attn.numpy(), atol=1e-5, rtol=0)


def test_init_bounds_and_statistics():
    e, h = 64, 8
    _, variables = _init(e, h)
    p = nn.unbox(variables["params"])
    n = jax.tree.reduce(lambda a, x: a + x.size, p, 0)
    assert n == 3 * e * e + 3 * e + e * e + e + 2 * e + 2 * 4 * e * e + 4 * e + e + 1
    assert p["logit_scale"].shape == () and np.isclose(p["logit_scale"], math.log(1 / 0.07))
    assert np.isclose(LOGIT_SCALE_INIT, 2.6593, atol=1e-4)

    def check_uniform(x, bound):
        x = np.asarray(x).ravel()
        assert np.abs(x).max() <= bound
        assert np.abs(x).max() > 0.95 * bound  # really spans the range, not a narrower init
        assert abs(x.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)

    in_w = np.concatenate([np.asarray(p[n]["kernel"]).ravel() for n in ("query", "key", "value")])
    check_uniform(in_w, math.sqrt(6 / (e + 3 * e)))
    check_uniform(p["out"]["kernel"], 1 / math.sqrt(e))
    check_uniform(p["fc1"]["kernel"], 1 / math.sqrt(e))
    check_uniform(p["fc1"]["bias"], 1 / math.sqrt(e))
    check_uniform(p["fc2"]["kernel"], 1 / math.sqrt(4 * e))
    for n in ("query", "key", "value", "out"):
        assert not np.any(np.asarray(p[n]["bias"]))
    assert np.all(np.asarray(p["ln"]["scale"]) == 1) and not np.any(np.asarray(p["ln"]["bias"]))
    assert np.asarray(p["fc2"]["bias"]).std() > 0


def test_logical_axis_names():
    _, variables = _init()
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["fc2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["ln"]["scale"]) == ("embed",)


def test_each_image_pools_only_its_own_patches():
    model, variables = _init()
    text, patches = _inputs()
    out, attn = model.apply(variables, text, patches)
    changed = patches.copy()
    changed[1] = 10 * np.random.default_rng(9).normal(size=(P, E))
    out2, _ = model.apply(variables, text, changed)
    np.testing.assert_array_equal(np.asarray(out)[[0, 2]], np.asarray(out2)[[0, 2]])
    assert not np.allclose(np.asarray(out)[1], np.asarray(out2)[1])
    # Queries are independent too: changing one text leaves its siblings' outputs alone.
    text2 = text.copy()
    text2[0, 1] += 1.0
    out3, _ = model.apply(variables, text2, patches)
    np.testing.assert_allclose(np.asarray(out)[0, [0, 2, 3]], np.asarray(out3)[0, [0, 2, 3]])
    np.testing.assert_allclose(np.asarray(attn).sum(-1), 1.0, atol=1e-6)


def test_bfloat16_compute_is_close():
    model, variables = _init()
    text, patches = _inputs()
    out, _ = model.apply(variables, text, patches)
    out_bf, attn_bf = TextConditionedPooler(num_heads=H, dtype=jnp.bfloat16).apply(
        variables, text, patches
    )
    assert attn_bf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_bf, np.float32), np.asarray(out), atol=0.1)


def test_identity_value_init_pools_the_patch_tokens_themselves():
    """value_init="identity": each head's slice of the attention output is the attention-weighted
    mean of that slice of the L2-normalised patches (NumPy), then the usual LN + MLP residual.
    Query and key keep the reference initialisation."""
    model = TextConditionedPooler(num_heads=H, value_init="identity")
    text, patches = _inputs()
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(text), jnp.asarray(patches)))
    params = params["params"]
    pooled, attn = model.apply({"params": params}, jnp.asarray(text), jnp.asarray(patches))
    zhat = patches / np.linalg.norm(patches, axis=-1, keepdims=True)
    dh = E // H
    heads = np.einsum("bhkp,bphd->bkhd", np.asarray(attn), zhat.reshape(B, P, H, dh))
    o = heads.reshape(B, K, E)
    ln = params["ln"]
    y = (o - o.mean(-1, keepdims=True)) / np.sqrt(o.var(-1, keepdims=True) + 1e-5)
    y = y * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
    hid = y @ np.asarray(params["fc1"]["kernel"]) + np.asarray(params["fc1"]["bias"])
    hid = hid / (1 + np.exp(-1.702 * hid))
    want = o + hid @ np.asarray(params["fc2"]["kernel"]) + np.asarray(params["fc2"]["bias"])
    np.testing.assert_allclose(np.asarray(pooled), want, rtol=1e-4, atol=1e-5)
    reference = nn.unbox(_init()[1])["params"]
    assert np.asarray(params["query"]["kernel"]).std() == pytest.approx(
        np.asarray(reference["query"]["kernel"]).std(), rel=0.2
    )
