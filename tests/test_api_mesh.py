"""The trainer's Encoder (sharded params, inputs split over the mesh) equals the plain one."""

import jax
import numpy as np
from helpers_tiny import random_params

from beta_clip_jax import sharding
from beta_clip_jax.api import Encoder
from beta_clip_jax.methods import build_model, model_config


def test_mesh_encoder_equals_single_device_encoder():
    model = build_model(model_config("tiny"))
    params = random_params(model, seed=1)
    mesh_cfg = {"data": -1, "fsdp": 2, "tensor": 1}
    mesh = sharding.make_mesh(mesh_cfg)
    sharded = jax.device_put(params, sharding.replicated(mesh))
    plain = Encoder(model, params, batch_size=4)
    meshed = Encoder.from_params(model, sharded, mesh=mesh, batch_size=4)
    assert meshed.batch_size == 8  # rounded up to tile the 8 data-parallel devices
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)  # 11: padded, then cut
    texts = ["a red circle", "a small blue square in the top left"] * 5 + ["x"]
    np.testing.assert_allclose(meshed.embed_images(images), plain.embed_images(images), atol=1e-5)
    np.testing.assert_allclose(meshed.embed_texts(texts), plain.embed_texts(texts), atol=1e-5)
    np.testing.assert_allclose(
        meshed.conditioned_embeddings(images, texts),
        plain.conditioned_embeddings(images, texts),
        atol=1e-5,
    )
