"""Image transforms of CLIP training and evaluation, on uint8 HWC arrays via PIL.

Training: torchvision-style RandomResizedCrop (bilinear). Evaluation: bicubic resize of the shorter
side + centre crop (CLIP eval), or an exact square resize ignoring aspect (FG-OVD). Normalisation
with the OpenAI mean/std runs last, on numpy or on device (jax), because batches travel as uint8.
This is the package's one copy of the statistics and of `normalize`: the train step, the inference
API and the exporters all read them here (the data package sits below the models).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN_255 = np.asarray(OPENAI_MEAN, np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.asarray(OPENAI_STD, np.float32) * 255.0)


def normalize(images):
    """uint8 `[..., 3]` images -> float32 OpenAI-normalised; numpy in numpy out, jax in jax out."""
    if isinstance(images, np.ndarray):
        return (images.astype(np.float32) - _MEAN_255) * _INV_STD_255
    import jax.numpy as jnp  # local: data workers handle numpy only and need not import jax

    return (jnp.asarray(images).astype(jnp.float32) - _MEAN_255) * _INV_STD_255


def to_pil(img) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 HWC (or HW) array."""
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 image, got {arr.dtype}")
    return Image.fromarray(arr).convert("RGB")


def random_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Crop box `(top, left, h, w)` drawn as torchvision's RandomResizedCrop.get_params does.

    Up to 10 tries of area fraction ~ U(scale) and log aspect ~ U(log ratio); if none fits, the
    centre crop with the aspect clamped to `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Random crop (torchvision algorithm) resized bilinearly to `size x size`; uint8 HWC out."""
    pil = to_pil(img)
    top, left, h, w = random_crop_box(pil.height, pil.width, rng, scale, ratio)
    # Crop first, then resize (as torchvision): edge pixels do not blend with outside the box.
    out = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def resize_center_crop(img, size: int) -> np.ndarray:
    """CLIP evaluation transform: bicubic resize of the shorter side to `size`, centre crop."""
    pil = to_pil(img)
    w, h = pil.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8)


def resize_exact(img, size: int) -> np.ndarray:
    """Bicubic resize to `size x size`, ignoring aspect ratio (the FG-OVD evaluation)."""
    pil = to_pil(img)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)
