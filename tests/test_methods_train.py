"""SmartCLIP, Holistic CLIP and IsoCLIP wired into the model, objective, trainer and evaluators."""

import json
import os

import flax.linen as nn
import holistic_reference
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from train_helpers import load_config

from beta_clip_jax import objective
from beta_clip_jax.api import Encoder
from beta_clip_jax.methods import (
    build_model,
    complete_params,
    holistic,
    holistic_model,
    inference_params,
    model_config,
)
from beta_clip_jax.models.clip import init_params, param_shapes
from beta_clip_jax.models.layers import ResidualBlock
from beta_clip_jax.step import abstract_params


def _inputs(b=2, s=3, length=8):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32)
    tokens = rng.integers(1, 4000, size=(b, s, length)).astype(np.int32)
    tokens[..., 0] = 49406
    tokens[0, 0, 5:] = 0
    tokens[0, 0, 4] = 49407
    tokens[..., -1] = np.where(tokens[..., -1] == 0, 0, 49407)
    phrases = jnp.asarray(tokens[:, :1, :6].copy())
    tokens = jnp.asarray(tokens)  # slot 0 the caption, then the sentences
    return images, {"caption": tokens[:, 0], "sentences": tokens[:, 1:], "phrases": phrases}


def _leaves(tree):
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_default_tree_unchanged_and_method_trees():
    default = param_shapes(build_model(model_config("tiny")))
    assert set(default) == {"visual", "text", "pooler", "logit_scale"}
    assert "branch_tokens" not in default["visual"]
    smart = param_shapes(build_model(model_config("tiny", method="smartclip")))
    assert _leaves(smart) - _leaves(default) == {
        k for k in _leaves(smart) if k.startswith("['smart_mask']")
    }
    cls = param_shapes(build_model(model_config("tiny", method="holistic", image_branches=3)))
    tokens = cls["visual"]["branch_tokens"]
    assert tokens["class_embedding"].shape == tokens["class_positional_embedding"].shape == (2, 64)
    assert _leaves(cls) - _leaves(default) == {
        "['visual']['branch_tokens']['class_embedding']",
        "['visual']['branch_tokens']['class_positional_embedding']",
    }
    with pytest.raises(ValueError, match="image_branches=3 needs method='holistic'"):
        model_config("tiny", image_branches=3)
    with pytest.raises(ValueError, match="method='simclr'"):
        model_config("tiny", method="simclr")


def test_branched_block_equals_holistic_reference():
    k, w, heads = 3, 16, 2
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, k, 7, w)), jnp.float32)
    ref = holistic_reference.BranchedBlock(heads, k)
    rp = nn.unbox(jax.jit(ref.init)(jax.random.key(1), x)["params"])
    rp = jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(np.float32), rp)
    ours = {key: rp[key] for key in ("ln_1", "query", "key", "value", "out", "ln_2")}
    ours["fc1"] = rp["mlp"]["fc1"]
    ours["fc2"] = {"kernel": rp["mlp"]["fc2_kernel"], "bias": rp["mlp"]["fc2_bias"]}
    block = ResidualBlock(w, heads, mode="full", mlp_out=holistic_model.branched_fc2(k))
    rows = x.reshape(-1, *x.shape[2:])  # the model runs the K streams as batch rows
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(
        jnp.shape, nn.unbox(jax.eval_shape(block.init, jax.random.key(0), rows)["params"])
    )
    got = jax.jit(block.apply)({"params": ours}, rows).reshape(x.shape)
    want = jax.jit(ref.apply)({"params": rp}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_block_with_several_cls_rows_and_mask():
    k, w, heads, length = 3, 16, 2, 9
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, length, w)), jnp.float32)
    mask = holistic.cls_attention_mask(k, length)
    full = ResidualBlock(w, heads, mode="full")
    mixed = ResidualBlock(w, heads, mode="mixed", num_cls=k)
    params = nn.unbox(jax.jit(full.init)(jax.random.key(2), x)["params"])
    a = jax.jit(full.apply)({"params": params}, x, mask)
    b = jax.jit(mixed.apply)({"params": params}, x, mask)
    np.testing.assert_allclose(a[:, :k], b[:, :k], rtol=1e-5, atol=1e-5)
    # CLS rows never see each other: moving CLS 1 leaves CLS 0 and 2 of this block unchanged.
    c = jax.jit(mixed.apply)({"params": params}, x.at[:, 1].add(1.0), mask)
    np.testing.assert_allclose(c[:, [0, 2]], b[:, [0, 2]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_mlp_branches_from_plain_params_are_the_plain_model(layers):
    plain = build_model(model_config("tiny"))
    params = init_params(plain, jax.random.key(3))
    cfg = model_config(
        "tiny", method="holistic", image_branches=3, branch_type="mlp", branch_layers=layers
    )
    model = build_model(cfg)
    branched = complete_params(params, model)
    images = _inputs()[0]
    cls, patches = plain.apply({"params": params}, images, method="encode_image")
    br, br_patches = model.apply({"params": branched}, images, method="encode_image_branches")
    assert br.shape == (2, 3, 32)
    for k in range(3):
        np.testing.assert_allclose(br[:, k], cls, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(br_patches, patches, rtol=1e-4, atol=1e-5)
    fused, _ = model.apply({"params": branched}, images, method="encode_image")
    unit = cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)
    np.testing.assert_allclose(fused, unit, rtol=1e-4, atol=1e-5)


def test_smartclip_outputs_completion_and_inference_strip():
    plain = build_model(model_config("tiny"))
    params = init_params(plain, jax.random.key(4))
    model = build_model(model_config("tiny", method="smartclip"))
    full = complete_params(params, model)
    assert set(full) == set(params) | {"smart_mask"}
    images, texts = _inputs()
    out = jax.jit(lambda p: model.apply({"params": p}, images, texts))(full)
    ref = jax.jit(lambda p: plain.apply({"params": p}, images, texts))(params)
    assert out["smart_mask"].shape == out["sentence_text"].shape == (2, 3, 32)
    np.testing.assert_array_equal(out["smart_mask"], 1.0)  # all-ones at init: plain CLIP
    for key in ("image", "text", "pooled"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(out["sentence_text"], ref["text"][:, :3], rtol=1e-5, atol=1e-6)

    stripped, cfg = inference_params(full, model.config)
    assert cfg.method == "beta_clip" and "smart_mask" not in stripped
    assert _leaves(stripped) == _leaves(params)
    same, same_cfg = inference_params(params, plain.config)
    assert same_cfg.to_dict() == plain.config.to_dict() and same.keys() == params.keys()
    # A SmartCLIP tree as the start of another method: the mask head is left behind.
    holistic_model = build_model(model_config("tiny", method="holistic", image_branches=3))
    assert "smart_mask" not in complete_params(full, holistic_model)
    assert _leaves(complete_params(full, plain)) == _leaves(params)


def test_holistic_encoder_embeds_the_fused_branches():
    model = build_model(model_config("tiny", method="holistic", image_branches=3))
    params = init_params(model, jax.random.key(5))
    images = np.random.default_rng(7).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    got = Encoder.from_params(model, params).embed_images(images)
    from beta_clip_jax.data.transforms import normalize as normalize_images

    branches, _ = model.apply(
        {"params": params}, normalize_images(images), method="encode_image_branches"
    )
    fused = np.asarray(holistic.fuse_branches(branches))
    want = fused / np.linalg.norm(fused, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_method_loss_needs_its_model_outputs():
    out = {
        "image": jnp.ones((4, 8)),
        "text": jnp.ones((4, 2, 8)),
        "logit_scale": jnp.float32(0.0),
    }
    for name in ("smartclip", "holistic"):
        cfg = objective.default_loss_config()
        cfg.name = name
        with pytest.raises(ValueError, match=f"model.method='{name}'"):
            objective.training_loss(out, jnp.ones((4, 2), bool), cfg)


def test_holistic_objective_is_m2m_on_sentence_slots():
    rng = np.random.default_rng(8)
    out = {
        "image": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
        "image_branches": jnp.asarray(rng.normal(size=(4, 3, 8)), jnp.float32),
        "sentence_text": jnp.asarray(rng.normal(size=(4, 3, 8)), jnp.float32),
        "logit_scale": jnp.float32(np.log(20.0)),
    }
    out["text"] = jnp.concatenate([out["sentence_text"], out["sentence_text"][:, :1]], axis=1)
    valid = jnp.asarray(rng.random((4, 4)) > 0.2).at[:, 0].set(True)
    cfg = objective.default_loss_config()
    cfg.name = "holistic"
    loss, met = objective.training_loss(out, valid, cfg)
    want, _ = holistic.m2m_loss(out["image_branches"], out["sentence_text"], 20.0, valid[:, :3])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert "m2m_i2t" in met and "loss_global" in met


# ---- the configs train, evaluate and write metrics.jsonl ----------------------------------


def _shrink(c):
    c.num_steps = 2
    c.log_every = 1
    c.batch_size = 8
    c.data.max_sentences = 2
    if c.method == "holistic":
        c.model.image_branches = 3
    c.evals.synthetic.num_examples = 8
    c.evals.intra.num_classes = 4
    c.evals.intra.per_class = 2
    c.evals.intra.num_scenes = 4
    return c


@pytest.mark.parametrize(
    "config, arg, key",
    [
        ("smartclip_demo.py", None, "train/smartclip_mask_density"),
        ("holistic_demo.py", "cls", "train/m2m_i2t"),
        ("holistic_demo.py", "mlp", "train/m2m_branch_similarity"),
    ],
)
def test_method_configs_train_and_evaluate(tmp_path, config, arg, key):
    """Each method's config trains from plain beta-CLIP weights (config.init = a workdir) and
    evaluates; the added parts are completed and the shared parts start from the init."""
    from beta_clip_jax import checkpoint
    from beta_clip_jax.reporting.metrics_writer import read_metrics
    from beta_clip_jax.train import train_and_evaluate

    c = _shrink(load_config(config, arg))
    plain_cfg = c.model.to_dict() | {"method": "beta_clip", "image_branches": 1}
    plain = _plain_workdir(str(tmp_path / "plain"), c, plain_cfg)
    c.init = str(tmp_path / "plain")
    train_and_evaluate(c, str(tmp_path / "run"))
    trained, _, _ = checkpoint.load_params_from_workdir(str(tmp_path / "run"), abstract_params)
    # Two small AdamW steps move a weight by about 2 x lr; a fresh init would differ by ~0.1.
    for path in (
        ("visual", "conv1", "kernel"),
        ("text", "token_embedding"),
        ("visual", "proj", "kernel"),
    ):
        a, b = trained, plain
        for name in path:
            a, b = a[name], b[name]
        np.testing.assert_allclose(a, b, atol=20 * c.optim.lr, err_msg="/".join(path))
    tmp_path = tmp_path / "run"
    records = read_metrics(str(tmp_path))
    merged = {k: v for r in records if r["step"] == 2 for k, v in r.items()}
    assert np.isfinite(merged["train/loss"]) and key in merged
    for metric in ("synthetic/t2i_r1", "intra/i2i_map", "intra/t2t_map", "intra/iso_i2i_map"):
        assert f"eval/{metric}" in merged, metric
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["method"] == c.method


def _plain_workdir(path, config, model_cfg):
    """A workdir of `config` holding random plain beta-CLIP weights of `model_cfg`."""
    from beta_clip_jax import checkpoint
    from beta_clip_jax.methods import resolve_model_config

    cfg = resolve_model_config(model_cfg)
    params = jax.tree.map(np.asarray, init_params(build_model(cfg), jax.random.key(11)))
    checkpoint.write_json(
        os.path.join(path, "config.json"), config.to_dict() | {"model": cfg.to_dict()}
    )
    ckpt = checkpoint.Checkpointer(path, every=1, keep=1, async_save=False)
    ckpt.save(1, params, {"count": np.zeros((), np.int32)}, None, {}, force=True)
    ckpt.close()
    return params


# ---- IsoCLIP: the written weights equal the in-memory filter --------------------------------


def test_isoclip_apply_export_matches_in_memory_filter(tmp_path):
    from beta_clip_jax import api
    from beta_clip_jax.evals.intramodal import IntraModalEvaluator
    from beta_clip_jax.methods import isoclip_apply

    model = build_model(model_config("tiny", method="smartclip"))
    params = init_params(model, jax.random.key(6))
    bands = {"iso_image_band": (3, 34), "iso_text_band": (1, 36)}
    evals = {"kind": "intramodal", "num_classes": 4, "per_class": 3, "num_scenes": 5}
    original = IntraModalEvaluator("intra", {**evals, **bands}).run(
        Encoder.from_params(model, params)
    )
    _, meta = isoclip_apply.run(
        "fake",
        str(tmp_path / "iso"),
        image_band=(3, 34),
        text_band=(1, 36),
        load=lambda _: (params, model.config),
    )
    assert meta["export"] and meta["model"]["method"] == "smartclip"
    loaded = api.load(str(tmp_path / "iso"))
    assert loaded.model.config.method == "beta_clip"  # the mask head is not exported
    filtered = IntraModalEvaluator("intra", evals).run(loaded)
    for k in ("i2i_map", "i2i_r1", "t2t_map", "t2t_p_at_r"):
        np.testing.assert_allclose(filtered[k], original[f"iso_{k}"], rtol=1e-4, err_msg=k)
    assert (tmp_path / "iso" / "params.msgpack").exists()


def test_intramodal_on_real_layouts(tmp_path):
    from beta_clip_jax.evals.registry import build_evaluators

    rng = np.random.default_rng(9)
    for split in ("query", "gallery"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(3 if split == "gallery" else 2):
                pixels = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    karpathy = {
        "images": [
            {"split": "test", "filename": f"{i}.jpg", "sentences": [{"raw": f"text {i} {j}"}
                                                                    for j in range(3)]}
            for i in range(4)
        ]
    }  # fmt: skip
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    evals = ml_collections.ConfigDict(
        {
            "loo": {"kind": "intramodal", "image_root": str(tmp_path / "gallery")},
            "split": {
                "kind": "intramodal",
                "image_root": str(tmp_path / "query"),
                "gallery_root": str(tmp_path / "gallery"),
                "json_path": str(tmp_path / "k.json"),
            },
        }
    )
    loo, split = build_evaluators(evals, image_size=32)
    model = build_model(model_config("tiny"))
    enc = Encoder.from_params(model, init_params(model, jax.random.key(7)))
    a, b = loo.run(enc), split.run(enc)
    assert set(a) == {f"i2i_{m}" for m in ("map", "map_at_r", "p_at_r", "r1")}
    assert "t2t_map" in b and "i2i_map" in b and "iso_i2i_map" not in b
    assert all(0.0 <= v <= 100.0 for v in (*a.values(), *b.values()))
    with pytest.raises(FileNotFoundError, match="one folder per class"):
        build_evaluators({"x": {"kind": "intramodal", "image_root": str(tmp_path / "nope")}})


def test_mask_head_updates_are_delayed():
    import optax

    from beta_clip_jax.optim import make_optimizer, optim_defaults

    cfg = optim_defaults()
    cfg.mask_delay_steps = 2
    tx, _ = make_optimizer(cfg, total_steps=10, frozen_positions=0)
    params = {"smart_mask": {"w": jnp.ones(3)}, "text": {"w": jnp.ones(3)}}
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    moved = []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        moved.append(float(jnp.abs(updates["smart_mask"]["w"]).sum()))
        assert float(jnp.abs(updates["text"]["w"]).sum()) > 0
    assert moved[0] == moved[1] == 0.0 and moved[2] > 0
    # Without a delay the optimiser state has no extra entry (old checkpoints still restore).
    plain, _ = make_optimizer(optim_defaults(), total_steps=10, frozen_positions=0)
    assert len(jax.tree.leaves(plain.init(params))) < len(jax.tree.leaves(tx.init(params)))
