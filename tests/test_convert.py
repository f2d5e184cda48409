"""Importing HF and OpenAI CLIP weights: parity with transformers, stretching, errors."""

import io
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
from helpers_tiny import (
    B16,
    TINY,
    fast_jit,
    hf_image_features,
    hf_text_features,
    make_hf_model,
    random_images,
    random_tokens,
    save_hf_dir,
    save_openai_pt,
    save_openai_torchscript,
    value_only_patch_tokens,
)

from beta_clip_jax.convert import (
    flax_to_hf_state_dict,
    hf_config_from_variant,
    hf_state_dict_to_flax,
    import_pretrained,
    load_pretrained,
    read_hf_dir,
    variant_from_hf_config,
    write_hf_dir,
)
from beta_clip_jax.convert.openai import read_openai_state_dict
from beta_clip_jax.methods import build_model

TOL = 1e-4


def _encoders(cfg):
    """Jitted (encode_image, encode_text) for the model `cfg` builds."""
    model = build_model(cfg)
    img = fast_jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    txt = fast_jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))
    return img, txt


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = make_hf_model(TINY, seed=0)
    path = save_hf_dir(model, str(tmp_path_factory.mktemp("tiny_hf")))
    return model, path


@pytest.fixture(scope="module")
def tiny_loaded(tiny):
    params, cfg, not_provided = import_pretrained("hf:" + tiny[1])
    return params, cfg, not_provided


def test_tiny_hf_parity(tiny, tiny_loaded):
    hf, _ = tiny
    params, cfg, not_provided = tiny_loaded
    assert cfg.variant == "tiny" and cfg.context_length == 77
    assert "pooler/query/kernel" in not_provided and "pooler/logit_scale" in not_provided
    assert not any(n.startswith(("visual", "text")) for n in not_provided)
    enc_img, enc_txt = _encoders(cfg)
    images = random_images(3, 32, seed=1)
    tokens = random_tokens(4, 77, seed=2)
    cls, patches = enc_img(params, images)
    assert _max_diff(cls, hf_image_features(hf, images)) < TOL
    # HF applies post_layernorm to CLS only; patches are checked against a torch evaluation of
    # the value-only last block from the same HF weights.
    assert _max_diff(patches, value_only_patch_tokens(hf, images)) < TOL
    assert _max_diff(enc_txt(params, tokens), hf_text_features(hf, tokens)) < TOL
    np.testing.assert_allclose(params["logit_scale"], hf.logit_scale.item(), rtol=1e-6)


def test_b16_layout_parity_hf_and_openai(tmp_path):
    hf = make_hf_model(B16, seed=3)
    params, cfg, _ = import_pretrained("hf:" + save_hf_dir(hf, str(tmp_path / "hf")))
    assert (cfg.vision_width, cfg.vision_heads, cfg.patch_size, cfg.image_size) == (
        768,
        12,
        16,
        224,
    )
    assert (cfg.text_width, cfg.text_heads, cfg.embed_dim, cfg.pooler_heads) == (512, 8, 512, 8)
    pt = save_openai_pt(hf, str(tmp_path / "ViT-B-16.pt"))
    params_oa, cfg_oa = load_pretrained("openai:" + pt, cfg)
    assert cfg_oa.to_dict() == cfg.to_dict()
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        if "pooler" not in jax.tree_util.keystr(path):
            b = params_oa
            for k in path:
                b = b[k.key]
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    enc_img, enc_txt = _encoders(cfg)
    images = random_images(2, 224, seed=4)
    tokens = random_tokens(3, 24, seed=5)
    cls, patches = enc_img(params, images)
    assert patches.shape == (2, 196, 512)
    assert _max_diff(cls, hf_image_features(hf, images)) < TOL
    assert _max_diff(patches, value_only_patch_tokens(hf, images)) < TOL
    assert _max_diff(enc_txt(params, tokens), hf_text_features(hf, tokens)) < TOL


def test_openai_files_plain_and_torchscript(tiny, tiny_loaded, tmp_path):
    hf, _ = tiny
    ref, cfg, _ = tiny_loaded
    plain, _ = load_pretrained("openai:" + save_openai_pt(hf, str(tmp_path / "a.pt")), cfg)
    script = save_openai_torchscript(hf, str(tmp_path / "b.pt"))
    jit_params, _ = load_pretrained("openai:" + script, cfg)
    for name in ("visual", "text", "logit_scale"):
        jax.tree.map(np.testing.assert_array_equal, plain[name], ref[name])
        # The TorchScript file is fp16, like OpenAI's releases.
        close = lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3)  # noqa: E731
        jax.tree.map(close, jit_params[name], ref[name])


def test_torchscript_reader_runs_no_code(tmp_path):
    path = str(tmp_path / "evil.pt")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(os.system))
        z.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_openai_state_dict(path)


def _stretch_reference(p):
    """Long-CLIP stretching (convert/positions.py), written out row by row."""
    out = np.zeros((248, p.shape[1]), np.float64)
    out[:20] = p[:20]
    for i in range(56):
        for r in range(4):
            out[20 + 4 * i + r] = ((4 - r) * p[20 + i] + r * p[21 + i]) / 4
    for r in range(4):
        out[244 + r] = p[76] + r * (p[76] - p[75]) / 4
    return out


def test_context_248_stretches_positions(tiny, tiny_loaded):
    hf, path = tiny
    short, cfg77, _ = tiny_loaded
    long, cfg248, _ = import_pretrained("hf:" + path, {**cfg77.to_dict(), "context_length": 248})
    assert cfg248.context_length == 248
    p77 = hf.text_model.embeddings.position_embedding.weight.detach().numpy()
    p248 = long["text"]["positional_embedding"]
    assert p248.shape == (248, 64)
    np.testing.assert_array_equal(p248[:20], p77[:20])
    np.testing.assert_allclose(p248, _stretch_reference(p77.astype(np.float64)), atol=1e-6)
    np.testing.assert_array_equal(short["text"]["positional_embedding"], p77)
    # Texts within the kept rows embed exactly as before (causal attention, EOT pooling).
    tokens = random_tokens(3, 20, seed=6)
    _, enc77 = _encoders(cfg77)
    _, enc248 = _encoders(cfg248)
    assert _max_diff(enc248(long, tokens), enc77(short, tokens)) < 1e-5


def test_state_dict_round_trip_and_hf_reload(tiny, tiny_loaded, tmp_path):
    from transformers import CLIPModel

    hf, path = tiny
    state, config_json = read_hf_dir(path)
    params, cfg, _ = tiny_loaded
    back = flax_to_hf_state_dict(params, cfg)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # A directory written from our params and config loads in transformers with equal outputs.
    out = str(tmp_path / "written")
    write_hf_dir(out, back, hf_config_from_variant(cfg))
    reloaded = CLIPModel.from_pretrained(out).eval()
    images, tokens = random_images(2, 32, seed=7), random_tokens(2, 16, seed=8)
    assert _max_diff(hf_image_features(reloaded, images), hf_image_features(hf, images)) < 1e-6
    assert _max_diff(hf_text_features(reloaded, tokens), hf_text_features(hf, tokens)) < 1e-6
    assert variant_from_hf_config(config_json).to_dict() == cfg.to_dict()


def test_variant_from_full_size_hf_config():
    cfg_json = {
        "projection_dim": 512,
        "vision_config": {"patch_size": 16},  # everything else: transformers defaults (B/16)
        "text_config": {},
    }
    cfg = variant_from_hf_config(cfg_json)
    assert cfg.variant == "B/16" and cfg.context_length == 77 and cfg.pooler_heads == 8
    with pytest.raises(ValueError, match="hidden_act='relu' \\(supported: quick_gelu, gelu"):
        variant_from_hf_config({"vision_config": {"hidden_act": "relu"}})
    # GELU towers load (tests/test_family.py), but both towers share one activation.
    with pytest.raises(ValueError, match="vision_config.hidden_act='gelu' but text_config"):
        variant_from_hf_config({"vision_config": {"hidden_act": "gelu"}})


def test_bad_checkpoints_are_named(tiny, tiny_loaded):
    _, path = tiny
    state, _ = read_hf_dir(path)
    _, cfg, _ = tiny_loaded
    broken = dict(state)
    del broken["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    broken["text_model.extra.weight"] = np.zeros(3, np.float32)
    broken["text_projection.weight"] = np.zeros((32, 48), np.float32)
    with pytest.raises(ValueError) as err:
        hf_state_dict_to_flax(broken, cfg)
    msg = str(err.value)
    assert "vision_model.encoder.layers.1.self_attn.k_proj.bias" in msg
    assert "text_model.extra.weight" in msg
    assert "text_projection.weight: checkpoint (32, 48) vs model (32, 64)" in msg
    # A checkpoint of another shape than the configured model is rejected by name and shape.
    with pytest.raises(ValueError) as err:
        load_pretrained("hf:" + path, {"variant": "tiny-b16", "context_length": 77})
    msg = str(err.value)
    assert "patch_embedding.weight: checkpoint (64, 3, 8, 8) vs model (64, 3, 16, 16)" in msg
    with pytest.raises(ValueError) as err:
        load_pretrained("hf:" + path, {"variant": "tiny", "vision_layers": 3, "text_layers": 1})
    msg = str(err.value)
    assert "16 missing tensors: vision_model.encoder.layers.2." in msg
    assert "16 unexpected tensors: text_model.encoder.layers.1." in msg
    with pytest.raises(ValueError, match="text_heads: checkpoint 2 vs model 4"):
        load_pretrained("hf:" + path, {"variant": "tiny", "text_heads": 4})


def test_missing_files_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained("hf:" + str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="OpenAI CLIP checkpoint"):
        load_pretrained("openai:" + str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(FileNotFoundError, match="hf:DIR"):
        load_pretrained(str(tmp_path / "nothing_here"))
    empty = tmp_path / "empty_hf"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained("hf:" + str(empty))


def test_plain_pt_must_hold_a_state_dict(tmp_path):
    import torch

    path = str(tmp_path / "list.pt")
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="not a state_dict"):
        read_openai_state_dict(path)
    buf = io.BytesIO()
    torch.save({"state_dict": {"module.logit_scale": torch.tensor(1.0)}}, buf)
    (tmp_path / "wrapped.pt").write_bytes(buf.getvalue())
    assert list(read_openai_state_dict(str(tmp_path / "wrapped.pt"))) == ["logit_scale"]
