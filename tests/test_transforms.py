"""Image transforms: crop-box statistics, determinism, and parity with HF's CLIP image processor."""

import math

import numpy as np
import pytest
from PIL import Image

from beta_clip_jax.data import transforms as T


def smooth_image(h, w, seed=0):
    """A smooth RGB uint8 image (low-frequency waves) so resampling diffs stay small."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6)
        chans.append(127.5 + 120 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph))
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def test_normalize_numpy_and_jax():
    jnp = pytest.importorskip("jax.numpy")
    img = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    ref = (img / 255.0 - np.array(T.OPENAI_MEAN)) / np.array(T.OPENAI_STD)
    out = T.normalize(img)
    assert out.dtype == np.float32 and isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    out_j = T.normalize(jnp.asarray(img))
    assert out_j.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_j), ref, atol=1e-5)


def test_crop_box_statistics():
    rng = np.random.default_rng(0)
    h, w = 60, 90
    fractions = []
    for _ in range(500):
        top, left, bh, bw = T.random_crop_box(h, w, rng)
        assert 0 <= top and 0 <= left and top + bh <= h and left + bw <= w and bh > 0 and bw > 0
        frac = bh * bw / (h * w)
        # rounding of w, h to integers loosens the bounds by about one pixel per side
        assert 0.5 - 0.05 <= frac <= 1.0
        assert 3 / 4 - 0.06 <= bw / bh <= 4 / 3 + 0.06
        fractions.append(frac)
    # large crops with extreme aspect do not fit and are redrawn, so the mean is below 0.75
    assert 0.55 < np.mean(fractions) < 0.75


def test_crop_box_fallback_clamps_ratio():
    rng = np.random.default_rng(0)
    # A 10 x 400 strip can never hold a crop of half its area with aspect <= 4/3: centre fallback.
    top, left, bh, bw = T.random_crop_box(10, 400, rng)
    assert (bh, bw) == (10, int(round(10 * 4 / 3)))
    assert (top, left) == (0, (400 - bw) // 2)
    top, left, bh, bw = T.random_crop_box(400, 10, rng)
    assert (bh, bw) == (int(round(10 / (3 / 4))), 10)
    assert (top, left) == ((400 - bh) // 2, 0)


def test_random_resized_crop_deterministic_and_matches_manual():
    img = smooth_image(48, 64)
    a = T.random_resized_crop(img, 32, np.random.default_rng(3))
    b = T.random_resized_crop(Image.fromarray(img), 32, np.random.default_rng(3))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    top, left, h, w = T.random_crop_box(48, 64, np.random.default_rng(3))
    manual = Image.fromarray(img[top : top + h, left : left + w]).resize((32, 32), Image.BILINEAR)
    np.testing.assert_array_equal(a, np.asarray(manual))
    c = T.random_resized_crop(img, 32, np.random.default_rng(4))
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape", [(40, 56), (56, 40), (32, 32), (20, 30)])
def test_resize_center_crop_matches_hf(shape):
    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if proc_cls is None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        proc_cls = CLIPImageProcessorPil
    size = 24
    proc = proc_cls(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_normalize=False,
        do_convert_rgb=True,
    )
    img = smooth_image(*shape)
    ours = T.resize_center_crop(img, size)
    assert ours.shape == (size, size, 3)
    ref = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) * 255.0
    assert np.abs(ours.astype(np.float32) - ref).mean() < 2.0


def test_resize_exact_and_identity():
    img = smooth_image(30, 50)
    out = T.resize_exact(img, 16)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((16, 16))))
    sq = smooth_image(16, 16)
    np.testing.assert_array_equal(T.resize_exact(sq, 16), sq)
    np.testing.assert_array_equal(T.resize_center_crop(sq, 16), sq)
    assert math.isclose(T.OPENAI_MEAN[0], 0.48145466)
