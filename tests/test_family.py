"""The CLIP family in: GELU towers, MLPs of any width, LayerNorm eps, hub ids from the local cache,
two-tower HF directories, open_clip checkpoints, and the refusal of OpenAI-named state dicts whose
activation no file tells.

One tiny GELU model (MLP 2x the width, LayerNorm eps 0.1, so a wrong eps shows) is built twice,
by transformers and by open_clip, with the same shapes: both load into one model config, so the
two compiled encoders serve every parity check here.
"""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from helpers_openclip import import_open_clip
from helpers_tiny import (
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

from beta_clip_jax import api
from beta_clip_jax.convert import (
    flax_to_hf_state_dict,
    hf_config_from_variant,
    import_pretrained,
    parse_spec,
    variant_from_hf_config,
    write_hf_dir,
)
from beta_clip_jax.convert.openai import openai_activation, read_openai_state_dict
from beta_clip_jax.convert.openclip import MODEL_CONFIGS, variant_from_openclip_config
from beta_clip_jax.methods import resolve_model_config
from beta_clip_jax.models import variants
from beta_clip_jax.models.clip import LOGIT_SCALE_INIT
from beta_clip_jax.models.layers import ACTIVATIONS

TOL = 1e-4
EPS = 0.1  # LayerNorm eps of the tiny family model: far from 1e-5, so using the wrong one shows
_ARCH = dict(hidden_act="gelu", intermediate_size=128, layer_norm_eps=EPS)
GELU_LAYOUT = {
    "vision": {**TINY["vision"], **_ARCH},
    "text": {**TINY["text"], **_ARCH},
    "projection_dim": 32,
}
# The same architecture as open_clip writes it (head_width 32 = 2 heads of the 64-wide tower).
OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                   "mlp_ratio": 2.0, "patch_size": 8, "norm_kwargs": {"eps": EPS}},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2, "mlp_ratio": 2.0, "norm_kwargs": {"eps": EPS}},
}  # fmt: skip


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _assert_same_tree(a, b, skip=()):
    for path, leaf in jax.tree_util.tree_leaves_with_path(a):
        name = jax.tree_util.keystr(path)
        if not any(s in name for s in skip):
            other = b
            for k in path:
                other = other[k.key]
            np.testing.assert_array_equal(leaf, other, err_msg=name)


@pytest.fixture(scope="module")
def gelu_hf(tmp_path_factory):
    model = make_hf_model(GELU_LAYOUT, seed=5)
    return model, save_hf_dir(model, str(tmp_path_factory.mktemp("gelu_hf")))


@pytest.fixture(scope="module")
def gelu_encoder(gelu_hf):
    return api.load("hf:" + gelu_hf[1], batch_size=2)


@pytest.fixture(scope="module")
def encoders(gelu_encoder):
    """Jitted (encode_image, encode_text) of the family model config."""
    model = gelu_encoder.model
    image = fast_jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    text = fast_jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))
    return image, text


def test_activations_are_the_hf_definitions():
    from transformers.activations import ACT2FN

    assert tuple(ACTIVATIONS) == variants.ACTIVATIONS  # what configs may name is what runs
    x = np.linspace(-6.0, 6.0, 2001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        theirs = ACT2FN[name](torch.from_numpy(x)).numpy()
        # Exact and tanh GELU differ by up to ~5e-4 here: a swapped definition fails.
        assert _max_diff(fn(x), theirs) < 1e-6, name


def test_configs_without_the_new_fields_resolve_as_before():
    stored = {  # a "custom" config as a checkpoint written before these fields stored it
        "variant": "custom", "image_size": 32, "patch_size": 8, "vision_width": 64,
        "vision_layers": 2, "vision_heads": 2, "text_width": 48, "text_layers": 1,
        "text_heads": 2, "vocab_size": 49408, "context_length": 77, "embed_dim": 32,
        "pooler_heads": 4,
    }  # fmt: skip
    cfg = resolve_model_config(stored)
    assert (cfg.vision_mlp_dim, cfg.text_mlp_dim) == (256, 192)
    assert (cfg.activation, cfg.layer_norm_eps) == ("quick_gelu", 1e-5)
    # A width override on a variant keeps the MLP at 4 x the new width.
    assert resolve_model_config({"variant": "B/16", "vision_width": 384}).vision_mlp_dim == 1536
    assert resolve_model_config({"variant": "bigG/14"}).vision_mlp_dim == 8192
    with pytest.raises(ValueError, match=r"activation='relu' \(allowed"):
        resolve_model_config({"variant": "tiny", "activation": "relu"})


def test_gelu_hf_dir_matches_transformers(gelu_hf, gelu_encoder, encoders):
    hf, _ = gelu_hf
    cfg = gelu_encoder.model.config
    assert (cfg.activation, cfg.vision_mlp_dim, cfg.text_mlp_dim) == ("gelu", 128, 128)
    assert cfg.layer_norm_eps == EPS and cfg.variant == "custom"
    images, tokens = random_images(3, 32, seed=1), random_tokens(4, 77, seed=2)
    cls, patches = encoders[0](gelu_encoder.params, images)
    assert _max_diff(cls, hf_image_features(hf, images)) < TOL
    assert _max_diff(patches, value_only_patch_tokens(hf, images)) < TOL
    text = encoders[1](gelu_encoder.params, tokens)
    assert _max_diff(text, hf_text_features(hf, tokens)) < TOL


def _cache_snapshot(cache, repo_id: str, files_from: str) -> None:
    """`files_from`'s files as the Hugging Face cache keeps a download of `repo_id`."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(files_from, os.path.join(repo, "snapshots", commit))


def test_hub_id_loads_from_the_local_cache_only(gelu_hf, gelu_encoder, tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    _cache_snapshot(cache, "tiny-org/gelu-clip", gelu_hf[1])
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params, cfg, _ = import_pretrained("hf:tiny-org/gelu-clip")
    assert cfg.to_dict() == gelu_encoder.model.config.to_dict()
    _assert_same_tree(params, gelu_encoder.params, skip=("pooler",))
    with pytest.raises(FileNotFoundError) as err:
        import_pretrained("hf:tiny-org/not-cached")
    assert "'tiny-org/not-cached'" in str(err.value) and cache in str(err.value)


def test_vision_and_text_tower_directories(gelu_hf, gelu_encoder, tmp_path):
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    hf, _ = gelu_hf
    tower_configs = [copy.deepcopy(hf.config.vision_config), copy.deepcopy(hf.config.text_config)]
    for c in tower_configs:  # CLIPModel keeps the joint width on its own config
        c.projection_dim = hf.config.projection_dim
    vision = CLIPVisionModelWithProjection(tower_configs[0])
    text = CLIPTextModelWithProjection(tower_configs[1])
    for tower, name in ((vision, "vision"), (text, "text")):
        missing = tower.load_state_dict(hf.state_dict(), strict=False).missing_keys
        assert not missing, missing
        tower.save_pretrained(str(tmp_path / "pair" / name))
    params, cfg, not_provided = import_pretrained("hf:" + str(tmp_path / "pair"))
    assert cfg.to_dict() == gelu_encoder.model.config.to_dict()
    _assert_same_tree(params, gelu_encoder.params, skip=("pooler", "logit_scale"))
    assert params["logit_scale"] == np.float32(LOGIT_SCALE_INIT)
    assert "logit_scale" in not_provided
    with pytest.raises(ValueError, match="model_type 'clip_text_model'.*DIR/text"):
        import_pretrained("hf:" + str(tmp_path / "pair" / "text"))


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory):
    """(open_clip model, its directory): open_clip_config.json + open_clip_pytorch_model.bin."""
    open_clip = import_open_clip()
    path = tmp_path_factory.mktemp("openclip")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPENCLIP_CFG}))
    # local-dir: reads the config file itself; without weights there, it initialises randomly.
    model = open_clip.create_model("local-dir:" + str(path)).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return model, str(path)


def test_openclip_checkpoint_matches_open_clip(openclip_dir, gelu_encoder, encoders):
    model, path = openclip_dir
    assert parse_spec(path) == ("openclip", path)
    loaded = api.load("openclip:" + os.path.join(path, "open_clip_pytorch_model.bin"))
    # The same architecture as the HF model: both land on one config (and its compiled encoders).
    assert loaded.model.config.to_dict() == gelu_encoder.model.config.to_dict()
    images, tokens = random_images(3, 32, seed=3), random_tokens(4, 77, seed=4)
    with torch.no_grad():
        ref_image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        ref_text = model.encode_text(torch.from_numpy(tokens.astype(np.int64)))
    cls, _ = encoders[0](loaded.params, images)
    assert _max_diff(cls, ref_image.numpy()) < TOL
    assert _max_diff(encoders[1](loaded.params, tokens), ref_text.numpy()) < TOL
    np.testing.assert_allclose(loaded.params["logit_scale"], model.logit_scale.item())


def test_openai_refuses_a_state_dict_it_cannot_place(gelu_hf, gelu_encoder, tmp_path):
    hf, _ = gelu_hf
    plain = save_openai_pt(hf, str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(ValueError) as err:
        import_pretrained("openai:" + plain)
    for words in ("does not tell its MLP activation", f"openclip:{plain}@MODEL",
                  "model.activation='quick_gelu' or 'gelu'"):  # fmt: skip
        assert words in str(err.value)
    # A model config that states the activation settles it.
    cfg = gelu_encoder.model.config.to_dict()
    params, got, _ = import_pretrained("openai:" + plain, cfg)
    assert got.activation == "gelu"
    _assert_same_tree(params, gelu_encoder.params, skip=("pooler",))
    # A model config leaving it unset is QuickGELU, which this checkpoint (from HF) is not.
    with pytest.raises(ValueError, match="activation: checkpoint 'gelu' vs model 'quick_gelu'"):
        import_pretrained("hf:" + gelu_hf[1], {**cfg, "activation": ""})


class _Modules(torch.nn.Module):
    """A TorchScript-able tree: an OpenAI tensor or two and an activation module."""

    def __init__(self, activation: torch.nn.Module):
        super().__init__()
        self.gelu = activation
        self.register_buffer("text_projection", torch.zeros(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gelu(x)


def test_torchscript_archives_tell_their_activation(gelu_hf, tmp_path):
    import warnings

    # OpenAI's release format: QuickGELU, as for Long-CLIP (covered in test_convert_bclip.py).
    archive = save_openai_torchscript(gelu_hf[0], str(tmp_path / "released.pt"))
    assert openai_activation(archive, read_openai_state_dict(archive))[0] == "quick_gelu"
    # A scripted model holding torch.nn.GELU (a scripted LAION model) is not OpenAI's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Modules(torch.nn.GELU())).save(str(tmp_path / "gelu.pt"))
    path = str(tmp_path / "gelu.pt")
    activation, why = openai_activation(path, read_openai_state_dict(path))
    assert activation is None and "GELU modules" in why


def test_openclip_model_table_and_refusals(tmp_path):
    big = variant_from_openclip_config(MODEL_CONFIGS["ViT-bigG-14"], "ViT-bigG-14")
    assert big.variant == "bigG/14" and big.activation == "gelu"
    assert (big.vision_heads, big.vision_mlp_dim, big.text_heads, big.text_mlp_dim) == (
        16,
        8192,
        20,
        5120,
    )
    g = variant_from_openclip_config(MODEL_CONFIGS["ViT-g-14"], "ViT-g-14")
    assert (g.variant, g.vision_heads, g.vision_mlp_dim) == ("g/14", 16, 6144)
    quick = variant_from_openclip_config(MODEL_CONFIGS["ViT-H-14-quickgelu"], "H")
    assert (quick.variant, quick.activation) == ("H/14", "quick_gelu")
    layer_scale = {**OPENCLIP_CFG, "vision_cfg": {**OPENCLIP_CFG["vision_cfg"], "ls_init_value": 1}}
    with pytest.raises(ValueError, match=r"vision_cfg\.ls_init_value=1"):
        variant_from_openclip_config(layer_scale, "ls")
    weights = tmp_path / "epoch_3.pt"
    torch.save({"logit_scale": torch.tensor(1.0)}, weights)
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json beside.*@MODEL"):
        import_pretrained(f"openclip:{weights}")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-1'.*ViT-bigG-14"):
        import_pretrained(f"openclip:{weights}@ViT-Q-1")


def test_hf_config_round_trip_through_transformers(gelu_hf, gelu_encoder, tmp_path):
    from transformers import CLIPModel

    hf, _ = gelu_hf
    cfg = gelu_encoder.model.config
    written = hf_config_from_variant(cfg)
    assert written["vision_config"]["hidden_act"] == "gelu"
    assert written["text_config"]["intermediate_size"] == 128
    assert variant_from_hf_config(written).to_dict() == cfg.to_dict()
    out = str(tmp_path / "out")
    write_hf_dir(out, flax_to_hf_state_dict(gelu_encoder.params, cfg), written)
    back = CLIPModel.from_pretrained(out).eval()
    images, tokens = random_images(2, 32, seed=5), random_tokens(2, 16, seed=6)
    assert _max_diff(hf_image_features(back, images), hf_image_features(hf, images)) < 1e-6
    assert _max_diff(hf_text_features(back, tokens), hf_text_features(hf, tokens)) < 1e-6
