"""A publishable export (issue "The CLIP family in and out"): the README.md model card with the
workdir's last evaluation, 0644 files whatever the umask, no path of this machine in any file, the
open_clip layout, a diffusers text encoder at 248 positions inside tiny SD 1.x and SDXL
pipelines, and the PyTorch pooler where JAX cannot be imported."""

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from helpers_tiny import fast_jit, random_params
from test_export import STEP, _flat, make_workdir
from train_helpers import tiny_config

from beta_clip_jax import api, torch_pooler
from beta_clip_jax.convert import POOLER_FILE, model_card
from beta_clip_jax.convert.export import check_formats, export_params, export_workdir
from beta_clip_jax.convert.export_formats import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from beta_clip_jax.convert.names import hf_state_dict_to_flax, pooler_file_tensors, pooler_to_torch
from beta_clip_jax.convert.openai import openai_to_hf_state_dict
from beta_clip_jax.data.transforms import normalize
from beta_clip_jax.data.transforms import normalize as normalize_images
from beta_clip_jax.methods import build_model, resolve_model_config
from beta_clip_jax.tokenizer import Tokenizer

TOL = 1e-4
HOME = os.path.expanduser("~")
TMP = tempfile.gettempdir()
# metrics.jsonl of the run: evaluations at steps 2 and 3, and one at step 5, after the exported
# checkpoint (STEP = 3), which describes other weights and must stay out of the card.
METRICS = [
    {"step": 1, "train/loss": 3.5},
    {"step": 2, "eval/urban1k/t2i_r1": 12.5, "eval/urban1k/i2t_r1": 10.25},
    {"step": 3, "train/loss": 2.75},
    {
        "step": 3,
        "eval/urban1k/t2i_r1": 15.125,
        "eval/urban1k/i2t_r1": 11.0,
        "eval/urban1k/tci_t2i_r1": 31.5,
        "eval/fgovd/hard": 33.3333,
        "eval/fgovd/num_images": 120,
    },
    {"step": 5, "eval/urban1k/t2i_r1": 99.0},
]
CARD_EVAL = {  # what the card must show: each dataset's last evaluation at or before STEP
    ("urban1k", "t2i_r1"): 15.125,
    ("urban1k", "i2t_r1"): 11.0,
    ("urban1k", "t2i_r1 (text-conditioned*)"): 31.5,
    ("fgovd", "hard"): 33.3333,
    ("fgovd", "num_images"): 120,
}
PROMPT = "a small red cube to the left of a large blue ball on a wooden table, " * 9
_CLI = (
    "import os, runpy, sys\n"
    "os.umask(0o077)  # what a private umask would give: the export must not care\n"
    "try:\n"
    "    runpy.run_module('beta_clip_jax.export', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    "assert 'torch' not in sys.modules, 'the export imported torch'\n"
)


def _run_cli(*args):
    run = subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir (test_export's: random parameters at STEP) whose config names absolute paths
    (home and temp directories) for the base weights, the data and an eval, with evaluations
    in metrics.jsonl."""
    wd = tmp_path_factory.mktemp("publish_wd")
    config = tiny_config()
    config.init = f"openai:{HOME}/weights/ViT-B-16.pt"
    config.data.name = "jsonl"
    config.data.path = str(wd / "data" / "train_spacy.jsonl")
    config.data.image_root = os.path.join(TMP, "sharegpt4v", "images")
    config.evals.urban1k = {"kind": "urban1k", "root": str(wd / "Urban1k"), "every": 2}
    made = make_workdir(str(wd), config)
    with open(wd / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in METRICS)
    return made


@pytest.fixture(scope="module")
def encoder(trained):
    return api.load(trained[0], batch_size=2)


@pytest.fixture(scope="module")
def published(trained, tmp_path_factory):
    """`python -m beta_clip_jax.export --format=hf,open_clip` under umask 077, into a folder
    whose parent it creates too."""
    out = str(tmp_path_factory.mktemp("publish") / "exports" / "b16_beta")
    _run_cli(f"--workdir={trained[0]}", f"--out={out}", f"--step={STEP}", "--format=hf,open_clip")
    return out


@pytest.fixture(scope="module")
def text_encoder_dir(trained, tmp_path_factory):
    """`--text_encoder_only`: a diffusers text_encoder/ + tokenizer/ pair."""
    out = str(tmp_path_factory.mktemp("publish") / "te")
    _run_cli(f"--workdir={trained[0]}", f"--out={out}", "--text_encoder_only")
    return out


@pytest.fixture(scope="module")
def sdxl_dir(trained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("publish") / "te2")
    old = os.umask(0o077)
    try:
        return export_workdir(trained[0], out, formats=("sdxl_text_encoder_2",))
    finally:
        os.umask(old)


def _walk(root):
    for base, dirs, files in os.walk(root):
        yield from (os.path.join(base, d) for d in dirs)
        yield from (os.path.join(base, f) for f in files)


def test_every_file_is_0644_and_every_folder_0755(published, text_encoder_dir, sdxl_dir):
    for root in (published, text_encoder_dir, sdxl_dir):
        paths = [root, *_walk(root)] + ([os.path.dirname(root)] if root == published else [])
        assert any(p.endswith(".safetensors") for p in paths)  # safetensors alone writes 0600
        for path in paths:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode == (0o755 if os.path.isdir(path) else 0o644), (path, oct(mode))


def test_no_file_holds_a_path_of_this_machine(trained, published, text_encoder_dir, sdxl_dir):
    workdir = trained[0]
    needles = [os.path.abspath(workdir), TMP.rstrip(os.sep) + os.sep]
    needles += [HOME.rstrip(os.sep) + os.sep] if len(HOME) > 1 else []
    with open(os.path.join(workdir, "config.json")) as f:
        config_text = f.read()
    assert all(n in config_text for n in needles)  # the workdir's own config has them all
    for root in (published, text_encoder_dir, sdxl_dir):
        for path in _walk(root):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    data = f.read()
                for needle in needles:
                    assert needle.encode() not in data, (path, needle)
    with open(os.path.join(published, "beta_clip_meta.json")) as f:
        meta = json.load(f)
    assert meta["train_config"]["init"] == "openai:ViT-B-16.pt"
    assert meta["train_config"]["data"]["path"] == "train_spacy.jsonl"
    assert meta["train_config"]["evals"]["urban1k"]["root"] == "Urban1k"
    assert meta["source"] == os.path.basename(workdir) and meta["formats"] == ["hf", "open_clip"]
    assert meta["files"] == sorted(os.listdir(published))


def _card_rows(card: str) -> dict:
    """{(dataset, metric): (value, step)} from the card's evaluation table."""
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"-?[\d.]+", cells[2]):
            rows[(cells[0], cells[1])] = (float(cells[2]), int(cells[3]))
    return rows


def test_card_describes_the_run_and_its_last_evaluation(published):
    with open(os.path.join(published, "README.md")) as f:
        card = f.read()
    rows = _card_rows(card)
    assert set(rows) == set(CARD_EVAL)
    for key, value in CARD_EVAL.items():
        shown, step = rows[key]
        assert step == STEP and abs(shown - value) <= 5e-4 * abs(value), (key, shown, value)
    assert (
        card.startswith("---\nlicense: mit\n")
        and "base_model: openai/clip-vit-base-patch16" in card
    )
    for text in (
        "β-CLIP",
        "OpenAI CLIP ViT-B/16 (`openai:ViT-B-16.pt`)",
        "`jsonl`, file `train_spacy.jsonl`",
        "mode ce, β = 0.5",
        "batch: 8 images",
        "towers 0.001 -> 0.0001",
        "step 3",
        "MIT licence",
        'create_model_and_transforms("local-dir:b16_beta")',
        'CLIPModel.from_pretrained("b16_beta")',
        "from beta_clip_pooler import from_pretrained",
        "StableDiffusionPipeline",
    ):
        assert text in card, text


def test_last_evaluation_falls_back_to_eval_results_json(tmp_path):
    assert model_card.last_evaluation(str(tmp_path)) == {}
    results = {"urban1k": {"t2i_r1": 40.0}, "fgovd": {"hard": 20.0}}
    (tmp_path / "eval_results.json").write_text(json.dumps({"step": 7, "results": results}))
    got = model_card.last_evaluation(str(tmp_path))
    assert got == {d: {"step": 7, "metrics": m} for d, m in results.items()}
    assert model_card.last_evaluation(str(tmp_path), up_to_step=6) == {}
    (tmp_path / "eval_results.json").write_text(json.dumps({"results": results}))
    with pytest.raises(ValueError, match="eval_results.json"):
        model_card.last_evaluation(str(tmp_path))


def test_base_weights_licence_and_path_names():
    large = model_card.base_weights("openai:/data/w/ViT-L-14.pt")
    assert (large.spec, large.hub_id, large.license) == (
        "openai:ViT-L-14.pt",
        "openai/clip-vit-large-patch14",
        "mit",
    )
    assert model_card.base_weights("hf:/w/clip-vit-base-patch16").license == "mit"
    assert model_card.base_weights("").license is None
    official = model_card.base_weights("bclip:/w/bclip_b16_ce.pt")
    assert official.license is None and official.spec == "bclip:bclip_b16_ce.pt"
    cfg = resolve_model_config({"variant": "tiny"}).to_dict()
    card = model_card.render_model_card(
        model_card.CardInputs(
            cfg=cfg, name="x", formats=("hf",), train_config={"init": "bclip:/w/b.pt"}
        )
    )
    assert "license: other" in card and "See the base model's licence" in card
    assert "No evaluation was recorded" in card
    assert model_card.public_name("a,/b/c.json run /w/x gs://bucket/y rel/z") == (
        "a,c.json run x gs://bucket/y rel/z"
    )


def test_open_clip_weights_read_back_through_the_openai_importer(published, trained):
    """The open_clip state dict has OpenAI CLIP's names and layout: our OpenAI importer, written
    for OpenAI's own checkpoints, reads it back to every parameter exactly."""
    from safetensors.numpy import load_file

    _, params, cfg, _ = trained
    state = load_file(os.path.join(published, OPEN_CLIP_WEIGHTS))
    assert state["positional_embedding"].shape == (248, cfg.text_width)
    back = hf_state_dict_to_flax(openai_to_hf_state_dict(state), cfg)
    want = {k: v for k, v in params.items() if k != "pooler"}
    flat_back, flat_want = _flat(back), _flat(want)
    assert sorted(flat_back) == sorted(flat_want)
    for key, value in flat_want.items():
        np.testing.assert_array_equal(flat_back[key], value, err_msg=key)
    with open(os.path.join(published, OPEN_CLIP_CONFIG)) as f:
        config = json.load(f)
    text, vision = config["model_cfg"]["text_cfg"], config["model_cfg"]["vision_cfg"]
    assert text["context_length"] == 248 and config["model_cfg"]["quick_gelu"] is True
    assert vision["width"] // vision["head_width"] == cfg.vision_heads
    assert config["preprocess_cfg"]["size"] == cfg.image_size


# open_clip imported as tests/helpers_openclip.py does (over torchvision stand-ins where
# torchvision cannot load), in a process of its own; its image transforms need torchvision, so
# it is given pixels normalised with OpenAI's mean and std, as the export's preprocess_cfg says.
_OPEN_CLIP_RUN = """
import sys
sys.path.insert(0, sys.argv[4])
import numpy as np, torch
from helpers_openclip import import_open_clip
open_clip = import_open_clip()
out, inputs, result = sys.argv[1:4]
data = np.load(inputs)
# create_model_and_transforms minus the transforms (they need torchvision): the same loader.
model = open_clip.create_model(f"local-dir:{out}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
ids = tokenizer([str(t) for t in data["texts"]])
pixels = torch.from_numpy(data["pixels"]).permute(0, 3, 1, 2)
model.eval()
with torch.no_grad():
    image = model.encode_image(pixels, normalize=True)
    text = model.encode_text(ids, normalize=True)
np.savez(result, image=image.numpy(), text=text.numpy(), ids=ids.numpy(),
         positions=model.positional_embedding.shape[0])
"""


def _open_clip_embeddings(out, images, texts, tmp_path) -> dict:
    """open_clip's own (normalised) embeddings of uint8 `images` and `texts` from export `out`,
    computed in a subprocess; skips the test when open_clip cannot be imported here."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    pixels = normalize(np.asarray(images))  # the images are at the model's size already
    np.savez(tmp_path / "in.npz", pixels=pixels, texts=np.array(texts))
    result = tmp_path / "out.npz"
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-c", _OPEN_CLIP_RUN, out, str(tmp_path / "in.npz"), str(result), tests],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(result))


def test_open_clip_loads_the_export_with_equal_embeddings(published, encoder, tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    texts = ["a red cube", PROMPT]
    got = _open_clip_embeddings(published, images, texts, tmp_path)
    assert int(got["positions"]) == 248 and (got["ids"] != 0).sum(-1).max() > 77
    np.testing.assert_array_equal(got["ids"], encoder.tokenize(texts))
    np.testing.assert_allclose(got["image"], encoder.embed_images(images), atol=TOL)
    np.testing.assert_allclose(got["text"], encoder.embed_texts(texts), atol=TOL)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tanh-GELU model with MLPs of 1.5 and 2.5 x the width and LayerNorm eps 1e-6 (as in
    LAION / SDXL towers) exported as open_clip + text encoder, with our model's embeddings of
    two images and texts: (out, params, images, texts, tokens, image embeddings, text ones)."""
    cfg = resolve_model_config(
        {
            "variant": "tiny",
            "activation": "gelu_pytorch_tanh",
            "vision_mlp_dim": 96,
            "text_mlp_dim": 160,
            "layer_norm_eps": 1e-6,
        }
    )
    model = build_model(cfg)
    params = random_params(model, seed=11)
    out = str(tmp_path_factory.mktemp("family") / "out")
    export_params(params, cfg, out, formats=("open_clip", "text_encoder"))
    images = np.random.default_rng(6).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    texts = ["a red cube", PROMPT]
    tokens = Tokenizer().encode(texts, 248)
    return (out, params, images, texts, tokens) + _jax_embeddings(
        model, params, normalize_images(images), tokens
    )


def test_clip_family_architecture_reaches_open_clip_config_and_text_encoder(family):
    """open_clip's config and the diffusers text encoder carry the activation, MLP widths and
    eps, and the text encoder computes what our model computes."""
    from transformers import CLIPTextModel

    out, params, _, _, tokens, _, jax_text = family
    with open(os.path.join(out, OPEN_CLIP_CONFIG)) as f:
        model_cfg = json.load(f)["model_cfg"]
    assert model_cfg["quick_gelu"] is False
    for tower, mlp in (("vision", 96), ("text", 160)):
        sub = model_cfg[f"{tower}_cfg"]
        assert int(sub["width"] * sub["mlp_ratio"]) == mlp  # open_clip's MLP width rule
        assert sub["act_kwargs"] == {"approximate": "tanh"} and sub["norm_kwargs"] == {"eps": 1e-6}
    text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder").eval()
    assert text_encoder.config.hidden_act == "gelu_pytorch_tanh"
    with torch.no_grad():
        eot = text_encoder(torch.from_numpy(tokens.astype(np.int64))).pooler_output.numpy()
    projected = eot @ np.asarray(params["text"]["proj"]["kernel"])
    np.testing.assert_allclose(_unit(projected), jax_text, atol=TOL)


def test_clip_family_model_loads_in_open_clip_with_equal_embeddings(family, tmp_path):
    out, _, images, texts, _, jax_image, jax_text = family
    got = _open_clip_embeddings(out, images, texts, tmp_path)
    np.testing.assert_allclose(got["image"], jax_image, atol=TOL)
    np.testing.assert_allclose(got["text"], jax_text, atol=TOL)


def _jax_embeddings(model, params, pixels, tokens):
    """Our model's normalised CLS and text embeddings."""

    def run(p, x, t):
        cls, _ = model.apply({"params": p}, x, method="encode_image")
        return cls, model.apply({"params": p}, t, method="encode_text")

    cls, text = fast_jit(run)(params, pixels, tokens)
    return _unit(cls), _unit(text)


_NO_DIFFUSERS = "diffusers not installed (setup.cfg's test extra has it): pip install diffusers"


def _tiny_unet(cross_attention_dim, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
        **extra,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )


def _record_text_states(unet) -> list:
    """The cross-attention inputs (prompt embeddings) of every UNet call."""
    seen = []
    unet.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(tuple(kwargs["encoder_hidden_states"].shape)),
        with_kwargs=True,
    )
    return seen


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_text_encoder_runs_a_tiny_sd_pipeline_on_a_long_prompt(
    text_encoder_dir, trained, encoder, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("diffusers", reason=_NO_DIFFUSERS)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    _, params, cfg, _ = trained
    text_encoder, info = CLIPTextModel.from_pretrained(
        text_encoder_dir, subfolder="text_encoder", output_loading_info=True
    )
    assert all(not v for v in info.values()), info
    tokenizer = CLIPTokenizer.from_pretrained(text_encoder_dir, subfolder="tokenizer")
    assert tokenizer.model_max_length == text_encoder.config.max_position_embeddings == 248
    untruncated = tokenizer(PROMPT).input_ids
    assert 77 < len(untruncated) <= 248

    unet = _tiny_unet(cfg.text_width)
    seen = _record_text_states(unet)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()
    assert seen == [(2, 248, cfg.text_width)]  # prompt + empty negative, 248 positions each

    # The pipeline's own tokenisation keeps the whole prompt, and the encoder reads positions
    # past 77 as JAX does: its EOT state, projected, is our text embedding.
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=248, truncation=True).input_ids
    assert ids[: len(untruncated)] == untruncated
    with torch.no_grad():
        eot = pipe.text_encoder(torch.tensor([ids])).pooler_output.numpy()
    projected = eot @ np.asarray(params["text"]["proj"]["kernel"])
    ours = encoder.embed_tokens(np.array([ids], np.int32))
    np.testing.assert_allclose(_unit(projected), ours, atol=TOL)


def test_sdxl_text_encoder_2_at_248_positions(
    sdxl_dir, text_encoder_dir, trained, encoder, monkeypatch
):
    """SDXL concatenates both encoders' states per position: with both at 248 the stock
    pipeline runs on a long prompt; text_encoder_2's projected embedding is ours."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("diffusers", reason=_NO_DIFFUSERS)
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    _, _, cfg, _ = trained
    encoder_2, info = CLIPTextModelWithProjection.from_pretrained(
        sdxl_dir, subfolder="text_encoder_2", output_loading_info=True
    )
    assert all(not v for v in info.values()), info
    tokenizer_2 = CLIPTokenizer.from_pretrained(sdxl_dir, subfolder="tokenizer_2")
    assert tokenizer_2.model_max_length == 248 and tokenizer_2.pad_token_id == 0
    ids = tokenizer_2(PROMPT, padding="max_length", max_length=248).input_ids
    with torch.no_grad():
        text_embeds = encoder_2(torch.tensor([ids])).text_embeds.numpy()
    np.testing.assert_allclose(
        _unit(text_embeds), encoder.embed_tokens(np.array([ids], np.int32)), atol=TOL
    )

    width = cfg.text_width
    unet = _tiny_unet(
        2 * width,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + cfg.embed_dim,
    )
    seen = _record_text_states(unet)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel.from_pretrained(text_encoder_dir, subfolder="text_encoder"),
        text_encoder_2=encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(text_encoder_dir, subfolder="tokenizer"),
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
    )
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and seen == [(2, 248, 2 * width)]


def _blocker(root, *names):
    """A directory whose packages `names` raise ImportError on import."""
    for name in names:
        os.makedirs(root / name, exist_ok=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    return str(root)


_POOLER_RUN = """
import sys
import numpy as np, torch
try:
    import jax
except ImportError:
    pass
else:
    raise AssertionError("jax imported despite the blocker")
mode, out, inputs, result = sys.argv[1:5]
if mode == "package":
    from beta_clip_jax.torch_pooler import from_pretrained
else:
    sys.path.insert(0, out)
    from beta_clip_pooler import from_pretrained
data = np.load(inputs)
clip, pooler = from_pretrained(out)
pixels, ids = torch.from_numpy(data["pixels"]), torch.from_numpy(data["ids"])
with torch.no_grad():
    cls, _ = pooler.encode_image(pixels)
    pooled = pooler.pooled_embeddings(pixels, ids)
assert not [m for m in sys.modules if m == "jax" or m.startswith(("jax.", "flax"))]
assert mode == "package" or "beta_clip_jax" not in sys.modules
np.savez(result, cls=cls.numpy(), pooled=pooled.numpy())
"""


@pytest.mark.parametrize("mode", ["package", "copied"])
def test_torch_pooler_runs_where_jax_cannot_be_imported(published, encoder, tmp_path, mode):
    """The pooler from beta_clip_jax.torch_pooler with JAX blocked, and the export's own
    beta_clip_pooler.py with JAX and beta_clip_jax both blocked, match the JAX encoder."""
    blocked = ("jax", "flax") if mode == "package" else ("jax", "flax", "beta_clip_jax")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_blocker(tmp_path / "block", *blocked)]))
    if mode == "package":  # the package itself from this checkout, JAX-free or not
        repo = os.path.dirname(os.path.dirname(os.path.abspath(torch_pooler.__file__)))
        env["PYTHONPATH"] += os.pathsep + repo
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    texts = ["a red cube", PROMPT]
    pixels = np.ascontiguousarray(normalize_images(images).transpose(0, 3, 1, 2))
    ids = encoder.tokenize(texts).astype(np.int64)
    np.savez(tmp_path / "in.npz", pixels=pixels, ids=ids)
    result = tmp_path / "out.npz"
    args = [mode, published, str(tmp_path / "in.npz"), str(result)]
    run = subprocess.run(
        [sys.executable, "-c", _POOLER_RUN, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(result)
    np.testing.assert_allclose(_unit(got["cls"]), encoder.embed_images(images), atol=TOL)
    np.testing.assert_allclose(
        _unit(got["pooled"]), encoder.conditioned_embeddings(images, texts), atol=TOL
    )


def test_torch_pooler_mapping_equals_the_name_table(trained):
    """torch_pooler cannot import convert/names.py: its own mapping must give what the table's
    pooler_to_torch gives, and name a missing or unknown tensor."""
    _, params, _, _ = trained
    flat = pooler_file_tensors(params)
    want, got = pooler_to_torch(flat), torch_pooler.pooler_state_dict(flat)
    assert sorted(got) == sorted(want) and torch_pooler.POOLER_FILE == POOLER_FILE
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    broken = {k: v for k, v in flat.items() if k != "pooler/ln/bias"} | {
        "pooler/x": flat["pooler/ln/scale"]
    }
    with pytest.raises(
        ValueError, match=r"p\.safetensors.*missing tensors \['ln/bias'\].*unknown tensors \['x'\]"
    ):
        torch_pooler.pooler_state_dict(broken, "p.safetensors")


def test_reexport_removes_the_earlier_formats_and_keeps_other_files(trained, tmp_path):
    _, params, cfg, _ = trained
    out = tmp_path / "out"
    export_params(params, cfg, str(out), formats=("hf", "open_clip"))
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    export_params(params, cfg, str(out), formats=("text_encoder",))
    names = sorted(os.listdir(out))
    assert names == [
        ".gitattributes",
        "README.md",
        "beta_clip_meta.json",
        "text_encoder",
        "tokenizer",
    ]


def test_unknown_or_empty_formats_are_refused_by_name():
    assert check_formats(["open_clip", "hf"]) == ("open_clip", "hf")
    with pytest.raises(ValueError, match="unknown: \\['onnx'\\]"):
        check_formats(["hf", "onnx"])
    with pytest.raises(ValueError, match="one or more distinct"):
        check_formats([])
