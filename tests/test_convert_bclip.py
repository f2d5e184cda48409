"""Importing official β-CLIP training checkpoints (`bclip:`) and Long-CLIP `.pt` files.

The official-layout files come from helpers_bclip (a transformers CLIPModel and a torch pooler
under a mapping HF -> official written independently of the converter).
"""

import argparse
import io
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch
from helpers_bclip import (
    POOL,
    OfficialPooler,
    official_shapes,
    official_state_dict,
    save_training_checkpoint,
)
from helpers_tiny import (
    EOT,
    SOT,
    fast_jit,
    hf_image_features,
    hf_to_openai_state_dict,
    make_hf_model,
    random_images,
    random_tokens,
    value_only_patch_tokens,
)

from beta_clip_jax.convert import import_pretrained, parse_spec
from beta_clip_jax.convert.bclip import (
    bclip_to_hf_state_dict,
    expected_bclip_shapes,
    read_bclip_checkpoint,
    variant_from_bclip_state_dict,
)
from beta_clip_jax.convert.names import hf_state_dict_to_flax
from beta_clip_jax.convert.torch_pickle import RestrictedUnpickler, read_torch_file
from beta_clip_jax.methods import build_model

# 64-wide heads as in the official towers (bclip files do not record heads); the towers differ in
# width so that a swapped tensor cannot fit. The pooler has 8 heads of 8.
# fmt: off
LAYOUT = dict(
    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                image_size=32, patch_size=8),
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=248),
    projection_dim=64,
)
# fmt: on


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = make_hf_model(LAYOUT, seed=11)
    torch.manual_seed(12)
    pooler = OfficialPooler(LAYOUT["projection_dim"]).eval()
    with torch.no_grad():
        for p in pooler.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    table = hf.text_model.embeddings.position_embedding.weight.detach()
    # The rows the model never reads differ from the used ones, so mixing them up shows.
    frozen, res = table.clone(), table.clone()
    frozen[20:] += torch.randn(frozen[20:].shape)
    res[:20] += torch.randn(res[:20].shape)
    official = official_state_dict(hf, pooler, frozen, res)
    path = save_training_checkpoint(tmp_path_factory.mktemp("bclip") / "ckpt.pt", official, pooler)
    return dict(hf=hf, pooler=pooler, official=official, path=path, frozen=frozen, res=res)


@pytest.fixture(scope="module")
def loaded(ckpt):
    params, cfg, not_provided = import_pretrained("bclip:" + ckpt["path"])
    model = build_model(cfg)
    fns = {
        m: fast_jit(lambda p, *x, m=m: model.apply({"params": p}, *x, method=m))
        for m in ("encode_image", "encode_text", "pool")
    }
    return params, cfg, not_provided, fns


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@torch.no_grad()
def argmax_pooled_text(hf, tokens) -> np.ndarray:
    """The official encode_text pooling: the final-LN hidden state at argmax(token id)."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    hidden = hf.text_model(input_ids=ids).last_hidden_state
    return hf.text_projection(hidden[torch.arange(len(ids)), ids.argmax(-1)]).numpy()


def test_bclip_checkpoint_matches_torch(ckpt, loaded):
    hf = ckpt["hf"]
    params, cfg, not_provided, fns = loaded
    assert not_provided == []
    assert (cfg.vision_heads, cfg.text_heads, cfg.pooler_heads) == (1, 2, 8)
    assert (cfg.context_length, cfg.embed_dim, cfg.image_size) == (248, 64, 32)
    pos = params["text"]["positional_embedding"]
    np.testing.assert_array_equal(pos[:20], ckpt["frozen"][:20].numpy())
    np.testing.assert_array_equal(pos[20:], ckpt["res"][20:].numpy())
    images = random_images(2, 32, seed=13)
    cls, patches = fns["encode_image"](params, images)
    assert _max_diff(cls, hf_image_features(hf, images)) < 1e-4
    assert _max_diff(patches, value_only_patch_tokens(hf, images)) < 1e-4
    tokens = random_tokens(3, 248, seed=14)
    tokens[0, 1:] = np.arange(1, 248)  # EOT in the last slot
    tokens[0, -1] = EOT
    # Truncated captions have no EOT: one with a late largest id, one pooled at SOT.
    rng = np.random.default_rng(15)
    no_eot = rng.integers(1, 49000, size=(2, 248)).astype(np.int32)
    no_eot[0, 200], no_eot[1, 0] = 49300, SOT
    tokens = np.concatenate([tokens, no_eot])
    text = fns["encode_text"](params, tokens)
    assert _max_diff(text, argmax_pooled_text(hf, tokens)) < 1e-4
    np.testing.assert_allclose(params["logit_scale"], hf.logit_scale.item(), rtol=1e-6)


@torch.no_grad()
def test_pooler_matches_official_block(ckpt, loaded):
    params, cfg, _, fns = loaded
    rng = np.random.default_rng(16)
    q, kv = rng.normal(size=(2, 3, 64)), rng.normal(size=(2, 16, 64))
    q, kv = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, kv))
    q, kv = q.astype(np.float32), kv.astype(np.float32)
    want = ckpt["pooler"](torch.from_numpy(q), torch.from_numpy(kv)).numpy()
    got, attn = fns["pool"](params, q, kv)
    assert attn.shape == (2, 8, 3, 16)
    assert _max_diff(got, want) < 2e-4
    assert float(params["pooler"]["logit_scale"]) == ckpt["pooler"].logit_scale.item()


def test_checkpoint_contents_and_bare_path(ckpt, tmp_path):
    path = ckpt["path"]
    assert parse_spec(path) == ("bclip", path)
    sd, meta = read_bclip_checkpoint(path)
    assert meta["epoch"] == 5 and meta["best_acc1"] == 0 and meta["args"]["k"] == 36
    assert sorted(sd) == sorted(ckpt["official"])
    # The whole file also reads, optimizer and scaler included.
    full = read_torch_file(path)
    moments = next(iter(full["optimizer"]["state"].values()))
    assert isinstance(moments["exp_avg"], np.ndarray) and moments["step"] == 1
    assert full["scaler"]["scale"] == 65536.0 and full["args"].betas == (0.9, 0.98)
    plain = tmp_path / "ViT.pt"
    torch.save(hf_to_openai_state_dict(ckpt["hf"]), plain)
    assert parse_spec(str(plain)) == ("openai", str(plain))


def test_torch_zip_values(tmp_path):
    base = torch.randn(4, 6)
    saved = {
        "bf16": base.bfloat16(),
        "half": base.half(),
        "view": base.t()[1:, ::2],  # strided view into a shared storage
        "ints": torch.arange(5),
        "scalar": torch.tensor(2.5),
    }
    torch.save(saved, tmp_path / "x.pt")
    got = read_torch_file(str(tmp_path / "x.pt"))
    for k, v in saved.items():
        np.testing.assert_array_equal(got[k], v.float().numpy() if k == "bf16" else v.numpy(), k)
    assert got["half"].dtype == np.float16 and got["ints"].dtype == np.int64
    # The legacy (non-zip) format goes through torch.load(weights_only=True).
    legacy = str(tmp_path / "legacy.pt")
    torch.save({"state_dict": saved}, legacy, _use_new_zipfile_serialization=False)
    assert parse_spec(legacy) == ("openai", legacy)
    got = read_torch_file(legacy)["state_dict"]
    np.testing.assert_array_equal(got["bf16"], saved["bf16"].float().numpy())
    np.testing.assert_array_equal(got["view"], saved["view"].numpy())


def _zeros(shapes):
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def test_l14_shapes_without_a_big_model():
    full = official_shapes(1024, 24, 768, 12, 768, 49408)
    cfg = variant_from_bclip_state_dict(_zeros(full))  # zero-stride views: no memory
    assert cfg.variant == "L/14" and cfg.context_length == 248
    assert (cfg.vision_heads, cfg.text_heads, cfg.pooler_heads) == (16, 12, 8)
    assert expected_bclip_shapes(cfg) == full
    # One layer per tower and a small vocabulary: the whole conversion, still L/14 widths.
    small = _zeros(official_shapes(1024, 1, 768, 1, 768, 1000))
    cfg = variant_from_bclip_state_dict({"module." + k: v for k, v in small.items()})
    assert cfg.variant == "custom" and (cfg.vision_layers, cfg.text_layers) == (1, 1)
    state, pooler = bclip_to_hf_state_dict(small, cfg)
    assert pooler["query"]["kernel"].shape == (768, 8, 96)
    assert pooler["out"]["kernel"].shape == (8, 96, 768)
    params = hf_state_dict_to_flax(state, cfg)
    assert params["visual"]["last_block"]["query"]["kernel"].shape == (1024, 16, 64)
    assert params["text"]["blocks"]["query"]["kernel"].shape == (1, 768, 12, 64)
    assert params["visual"]["proj"]["kernel"].shape == (1024, 768)


def test_missing_unexpected_and_misshaped_are_named(ckpt, tmp_path):
    broken = dict(ckpt["official"])
    del broken["visual.blocks.1.attn.qkv.bias"]
    del broken[POOL + "ln_2.bias"]
    broken["visual.head.weight"] = torch.zeros(3)
    broken["visual.blocks.0.mlp.fc1.weight"] = torch.zeros(255, 64)
    path = save_training_checkpoint(tmp_path / "broken.pt", broken, ckpt["pooler"])
    with pytest.raises(ValueError) as err:
        import_pretrained("bclip:" + path)
    msg = str(err.value)
    for name in ("visual.blocks.1.attn.qkv.bias", POOL + "ln_2.bias", "visual.head.weight"):
        assert name in msg
    assert "visual.blocks.0.mlp.fc1.weight: β-CLIP checkpoint (255, 64) vs model (256, 64)" in msg
    with pytest.raises(ValueError, match="pooler_heads: checkpoint 8 vs model 4"):
        import_pretrained("bclip:" + ckpt["path"], {**_cfg(ckpt), "pooler_heads": 4})


def _cfg(ckpt):
    return variant_from_bclip_state_dict(ckpt["official"]).to_dict()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pt")
    payload = {"state_dict": {POOL + "logit_scale": 0.0}, "args": _Evil(marker)}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("evil/version", "3\n")
    for spec in ("bclip:" + path, "openai:" + path, path):
        with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
            import_pretrained(spec)
    assert not marker.exists()
    # A pickle may set attributes on whatever it names (BUILD with slot state); what the reader
    # hands out is private to one load, so argparse itself stays intact.
    build = b"cargparse\nNamespace\n(N}S'__repr__'\nNstbN."
    assert RestrictedUnpickler(io.BytesIO(build)).load() is None
    assert repr(argparse.Namespace(a=1)) == "Namespace(a=1)"


def test_long_clip_positions_and_unknown_keys(ckpt, loaded, tmp_path):
    sd = hf_to_openai_state_dict(ckpt["hf"])
    sd["positional_embedding"] = ckpt["frozen"]
    sd["positional_embedding_res"] = ckpt["res"]
    torch.save(sd, tmp_path / "longclip-B.pt")
    params, cfg, not_provided = import_pretrained("openai:" + str(tmp_path / "longclip-B.pt"))
    assert cfg.context_length == 248 and not_provided
    pos = params["text"]["positional_embedding"]
    np.testing.assert_array_equal(pos[:20], ckpt["frozen"][:20].numpy())
    np.testing.assert_array_equal(pos[20:], ckpt["res"][20:].numpy())
    # Same weights as the β-CLIP file, so the towers come out identical.
    for name in ("visual", "text", "logit_scale"):
        jax.tree.map(np.testing.assert_array_equal, params[name], loaded[0][name])
    sd["visual.extra_head"] = torch.zeros(2)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected tensors: visual.extra_head"):
        import_pretrained("openai:" + str(tmp_path / "extra.pt"))
