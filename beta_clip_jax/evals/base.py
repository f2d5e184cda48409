"""What every evaluator shares: the config fields, image loading, and sharded encoder calls.

An evaluator is built once from its config (reading the dataset manifest, so bad paths fail before
any compile) and `run(encoder)` may be called many times during training. Encoder calls go
through `gather.sharded_map`, so on several processes each one embeds its slice and all processes
end with identical full matrices and identical metrics.

Images are decoded and resized on a thread pool (`PrefetchLoader`): PIL releases the GIL while it
decodes and resamples, so the next batch is ready while the encoder works on this one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from etils import epath

from beta_clip_jax.evals.gather import sharded_map
from beta_clip_jax.mathutil import l2_normalize


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


# Decoding threads per image loader: a few cores are enough to keep one accelerator fed, and
# more would compete with the training input pipeline when evaluating during training.
DEFAULT_LOAD_WORKERS = min(8, os.cpu_count() or 1)


class Evaluator:
    """Base class: `Evaluator(name, cfg)`, then `run(encoder) -> dict[str, float]`.

    Common config fields: every (steps between runs, 0 = only when asked), batch_size (per
    process), max_examples (truncate the dataset, for quick runs), load_workers (image decoding
    threads, default min(8, CPU count); 0 decodes in the calling thread), jpeg_draft (default
    False: decode JPEGs at the smallest 1/2, 1/4 or 1/8 scale whose sides stay >= the model's input
    size; faster, but not the pixels of a full decode, so off for numbers comparable with the
    official evaluators).
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
        self.load_workers = int(cfg_get(cfg, "load_workers", DEFAULT_LOAD_WORKERS))
        self.jpeg_draft = bool(cfg_get(cfg, "jpeg_draft", False))
        if self.batch_size <= 0:
            raise ValueError(f"evaluator {name!r}: batch_size must be positive")
        if self.load_workers < 0:
            raise ValueError(
                f"evaluator {name!r}: load_workers must be >= 0 (0 decodes in the calling "
                f"thread), got {self.load_workers}"
            )

    def should_run(self, step: int) -> bool:
        """True on every `every`-th step (never when every <= 0)."""
        return self.every > 0 and step % self.every == 0

    def run(self, encoder, items: list | None = None) -> dict[str, float]:
        """Metrics; an evaluator with per_item = True also appends one dict per scored item to
        `items` when given one (JSON-ready, in dataset order)."""
        raise NotImplementedError

    def image_batches(
        self, images: Sequence[Any], size: int, mode: str = "crop"
    ) -> Callable[[np.ndarray], np.ndarray]:
        """`image_batches` with this evaluator's load_workers and jpeg_draft."""
        return image_batches(
            images, size, mode, workers=self.load_workers, jpeg_draft=self.jpeg_draft
        )

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


def height_width(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an HWC / HW array."""
    if hasattr(image, "height") and hasattr(image, "width"):  # PIL
        return int(image.height), int(image.width)
    height, width = np.asarray(image).shape[:2]
    return int(height), int(width)


def decode_image(src: Any, draft_size: int | None = None) -> tuple[Any, tuple[int, int]]:
    """(RGB image, its ORIGINAL (height, width)) for a file path or an in-memory image (as is).

    With draft_size, a JPEG decodes at the smallest of PIL's 1/1..1/8 scales whose sides both
    stay >= draft_size: faster, but its pixels are not those of a full decode. The size returned
    is still the file's, so boxes given in original pixels (FG-OVD) map as without the draft.
    """
    if not isinstance(src, str | os.PathLike):
        return src, height_width(src)
    if not draft_size:
        image = load_image(src)
        return image, height_width(image)
    from PIL import Image

    from beta_clip_jax.data.sources import open_image

    image = open_image(src, draft_size=draft_size)
    with epath.Path(src).open("rb") as f, Image.open(f) as header:  # the size before the draft
        return image, (int(header.height), int(header.width))


def _decode_pool(workers: int) -> ThreadPoolExecutor:
    """One pool per worker count for the whole process: loaders come and go with every run, and
    a pool each would leave idle threads behind. Keyed by process id too, since a forked child
    inherits the pool object but not its threads."""
    return _pool(workers, os.getpid())


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"eval-decode-{pid}")


class PrefetchLoader:
    """loader(indices) -> [fetch(i) for i in indices], in order, fetched on a thread pool.

    After handing out a batch whose indices are a contiguous run (sharded_map's are, but for the
    padded last one), the next run of as many items is already submitted, so it decodes while
    the caller encodes. A guess the next call does not ask for is cancelled, or, once started,
    kept one more call (never fetched twice, at most two batches held). A fetch error re-raises
    in the caller. workers=0 fetches in the calling thread, one by one.
    """

    def __init__(self, fetch: Callable[[int], Any], num_items: int, workers: int):
        if workers < 0:
            raise ValueError(f"load_workers must be >= 0, got {workers}")
        self.fetch, self.num_items = fetch, num_items
        self.pool = _decode_pool(workers) if workers > 0 else None
        self._guessed: dict[int, Future] = {}  # the latest guess
        self._started: dict[int, Future] = {}  # the guess before it, already running or done

    def __call__(self, indices: Sequence[int] | np.ndarray) -> list:
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        if self.pool is None:
            return [self.fetch(i) for i in indices]
        wanted = {i: self._take(i) for i in dict.fromkeys(indices)}  # padding repeats an index
        stale, self._guessed = self._guessed, {}
        self._started = {i: f for i, f in stale.items() if not f.cancel()}
        self._guessed = {i: self._take(i) for i in self._next_run(indices)}
        return [wanted[i].result() for i in indices]

    def _take(self, i: int) -> Future:
        """Item i's future: from a guess when one holds it, else newly submitted."""
        for held in (self._guessed, self._started):
            if i in held:
                return held.pop(i)
        return self.pool.submit(self.fetch, i)

    def _next_run(self, indices: list[int]) -> range:
        if not indices or indices != list(range(indices[0], indices[0] + len(indices))):
            return range(0)
        start = indices[-1] + 1
        return range(start, min(start + len(indices), self.num_items))

    def close(self) -> None:
        """Cancel the prefetched items nobody asked for yet."""
        for future in (*self._guessed.values(), *self._started.values()):
            future.cancel()
        self._guessed, self._started = {}, {}


def prepare_image(image: Any, size: int, mode: str = "crop") -> np.ndarray:
    """uint8 [size, size, 3]: "crop" = CLIP resize + centre crop, "squash" = exact resize."""
    from beta_clip_jax.data import transforms

    if mode == "crop":
        return transforms.resize_center_crop(image, size)
    if mode == "squash":
        return transforms.resize_exact(image, size)
    raise ValueError(f"image mode {mode!r} not in ['crop', 'squash']")


def image_batches(
    images: Sequence[Any],
    size: int,
    mode: str = "crop",
    *,
    workers: int = DEFAULT_LOAD_WORKERS,
    jpeg_draft: bool = False,
) -> Callable[[np.ndarray], np.ndarray]:
    """indices -> uint8 [B, size, size, 3]; entries are file paths or in-memory images, decoded
    and resized by `workers` threads (PrefetchLoader), JPEGs drafted to >= size with jpeg_draft."""
    draft_size = size if jpeg_draft else None

    def fetch(i: int) -> np.ndarray:
        return prepare_image(decode_image(images[i], draft_size)[0], size, mode)

    loader = PrefetchLoader(fetch, len(images), workers)
    return lambda indices: np.stack(loader(indices))


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
