"""What every evaluator shares: the config fields, image loading, and sharded encoder calls.

An evaluator is built once from its config (reading the dataset manifest, so bad paths fail before
any compile) and `run(encoder)` may be called many times during training. Encoder calls go
through `gather.sharded_map`, so on several processes each one embeds its slice and all processes
end with identical full matrices and identical metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from beta_clip_jax.evals.gather import sharded_map


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key] for dicts and ml_collections ConfigDicts alike, default when absent or None."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def cfg_require(cfg: Any, key: str, name: str) -> Any:
    """cfg[key], or a ValueError naming the evaluator and the missing field."""
    value = cfg_get(cfg, key)
    if value is None or value == "":
        raise ValueError(f"evaluator {name!r} ({cfg_get(cfg, 'kind')}) needs config field {key!r}")
    return value


class Evaluator:
    """Base class: `Evaluator(name, cfg)`, then `run(encoder) -> dict[str, float]`.

    Common config fields: every (steps between runs, 0 = only when asked), batch_size (per
    process), max_examples (truncate the dataset, for quick runs).
    """

    kind = ""
    # True when run() can also list per-item scores (the evaluate command's --per_item).
    per_item = False

    def __init__(self, name: str, cfg: Any, image_size: int | None = None):
        self.name = name
        self.cfg = cfg
        self.image_size_hint = image_size  # the model's input size when known at build time
        self.every = int(cfg_get(cfg, "every", 0))
        self.batch_size = int(cfg_get(cfg, "batch_size", 64))
        self.max_examples = cfg_get(cfg, "max_examples", None)
        if self.batch_size <= 0:
            raise ValueError(f"evaluator {name!r}: batch_size must be positive")

    def should_run(self, step: int) -> bool:
        """True on every `every`-th step (never when every <= 0)."""
        return self.every > 0 and step % self.every == 0

    def run(self, encoder, items: list | None = None) -> dict[str, float]:
        """Metrics; an evaluator with per_item = True also appends one dict per scored item to
        `items` when given one (JSON-ready, in dataset order)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, every={self.every})"


def load_image(path: str) -> Any:
    """An RGB image from disk (the data package's loader when present, else PIL)."""
    try:
        from beta_clip_jax.data.sources import load_image as data_load_image
    except ImportError:
        data_load_image = None
    if data_load_image is not None:
        return data_load_image(path)
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def prepare_image(image: Any, size: int, mode: str = "crop") -> np.ndarray:
    """uint8 [size, size, 3]: "crop" = CLIP resize + centre crop, "squash" = exact resize."""
    from beta_clip_jax.data import transforms

    if mode == "crop":
        return transforms.resize_center_crop(image, size)
    if mode == "squash":
        return transforms.resize_exact(image, size)
    raise ValueError(f"image mode {mode!r} not in ['crop', 'squash']")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def image_batches(
    images: Sequence[Any], size: int, mode: str = "crop"
) -> Callable[[np.ndarray], np.ndarray]:
    """indices -> uint8 [B, size, size, 3]; entries are file paths or in-memory images."""

    def get(i: int) -> Any:
        return load_image(images[i]) if isinstance(images[i], str) else images[i]

    def load(indices: np.ndarray) -> np.ndarray:
        return np.stack([prepare_image(get(int(i)), size, mode) for i in indices])

    return load


def embed_images(
    encoder, load: Callable[[np.ndarray], np.ndarray], num: int, batch_size: int
) -> np.ndarray:
    """L2-normalised [num, E] image embeddings (CLS path), computed shard by shard."""
    return sharded_map(lambda idx: l2_normalize(encoder.embed_images(load(idx))), num, batch_size)


def embed_texts(encoder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """L2-normalised [len(texts), E] text embeddings, computed shard by shard."""
    texts = list(texts)
    return sharded_map(
        lambda idx: l2_normalize(encoder.embed_texts([texts[i] for i in idx])),
        len(texts),
        batch_size,
    )


def embed_conditioned(
    encoder,
    load: Callable[[np.ndarray], np.ndarray],
    texts: Sequence[str],
    batch_size: int,
) -> np.ndarray:
    """L2-normalised [N, E]: image i pooled with texts[i] (text-conditioned pooling)."""
    texts = list(texts)
    return sharded_map(
        lambda idx: l2_normalize(
            encoder.conditioned_embeddings(load(idx), [texts[i] for i in idx])
        ),
        len(texts),
        batch_size,
    )


def scores_per_item(
    queries: np.ndarray, text_emb: np.ndarray, refs: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, T], valid [N, T]): queries[n] against its own texts text_emb[refs[n]], padded."""
    width = max(len(r) for r in refs)
    scores = np.zeros((len(refs), width), np.float32)
    valid = np.zeros((len(refs), width), bool)
    for n, ref in enumerate(refs):
        # One product per distinct text: a text repeated in a list (FG-OVD has positives among
        # their own negatives) then gets bit-identical scores, so the tie rule decides, not the
        # rounding a matrix product gives each row position.
        distinct, where = np.unique(np.asarray(ref), return_inverse=True)
        scores[n, : len(ref)] = (text_emb[distinct] @ queries[n])[where]
        valid[n, : len(ref)] = True
    return scores, valid


def unique_texts(text_lists: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """Deduplicated texts (first-seen order) and, per list, the indices into them."""
    index: dict[str, int] = {}
    refs = [[index.setdefault(t, len(index)) for t in texts] for texts in text_lists]
    return list(index), refs
