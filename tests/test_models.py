"""Model structure and behaviour: variants, parameter tree, scan/unroll, mixed block, frozen
positional rows, bf16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_tiny import fast_jit, random_images, random_params, random_tokens

from beta_clip_jax.methods import build_model, model_config, resolve_model_config
from beta_clip_jax.models.clip import dummy_inputs
from beta_clip_jax.models.variants import VARIANTS


def test_variant_table_and_overrides():
    b16 = model_config("B/16")
    assert (b16.vision_width, b16.patch_size, b16.text_width, b16.embed_dim) == (768, 16, 512, 512)
    assert b16.context_length == 248 and b16.frozen_positions == 20 and b16.dtype == "float32"
    assert model_config("L/14").vision_layers == 24
    # None keeps the variant's value; a value overrides it.
    c = resolve_model_config({"variant": "B/32", "vision_layers": None, "context_length": 77})
    assert (c.vision_layers, c.context_length, c.patch_size) == (12, 77, 32)
    assert resolve_model_config(c).to_dict() == c.to_dict()  # idempotent


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"variant": "B/99"}, ["B/99", "B/16", "tiny"]),
        ({"variant": "tiny", "widht": 3}, ["widht"]),
        ({"variant": "tiny", "patch_size": 5}, ["image_size=32", "patch_size=5"]),
        ({"variant": "tiny", "remat": "some"}, ["remat"]),
        ({"variant": "tiny", "attention": "flash"}, ["attention='flash'", "cudnn"]),
        ({"variant": "tiny", "attention": "cudnn"}, ["cudnn", "bfloat16"]),
        ({"variant": "tiny", "pooler_value_init": "eye"}, ["pooler_value_init='eye'"]),
    ],
)
def test_bad_model_configs_name_the_problem(cfg, words):
    with pytest.raises(ValueError) as err:
        resolve_model_config(cfg)
    for w in words:
        assert w in str(err.value)


def test_param_tree_and_logical_axes():
    model = build_model(model_config("tiny"))
    boxed = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.config))["params"]
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed))
    assert set(shapes) == {"visual", "text", "pooler", "logit_scale"}
    v, t = shapes["visual"], shapes["text"]
    # Two vision layers: one stacked standard block plus the separate mixed last block.
    assert v["blocks"]["query"]["kernel"] == (1, 64, 2, 32)
    assert v["last_block"]["query"]["kernel"] == (64, 2, 32)
    assert v["conv1"]["kernel"] == (8, 8, 3, 64)
    assert v["positional_embedding"] == (17, 64) and v["proj"]["kernel"] == (64, 32)
    assert t["positional_embedding"] == (248, 64) and t["token_embedding"] == (49408, 64)
    assert t["blocks"]["fc1"]["kernel"] == (2, 64, 256)
    assert shapes["logit_scale"] == () and shapes["pooler"]["logit_scale"] == ()
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["visual"]["blocks"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(specs["visual"]["last_block"]["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["text"]["blocks"]["fc2"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["text"]["token_embedding"]) == ("vocab", "embed")


@pytest.fixture(scope="module")
def tiny():
    """(config, params, jitted forward) for the tiny variant at context 32."""
    cfg = model_config("tiny", context_length=32)
    model = build_model(cfg)
    params = random_params(model, seed=0)
    params["logit_scale"] = np.float32(np.log(100.0))
    params["pooler"]["logit_scale"] = np.float32(np.log(1 / 0.07))
    return cfg, params, _forward(model)


def _forward(model):
    return fast_jit(lambda p, x, s, ph: model.apply({"params": p}, x, texts(s, ph)))


def texts(sentences, phrases):
    """The model's texts from [caption, sentences...] rows of one length, and phrases."""
    return {"caption": sentences[:, 0], "sentences": sentences[:, 1:], "phrases": phrases}


def _inputs(n_phrases=2):
    images = jnp.asarray(random_images(2, 32, seed=1))
    sentences = jnp.asarray(random_tokens(6, 12, seed=2).reshape(2, 3, 12))
    phrases = jnp.asarray(random_tokens(2 * n_phrases, 6, seed=3).reshape(2, n_phrases, 6))
    return images, sentences, phrases


def test_forward_outputs(tiny):
    cfg, params, fwd = tiny
    out = fwd(params, *_inputs())
    assert out["image"].shape == (2, 32) and out["patches"].shape == (2, 16, 32)
    assert out["text"].shape == (2, 5, 32) and out["pooled"].shape == (2, 5, 32)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(out))
    np.testing.assert_allclose(out["logit_scale"], np.log(100.0), rtol=1e-6)
    np.testing.assert_allclose(out["pooler_logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    # Kp = 0 is allowed.
    images, sentences, _ = _inputs()
    empty = jnp.zeros((2, 0, 6), jnp.int32)
    model = build_model(cfg)
    out0 = _forward(model)(params, images, sentences, empty)
    assert out0["text"].shape == (2, 3, 32)
    np.testing.assert_allclose(out0["text"], out["text"][:, :3], atol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "cudnn"])
def test_attention_option_reaches_every_attention_call(tiny, monkeypatch, attention):
    """model.attention is passed to every jax.nn.dot_product_attention of both towers (vision
    full + mixed last block, text causal). Traced only: cuDNN itself needs a GPU. "xla" also
    gives the default model's outputs."""
    cfg, params, fwd = tiny
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        seen.append((args[0].shape[1], kwargs.get("is_causal"), implementation))
        return real(*args, **kwargs)  # traced with JAX's choice: no cuDNN on this machine

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    dtype = "bfloat16" if attention == "cudnn" else cfg.dtype
    model = build_model(
        resolve_model_config({**cfg.to_dict(), "attention": attention, "dtype": dtype})
    )
    images, sentences, phrases = _inputs()
    out = jax.eval_shape(
        lambda p: model.apply({"params": p}, images, texts(sentences, phrases)), params
    )
    assert {impl for _, _, impl in seen} == {attention}
    assert any(causal for _, causal, _ in seen)  # text
    assert any(q == 1 for q, _, _ in seen)  # mixed last block: the CLS query
    assert any(q == 17 and not causal for q, causal, _ in seen)  # vision: CLS + 16 patches
    if attention == "xla":
        monkeypatch.undo()
        got, want = _forward(model)(params, *_inputs()), fwd(params, *_inputs())
        for k in ("image", "text", "pooled"):
            np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
    assert out["image"].shape == (2, 32)


def test_scan_and_unrolled_agree(tiny):
    cfg, params, fwd = tiny
    unrolled = build_model(resolve_model_config({**cfg.to_dict(), "scan_layers": False}))
    tree = jax.eval_shape(unrolled.init, jax.random.key(0), *dummy_inputs(unrolled.config))
    same_tree = jax.tree.map(lambda a, b: a.shape == b.shape, nn.unbox(tree["params"]), params)
    assert all(jax.tree.leaves(same_tree))
    a, b = fwd(params, *_inputs()), _forward(unrolled)(params, *_inputs())
    for k in ("image", "patches", "text", "pooled"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_mixed_last_block_keeps_patches_off_attention(tiny):
    """Patch rows of the last block never use q/k, so changing those weights moves only CLS."""
    _, params, fwd = tiny
    base = fwd(params, *_inputs())
    changed = jax.tree.map(lambda x: x, params)
    last = changed["visual"]["last_block"]
    for name in ("query", "key"):
        last[name] = {k: v + 0.5 for k, v in last[name].items()}
    out = fwd(changed, *_inputs())
    np.testing.assert_allclose(out["patches"], base["patches"], atol=1e-6)
    assert np.abs(np.asarray(out["image"] - base["image"])).max() > 1e-3


def test_text_padding_and_length_do_not_matter(tiny):
    cfg, params, _ = tiny
    model = build_model(cfg)
    enc = fast_jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))
    short = random_tokens(3, 10, seed=4)
    padded = np.zeros((3, 32), np.int32)
    padded[:, :10] = short
    np.testing.assert_allclose(enc(params, short), enc(params, padded), atol=1e-5)
    with pytest.raises(ValueError, match="context length 32"):
        enc(params, np.zeros((1, 40), np.int32))


def test_frozen_positions_get_no_gradient():
    cfg = model_config("tiny", context_length=32, remat="full")
    model = build_model(cfg)
    params = random_params(model, seed=1)
    # EOT at position 29 in every row, so the pooled state sees positions 0..29 and no later.
    tokens = np.random.default_rng(5).integers(1, 49405, size=(4, 30)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = 49406, 49407

    def loss(p):
        return jnp.sum(model.apply({"params": p}, tokens, method="encode_text") ** 2)

    g = np.asarray(fast_jit(jax.grad(loss))(params)["text"]["positional_embedding"])
    row_norm = np.linalg.norm(g, axis=1)
    assert np.all(row_norm[:20] == 0)
    assert np.all(row_norm[20:30] > 0)
    assert np.all(row_norm[30:] == 0)


def test_bfloat16_compute_close_to_float32(tiny):
    cfg, params, fwd = tiny
    # Also builds the unrolled, "dots"-remat variant of the towers.
    options = {"dtype": "bfloat16", "remat": "dots", "scan_layers": False}
    bf16 = build_model(resolve_model_config({**cfg.to_dict(), **options}))
    a, b = fwd(params, *_inputs()), _forward(bf16)(params, *_inputs())
    for k in ("image", "text"):
        assert b[k].dtype == jnp.float32
        cos = (
            np.sum(a[k] * b[k], -1) / np.linalg.norm(a[k], axis=-1) / np.linalg.norm(b[k], axis=-1)
        )
        assert cos.min() > 0.99, (k, cos)


def test_all_named_variants_resolve():
    for name in VARIANTS:
        assert model_config(name).variant == name
