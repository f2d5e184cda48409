"""api.load / Encoder: HF parity through the public API, resizing, exported dirs, workdir hook."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers_tiny import (
    TINY,
    hf_image_features,
    hf_text_features,
    make_hf_model,
    save_hf_dir,
    value_only_patch_tokens,
)
from safetensors.numpy import save_file

from beta_clip_jax import api
from beta_clip_jax.data.transforms import normalize as normalize_images
from beta_clip_jax.data.transforms import resize_center_crop

TEXTS = ["a photo of a cat", "two red cubes left of a blue ball", "x", "", "a dog, running."]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _uint8_images(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = make_hf_model(TINY, seed=11)
    return model, save_hf_dir(model, str(tmp_path_factory.mktemp("api_hf")))


@pytest.fixture(scope="module")
def encoder(tiny):
    return api.load(tiny[1], batch_size=4)


def test_hf_dir_embeddings_match_transformers(tiny, encoder):
    hf, _ = tiny
    assert encoder.image_size == 32
    images = _uint8_images(5, 32, 32, seed=1)  # 5 = one full batch of 4 plus a padded one
    pixels = normalize_images(images)
    emb = encoder.embed_images(images)
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, _unit(hf_image_features(hf, pixels)), atol=1e-4)

    dense = encoder.dense_features(images)
    assert dense.shape == (5, 4, 4, 32)
    np.testing.assert_allclose(np.linalg.norm(dense, axis=-1), 1.0, atol=1e-5)
    ref = _unit(value_only_patch_tokens(hf, pixels)).reshape(5, 4, 4, 32)
    np.testing.assert_allclose(dense, ref, atol=1e-4)

    tokens = encoder.tokenize(TEXTS)
    assert tokens.shape == (5, 77) and tokens.dtype == np.int32
    texts = encoder.embed_texts(TEXTS)
    np.testing.assert_allclose(texts, _unit(hf_text_features(hf, tokens)), atol=1e-4)


def test_conditioned_embeddings_and_attention(encoder):
    images = _uint8_images(3, 32, 32, seed=2)
    cond = encoder.conditioned_embeddings(images, TEXTS[:3])
    assert cond.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(cond, axis=-1), 1.0, atol=1e-5)
    attn = encoder.attention(images, TEXTS[:3])
    assert attn.shape == (3, 4, 16)  # tiny pooler: 4 heads over 4x4 patches
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    # Each text conditions only its own image: changing image 2 leaves rows 0 and 1 alone.
    other = images.copy()
    other[2] = 255 - other[2]
    cond2 = encoder.conditioned_embeddings(other, TEXTS[:3])
    np.testing.assert_allclose(cond2[:2], cond[:2], atol=1e-6)
    assert np.abs(cond2[2] - cond[2]).max() > 1e-4
    with pytest.raises(ValueError, match="one text per image"):
        encoder.conditioned_embeddings(images, TEXTS[:2])


def test_other_resolutions_are_resized_and_cropped(encoder):
    images = _uint8_images(2, 48, 40, seed=3)
    crops = np.stack([resize_center_crop(im, 32) for im in images])
    assert crops.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(encoder.embed_images(images), encoder.embed_images(crops))
    native = _uint8_images(1, 32, 32, seed=4)
    assert encoder._images(native) is native  # at the model's resolution: used as given
    with pytest.raises(TypeError, match="uint8"):
        encoder.embed_images(images.astype(np.float32))


def test_exported_dir_reads_pooler_and_meta(tiny, encoder, tmp_path):
    _, hf_dir = tiny
    out = str(tmp_path / "export")
    shutil.copytree(hf_dir, out)
    rng = np.random.default_rng(5)
    pooler = {
        f"pooler/{k}": rng.normal(size=np.shape(v)).astype(np.float32)
        for k, v in _flat(encoder.params["pooler"]).items()
    }
    save_file(pooler, os.path.join(out, "beta_clip_pooler.safetensors"))
    with open(os.path.join(out, "beta_clip_meta.json"), "w") as f:
        json.dump({"model": {"pooler_heads": 4, "dtype": "float32"}}, f)
    loaded = api.load(out, batch_size=4)
    for k, v in _flat(loaded.params["pooler"]).items():
        np.testing.assert_array_equal(np.asarray(v), pooler[f"pooler/{k}"], err_msg=k)
    images = _uint8_images(2, 32, 32, seed=6)
    assert not np.allclose(
        loaded.conditioned_embeddings(images, TEXTS[:2]),
        encoder.conditioned_embeddings(images, TEXTS[:2]),
    )
    # A pooler file of another shape is rejected by name.
    pooler["pooler/fc1/kernel"] = np.zeros((32, 64), np.float32)
    save_file(pooler, os.path.join(out, "beta_clip_pooler.safetensors"))
    with pytest.raises(
        ValueError, match=r"pooler/fc1/kernel: file \(32, 64\) vs model \(32, 128\)"
    ):
        api.load(out)


def test_workdir_goes_through_the_checkpoint_hook(encoder, tmp_path, monkeypatch):
    from beta_clip_jax import checkpoint

    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    calls = []

    def fake_load(path, abstract_params, step=None):
        calls.append((path, step))
        return encoder.params, encoder.model.config, 7

    monkeypatch.setattr(checkpoint, "load_params_from_workdir", fake_load)
    loaded = api.load(str(workdir), batch_size=4)
    assert calls == [(str(workdir), None)]
    images = _uint8_images(2, 32, 32, seed=8)
    np.testing.assert_allclose(loaded.embed_images(images), encoder.embed_images(images), atol=1e-6)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face CLIP directory"):
        api.load(str(tmp_path / "missing"))


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, name) if isinstance(v, dict) else {name: v})
    return out


def test_text_trim_reads_the_eot_position_not_nonzero_ids(tiny, encoder):
    """ "!~" encodes to ids 0, 349: a row of them has few non-zero ids but a late EOT; trimming
    by the non-zero count cut the EOT off and pooled another token."""
    hf, _ = tiny
    texts = ["a" + " !~" * 12, "a cat"]
    tokens = encoder.tokenize(texts)
    assert (tokens[0] == 0).sum() > 12 and int(np.argmax(tokens[0])) == 26
    np.testing.assert_allclose(
        encoder.embed_texts(texts), _unit(hf_text_features(hf, tokens)), atol=1e-4
    )


def test_raw_dense_features_and_float32_evaluation(tiny):
    """dense_features(normalize=False) gives the projected tokens; a bfloat16 model still
    evaluates in float32 (same numbers as the float32 model, bfloat16 would be ~1e-2 off)."""
    hf, path = tiny
    bf16 = api.load(path, batch_size=4, model_cfg=None)
    cfg = dict(bf16.model.config.items(), dtype="bfloat16")
    from beta_clip_jax.methods import build_model

    encoder = api.Encoder(build_model(cfg), bf16.params, batch_size=4)
    assert encoder.model.config.dtype == "float32"
    images = _uint8_images(3, 32, 32, seed=8)
    raw = encoder.dense_features(images, normalize=False)
    ref = value_only_patch_tokens(hf, normalize_images(images)).reshape(3, 4, 4, 32)
    np.testing.assert_allclose(raw, ref, atol=1e-4)
    assert np.abs(np.linalg.norm(raw, axis=-1) - 1).max() > 1e-2  # really not normalised
    np.testing.assert_allclose(encoder.embed_images(images), bf16.embed_images(images), atol=1e-6)


def test_reference_truncation_cuts_without_eot(tiny):
    """truncation="cut" tokenises an over-long text as the reference evaluators do (no EOT);
    the model then pools at the largest id, as argmax(ids) pooling does."""
    _, path = tiny
    cut = api.load(path, batch_size=4, truncation="cut")
    eot = api.load(path, batch_size=4)
    long_text = ["zebra " * 100, "a cat"]
    tokens = cut.tokenize(long_text)
    assert tokens[0, -1] != 49407 and 49407 not in tokens[0]
    assert eot.tokenize(long_text)[0, -1] == 49407
    np.testing.assert_array_equal(tokens[1], eot.tokenize(long_text)[1])
    emb = cut.embed_texts(long_text)
    np.testing.assert_allclose(emb, cut.embed_tokens(tokens), atol=1e-6)
    assert np.abs(emb[0] - eot.embed_texts(long_text)[0]).max() > 1e-3
    np.testing.assert_allclose(emb[1], eot.embed_texts(long_text)[1], atol=1e-6)
    with pytest.raises(ValueError, match="truncation"):
        api.load(path, truncation="drop")
