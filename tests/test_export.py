"""Export (issue #7): workdir -> HF CLIP directory + pooler + meta; PyTorch equals JAX; export
then import gives back every parameter exactly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers_tiny import fast_jit, random_images, random_params, random_tokens
from train_helpers import tiny_config

from beta_clip_jax import api, checkpoint
from beta_clip_jax.convert import META_FILE, POOLER_FILE, import_pretrained
from beta_clip_jax.convert.export import export_params
from beta_clip_jax.convert.names import pooler_file_tensors, pooler_from_torch, pooler_to_torch
from beta_clip_jax.data.transforms import normalize as normalize_images
from beta_clip_jax.methods import build_model, resolve_model_config
from beta_clip_jax.step import abstract_params
from beta_clip_jax.tokenizer import Tokenizer
from beta_clip_jax.torch_pooler import BetaCLIPPooler, from_pretrained

TOL = 1e-4
STEP = 3
# The command line in a fresh interpreter, which must not import torch on the way.
_CLI = (
    "import runpy, sys\n"
    "try:\n"
    "    runpy.run_module('beta_clip_jax.export', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    "assert 'torch' not in sys.modules, 'the export imported torch'\n"
)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype == np.float32, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def make_workdir(wd: str, config, step: int = STEP):
    """A workdir in the trainer's format (config.json + Orbax checkpoint at `step`) holding
    random parameters: cheaper than training, and no leaf keeps its initial value.
    Returns (workdir, params, model config, the saved config dict)."""
    cfg = resolve_model_config(config.model)
    params = random_params(build_model(cfg), seed=7)
    saved = config.to_dict()
    saved["model"] = cfg.to_dict()
    checkpoint.write_json(os.path.join(wd, "config.json"), saved)
    ckpt = checkpoint.Checkpointer(wd, every=1, keep=1, async_save=False)
    ckpt.save(step, params, {"count": np.zeros((), np.int32)}, None, {}, force=True)
    ckpt.close()
    return wd, params, cfg, saved


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("export_wd")), tiny_config())


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    """OUT written by `python -m beta_clip_jax.export` (248-token context)."""
    out = str(tmp_path_factory.mktemp("export") / "out")
    args = [f"--workdir={workdir[0]}", f"--out={out}", f"--step={STEP}"]
    run = subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_export_dir_loads_in_transformers_without_warnings(exported, workdir):
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    _, _, cfg, saved = workdir
    clip, info = CLIPModel.from_pretrained(exported, output_loading_info=True)
    assert all(not v for v in info.values()), info
    text, vision = clip.config.text_config, clip.config.vision_config
    assert text.max_position_embeddings == 248 and clip.config.projection_dim == 32
    assert text.hidden_act == vision.hidden_act == "quick_gelu"
    assert text.layer_norm_eps == vision.layer_norm_eps == 1e-5

    with open(os.path.join(exported, META_FILE)) as f:
        meta = json.load(f)
    assert meta["variant"] == "tiny" and meta["step"] == STEP and meta["context_length"] == 248
    assert meta["model"] == cfg.to_dict()
    assert meta["train_config"] == json.loads(json.dumps(saved))
    assert meta["tokenizer"]["eot_id"] == 49407 and meta["package_version"]
    assert meta["exported_at"].endswith("+00:00")

    texts = ["a photo of a cat", "Two red cubes, left of a blue ball!"]
    ours = Tokenizer().encode(texts, 248)
    hf_ids = CLIPTokenizer.from_pretrained(exported)(texts).input_ids
    for row, ids in zip(ours, hf_ids, strict=True):
        assert list(row[: len(ids)]) == ids and not row[len(ids) :].any()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    processed = CLIPProcessor.from_pretrained(exported)(images=[image], return_tensors="np")
    pixels = processed["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(pixels, normalize_images(image), atol=1e-5)


def test_export_then_import_is_exact(exported, workdir):
    _, params, cfg, _ = workdir
    back, back_cfg, not_provided = import_pretrained(exported)
    assert not_provided == [] and back_cfg.to_dict() == cfg.to_dict()
    _assert_same_params(back, params)
    ckpt_params, _, step = checkpoint.load_params_from_workdir(workdir[0], abstract_params)
    assert step == STEP
    _assert_same_params(back, ckpt_params)


def _jax_outputs(cfg, params, images, tokens):
    """(cls, patches, text [B, K, E], pooled, attention) from our model, not normalised."""
    model = build_model(cfg)

    def run(p, x, t):
        cls, patches = model.apply({"params": p}, x, method="encode_image")
        text = model.apply({"params": p}, t, method="encode_text")
        pooled, attn = model.apply({"params": p}, text, patches, method="pool")
        return cls, patches, text, pooled, attn

    return [np.asarray(a) for a in fast_jit(run)(params, images, tokens)]


@torch.no_grad()
def _check_torch_matches_jax(out, params, cfg, length):
    clip, pooler = from_pretrained(out)
    images = random_images(3, cfg.image_size, seed=1)
    tokens = random_tokens(6, length, seed=2).reshape(3, 2, length)
    cls, patches, text, pooled, attn = _jax_outputs(cfg, params, images, tokens)

    px = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(tokens.astype(np.int64))
    t_cls, t_patches = pooler.encode_image(px)
    hf_cls = clip.get_image_features(pixel_values=px)
    hf_text = clip.get_text_features(input_ids=ids.reshape(6, length))
    t_pooled, t_attn = pooler(pooler.encode_text(ids), t_patches)

    def diff(a, b):
        return float(np.abs(np.asarray(a) - np.asarray(b)).max())

    assert diff(getattr(hf_cls, "pooler_output", hf_cls), cls) < TOL
    assert diff(t_cls, cls) < TOL
    assert diff(getattr(hf_text, "pooler_output", hf_text), text.reshape(6, -1)) < TOL
    grid = cfg.image_size // cfg.patch_size
    assert diff(pooler.dense_features(px), patches.reshape(3, grid, grid, -1)) < TOL
    assert diff(pooler.pooled_embeddings(px, ids), pooled) < TOL
    assert diff(pooler.pooled_embeddings(px, ids[:, 1]), pooled[:, 1]) < TOL
    assert diff(t_pooled, pooled) < TOL and diff(t_attn, attn) < TOL
    return clip, pooler


def test_torch_matches_jax_248_context(exported, workdir):
    _, params, cfg, _ = workdir
    assert (random_tokens(6, 248, seed=2) != 0).sum(-1).max() > 77  # positions past 77 used
    _, pooler = _check_torch_matches_jax(exported, params, cfg, 248)

    # api.load reads the exported directory back to the same embeddings.
    encoder = api.load(exported, batch_size=2)
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    texts = ["a red cube", "a blue ball on the left " * 8]
    px = torch.from_numpy(np.ascontiguousarray(normalize_images(images).transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(encoder.tokenize(texts).astype(np.int64))
    with torch.no_grad():
        cls, _ = pooler.encode_image(px)
        cond = pooler.pooled_embeddings(px, ids)
    unit = torch.nn.functional.normalize
    np.testing.assert_allclose(encoder.embed_images(images), unit(cls, dim=-1), atol=TOL)
    np.testing.assert_allclose(
        encoder.conditioned_embeddings(images, texts), unit(cond, dim=-1), atol=TOL
    )


def test_torch_matches_jax_77_context_and_round_trip(tmp_path):
    cfg = resolve_model_config({"variant": "tiny", "context_length": 77})
    params = random_params(build_model(cfg), seed=9)
    out = export_params(params, cfg, str(tmp_path / "out77"))
    clip, _ = _check_torch_matches_jax(out, params, cfg, 77)
    assert clip.config.text_config.max_position_embeddings == 77
    back, back_cfg, _ = import_pretrained(out)
    assert back_cfg.context_length == 77
    _assert_same_params(back, params)


def test_pooler_table_round_trip_and_errors(workdir, tmp_path):
    _, params, cfg, _ = workdir
    state = pooler_to_torch(pooler_file_tensors(params))
    module = BetaCLIPPooler(cfg.embed_dim, cfg.pooler_heads)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    back = pooler_from_torch({k: v.numpy() for k, v in module.state_dict().items()}, 4)
    _assert_same_params(back, params["pooler"])

    broken = {k: v for k, v in params["pooler"].items() if k != "ln"}
    with pytest.raises(ValueError, match=r"missing \[\('pooler', 'ln', 'bias'\)"):
        pooler_file_tensors(broken)
    extra = {**params, "visual": {**params["visual"], "new_thing": np.zeros(3, np.float32)}}
    with pytest.raises(ValueError, match="not in the table.*visual/new_thing"):
        export_params(extra, cfg, str(tmp_path / "x"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_params(params, cfg, str(tmp_path / "busy"))
    assert POOLER_FILE not in os.listdir(tmp_path / "busy")


def test_smartclip_params_export_without_the_mask_head(workdir, tmp_path):
    """A SmartCLIP model's mask head is training-only: the export drops it and keeps every other
    parameter exactly, and the model config it records is a plain beta-CLIP one."""
    from beta_clip_jax.methods import complete_params

    _, params, cfg, _ = workdir
    smart_cfg = cfg.to_dict() | {"method": "smartclip"}
    smart = complete_params(params, build_model(resolve_model_config(smart_cfg)))
    assert "smart_mask" in smart
    out = export_params(smart, smart_cfg, str(tmp_path / "out"))
    back, back_cfg, not_provided = import_pretrained(out)
    assert not_provided == [] and back_cfg.method == "beta_clip"
    _assert_same_params(back, params)
    with open(os.path.join(out, META_FILE)) as f:
        assert json.load(f)["model"]["method"] == "beta_clip"


@pytest.mark.parametrize("branch_type", ["cls", "mlp"])
def test_multi_branch_holistic_export_is_refused_by_name(tmp_path, branch_type):
    import jax

    from beta_clip_jax.methods import model_config
    from beta_clip_jax.models.clip import init_params

    cfg = model_config(
        "tiny", method="holistic", image_branches=3, branch_type=branch_type, branch_layers=1
    )
    params = init_params(build_model(cfg), jax.random.key(0))
    with pytest.raises(ValueError, match="3 image branches.*api.load"):
        export_params(params, cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
