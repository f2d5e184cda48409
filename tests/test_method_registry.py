"""The method registry: a method defined in this file (its own loss and one extra parameter)
trains through train_and_evaluate, resumes to the uninterrupted run's numbers and exports, with
no change anywhere else; config mistakes about the method stop before anything compiles."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import losses as step_losses
from train_helpers import tiny_config

from beta_clip_jax import methods, objective, train
from beta_clip_jax.config_check import ConfigError, resolve_config
from beta_clip_jax.losses import contrastive
from beta_clip_jax.methods import siglip
from beta_clip_jax.models.clip import BetaCLIP, init_params
from beta_clip_jax.models.layers import logical_init
from beta_clip_jax.step import abstract_params

TOY_INIT = 0.25
TOY_LOSS_WEIGHT = 0.5


class ToyModel(BetaCLIP):
    """β-CLIP plus one scalar `toy_gain`: the log of an extra factor on the temperature."""

    def add_submodules(self, dtype) -> None:
        self.toy_gain = self.param(
            "toy_gain", logical_init(nn.initializers.constant(TOY_INIT), ()), ()
        )

    def __call__(self, images, texts):
        return {**super().__call__(images, texts), "toy_gain": self.toy_gain}


def toy_loss(outputs, valid, loss_cfg, step, scale):
    gain = jnp.exp(outputs["toy_gain"])
    caption = outputs["text"][:, 0]
    loss_g, _ = contrastive.clip_loss(outputs["image"], caption, scale * gain)
    return loss_cfg.toy.weight * loss_g, {"loss_global": loss_g, "toy_gain": outputs["toy_gain"]}


def toy_complete(params, model, rng):
    return params if "toy_gain" in params else {**params, "toy_gain": np.float32(TOY_INIT)}


TOY = methods.Method(
    name="toy",
    loss=toy_loss,
    title="Toy",
    summary="a method the registry test defines",
    model_class=ToyModel,
    outputs=("toy_gain",),
    loss_defaults={"weight": TOY_LOSS_WEIGHT},
    complete_params=toy_complete,
    strip_params=("toy_gain",),
    head_subtrees=frozenset({"toy_gain"}),
)


@pytest.fixture
def toy():
    methods.register(TOY)
    yield TOY
    methods.unregister(TOY.name)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_method_defined_here_trains_resumes_and_exports(toy, tmp_path):
    from beta_clip_jax import api, checkpoint, export

    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    train.train_and_evaluate(tiny_config(method="toy", num_steps=4, stop_at_step=2), str(stopped))
    train.train_and_evaluate(tiny_config(method="toy", num_steps=4), str(stopped))
    train.train_and_evaluate(tiny_config(method="toy", num_steps=4), str(whole))

    resumed, straight = step_losses(_records(stopped)), step_losses(_records(whole))
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [resumed[s] for s in (1, 2, 3, 4)], [straight[s] for s in (1, 2, 3, 4)], rtol=1e-6
    )
    # The method's loss is what trains: its weight and metric are there, β-CAL's are not.
    last = {k: v for r in _records(whole) if r["step"] == 4 for k, v in r.items()}
    assert "train/toy_gain" in last and "train/loss_cal" not in last
    np.testing.assert_allclose(
        last["train/loss"], TOY_LOSS_WEIGHT * last["train/loss_global"], rtol=1e-5
    )
    saved = json.loads((whole / "config.json").read_text())
    assert (saved["method"], saved["model"]["method"], saved["loss"]["name"]) == ("toy",) * 3

    params, _, _ = checkpoint.load_params_from_workdir(str(whole), abstract_params)
    assert abs(float(params["toy_gain"]) - TOY_INIT) > 1e-5  # trained, at the head rate

    out = export.export_workdir(str(whole), str(tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / "beta_clip_meta.json").read_text())
    assert meta["model"]["method"] == "beta_clip"  # the training-only parameter is dropped
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), np.uint8)
    exported, trained = api.load(out), api.load(str(whole))
    for embed in ("embed_images", "embed_texts"):
        data = images if embed == "embed_images" else ["a red cube left of a blue ball"]
        got, want = getattr(exported, embed)(data), getattr(trained, embed)(data)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def no_compile(monkeypatch):
    """Where training would build its setup (mesh, model, optimiser, then compile): a failure."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run got as far as building the model")

    monkeypatch.setattr(train.train_setup, "TrainSetup", refuse)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"method": "simclr"}, "config.method='simclr'"),
        ({"loss.name": "simclr"}, "loss.name='simclr'"),
        ({"method": "smartclip", "loss.name": "clip"}, "loss.name='clip' disagrees"),
        ({"method": "clip", "model.method": "holistic"}, "model.method='holistic' disagrees"),
        ({"loss.name": "holistic", "model.method": "smartclip"}, "model.method='smartclip'"),
    ],
)
def test_method_mistakes_stop_before_anything_compiles(no_compile, tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))


def test_a_good_config_gets_as_far_as_the_setup(no_compile, tmp_path):
    """The refusal above is where a valid config goes next: the mistakes stop before it."""
    with pytest.raises(AssertionError, match="as far as building"):
        train.train_and_evaluate(tiny_config(method="clip"), str(tmp_path / "run"))


def test_one_field_names_the_method():
    """config.method (or loss.name, as older configs name it) picks the method; model.method
    names its model, the plain one for a method without a model of its own."""
    for overrides, names in [
        ({}, ("beta_clip", "beta_clip")),
        ({"method": "clip"}, ("clip", "beta_clip")),
        ({"loss.name": "clip"}, ("clip", "beta_clip")),
        ({"loss.name": "clip", "model.method": "beta_clip"}, ("clip", "beta_clip")),
        ({"method": "holistic", "model.method": "holistic"}, ("holistic", "holistic")),
        ({"method": "siglip"}, ("siglip", "siglip")),
    ]:
        c = resolve_config(tiny_config(**overrides))
        method, model = names
        assert (c.method, c.loss.name, c.model.method) == (method, method, model), overrides


def _numpy_sigmoid_loss(image, text, scale, bias):
    """SigLIP's loss, written from its definition: -1/B sum_ij log sigmoid(z_ij (s cos_ij + b))."""
    image = np.asarray(image, np.float64)
    text = np.asarray(text, np.float64)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    logits = scale * image @ text.T + bias
    z = 2 * np.eye(len(image)) - 1
    return float(np.sum(np.log1p(np.exp(-z * logits))) / len(image))


def test_siglip_is_a_method_with_its_temperature_and_bias():
    model = methods.build_model({"variant": "tiny", "method": "siglip"})
    params = init_params(model, jax.random.key(0))
    assert float(params["logit_bias"]) == siglip.INIT_BIAS == -10.0
    np.testing.assert_allclose(float(params["logit_scale"]), math.log(10.0), rtol=1e-6)

    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    texts = {
        "caption": jnp.asarray(rng.integers(1, 400, (4, 6)), jnp.int32).at[:, -1].set(49407),
        "sentences": jnp.asarray(rng.integers(1, 400, (4, 1, 5)), jnp.int32).at[..., -1].set(49407),
        "phrases": jnp.zeros((4, 0, 3), jnp.int32),
    }
    params["logit_bias"] = jnp.float32(-2.5)  # away from the init, so a wrong bias would show
    out = model.apply({"params": params}, images, texts)
    cfg = objective.default_loss_config()
    cfg.name = "siglip"
    loss, metrics = objective.training_loss(out, jnp.ones((4, 2), bool), cfg)
    want = _numpy_sigmoid_loss(out["image"], out["text"][:, 0], 10.0, -2.5)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["logit_bias"]) == -2.5

    # A pretrained CLIP completed for SigLIP starts at its temperature and bias; inference and
    # export drop the bias (it shifts every logit alike: rankings are the plain model's).
    plain = init_params(methods.build_model({"variant": "tiny"}), jax.random.key(1))
    done = methods.complete_params(plain, model)
    assert float(done["logit_bias"]) == -10.0
    np.testing.assert_allclose(float(done["logit_scale"]), math.log(10.0), rtol=1e-6)
    kept, cfg = methods.inference_params(done, model.config)
    assert "logit_bias" not in kept and cfg.method == "beta_clip"
