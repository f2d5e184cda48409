"""FG-OVD evaluator (hard / medium / easy / trivial), following FG-CLIP v1 as beta-CLIP does.

Per box, as the reference evaluator does: resize the whole image to the model size ignoring
aspect ratio (bicubic), take the dense grid of raw projected patch tokens (value-only last block,
ln_post, projection; not normalised), map the (x, y, w, h) box to grid units with the image's
original size, ROI-align it to one vector (1x1, aligned, adaptive sampling), L2-normalise that
vector, and score it by cosine against [positive] + negatives embedded at the model's context
length; a hit is the positive at the row maximum, ties included. The same path scores the
synthetic scenes' boxes.

The four difficulty files box the same COCO images, often several boxes an image, so the grid
does not depend on the box: each distinct image goes through the vision tower once per run,
batch by batch, and all its boxes (over all files) are pooled from that one grid right away.
Only box vectors are kept, never the grids of the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from beta_clip_jax.evals import readers
from beta_clip_jax.evals.base import (
    DEFAULT_LOAD_WORKERS,
    Evaluator,
    PrefetchLoader,
    cfg_get,
    cfg_require,
    decode_image,
    embed_texts,
    prepare_image,
    scores_per_item,
    unique_texts,
)
from beta_clip_jax.evals.gather import allgather_rows, shard_bounds
from beta_clip_jax.evals.metrics import fgovd_accuracy
from beta_clip_jax.evals.roi_align import box_features

Box = Sequence[float]


def sharded_ragged_map(
    compute: Callable[[np.ndarray], Sequence[np.ndarray]],
    row_counts: Sequence[int],
    batch_size: int,
) -> np.ndarray:
    """gather.sharded_map for items of row_counts[i] rows each -> [sum(row_counts), ...].

    compute(indices [batch_size]) returns one [row_counts[i], ...] array per index. Items split
    over processes and batches pad exactly as in sharded_map (so every process makes the same
    encoder calls); a process's rows are padded to the largest process's count for the
    all-gather, a count every process works out from row_counts alone, and dropped after it.
    """
    num_items = len(row_counts)
    if num_items <= 0:
        raise ValueError("nothing to evaluate: the dataset is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pid, count = jax.process_index(), jax.process_count()
    start, length = shard_bounds(num_items, pid, count)
    end = min(num_items, start + length)
    local, row_shape, dtype = [], (), np.float32
    for b in range(-(-length // batch_size)):
        idx = start + b * batch_size + np.arange(batch_size)
        outs = compute(np.minimum(idx, max(end - 1, 0)))
        for i, rows in zip(idx, outs, strict=True):
            rows = np.asarray(rows)
            row_shape, dtype = rows.shape[1:], rows.dtype
            if i >= end:
                continue  # padding
            if len(rows) != row_counts[i]:
                raise ValueError(f"compute gave {len(rows)} rows for item {i}, not {row_counts[i]}")
            local.append(rows)
    counts = _rows_per_process(row_counts, count)
    most = max(counts)
    if most == 0:
        return np.zeros((0, *row_shape), dtype)
    padded = np.zeros((most, *row_shape), dtype)
    if local:
        mine = np.concatenate(local)
        padded[: len(mine)] = mine
    joined = allgather_rows(padded, count * most)
    return joined[np.concatenate([p * most + np.arange(n) for p, n in enumerate(counts)])]


def _rows_per_process(row_counts: Sequence[int], process_count: int) -> list[int]:
    """How many rows each process's slice of the items gives (its padding items give none)."""
    num_items = len(row_counts)
    bounds = (shard_bounds(num_items, p, process_count) for p in range(process_count))
    return [int(np.sum(row_counts[s : min(num_items, s + n)])) for s, n in bounds]


def image_box_vectors(
    encoder,
    images: Sequence[Any],
    image_boxes: Sequence[Sequence[Box]],
    batch_size: int,
    *,
    workers: int = DEFAULT_LOAD_WORKERS,
    jpeg_draft: bool = False,
) -> np.ndarray:
    """[sum len(image_boxes), E]: L2-normalised ROI vectors of image_boxes[i] (x, y, w, h in
    original pixels) on images[i] (paths or in-memory), image by image, each image encoded once.

    Processes split the images (not the boxes); every process ends with all rows. jpeg_draft
    decodes JPEGs smaller (>= the model size) but maps the boxes with the file's own size.
    """
    size = encoder.image_size
    draft_size = size if jpeg_draft else None

    def fetch(i: int) -> tuple[np.ndarray, tuple[int, int]]:
        image, original_hw = decode_image(images[i], draft_size)
        return prepare_image(image, size, "squash"), original_hw

    loader = PrefetchLoader(fetch, len(images), workers)

    def compute(indices: np.ndarray) -> list[np.ndarray]:
        fetched = loader(indices)
        # The reference ROI-aligns the raw projected patch tokens and normalises the box vector
        # afterwards; normalising each patch first moves the scores by up to ~5e-3.
        grids = np.asarray(
            encoder.dense_features(np.stack([p for p, _ in fetched]), normalize=False)
        )
        return [
            box_features(grid, image_boxes[int(i)], hw)
            for grid, (_, hw), i in zip(grids, fetched, indices, strict=True)
        ]

    try:
        return sharded_ragged_map(compute, [len(b) for b in image_boxes], batch_size)
    finally:
        loader.close()


def box_vectors(
    encoder,
    images: Sequence[Any],
    owners: Sequence[int],
    boxes: Sequence[Box],
    batch_size: int,
    *,
    workers: int = DEFAULT_LOAD_WORKERS,
    jpeg_draft: bool = False,
) -> np.ndarray:
    """[N, E] L2-normalised ROI vectors of boxes[n] on images[owners[n]].

    Every image some box refers to is encoded once, and a box repeated on the same image (the
    difficulty files share boxes) is pooled once.
    """
    if len(owners) != len(boxes):
        raise ValueError(f"{len(owners)} owners for {len(boxes)} boxes")
    slots: dict[int, dict[tuple, int]] = {}  # image -> distinct box -> its place among them
    placements = []  # per box: (image, place)
    for owner, box in zip(owners, boxes, strict=True):
        image_slots = slots.setdefault(int(owner), {})
        key = tuple(float(v) for v in box)
        placements.append((int(owner), image_slots.setdefault(key, len(image_slots))))
    used = list(slots)
    vectors = image_box_vectors(
        encoder,
        [images[u] for u in used],
        [list(slots[u]) for u in used],
        batch_size,
        workers=workers,
        jpeg_draft=jpeg_draft,
    )
    counts = [len(slots[u]) for u in used]
    first_row = dict(zip(used, np.cumsum([0] + counts[:-1]), strict=True))
    return vectors[np.asarray([first_row[o] + place for o, place in placements], np.int64)]


def box_text_scores(
    encoder, vectors: np.ndarray, text_lists: Sequence[Sequence[str]], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, T], valid [N, T]): cosine of box vector n to its texts, column 0 the positive."""
    texts, refs = unique_texts(text_lists)
    return scores_per_item(vectors, embed_texts(encoder, texts, batch_size), refs)


class FgovdEvaluator(Evaluator):
    """Config: root (folder with FG-CLIP's *_llava.jsonl files), image_root (COCO 2017, holding
    val2017/ and train2017/), difficulties (default all four); max_examples caps boxes per file.

    Reports accuracy in % per difficulty: keys hard, medium, easy, trivial.
    """

    kind = "fgovd"

    def __init__(self, name: str, cfg: Any, image_size: int | None = None):
        super().__init__(name, cfg, image_size)
        root = cfg_require(cfg, "root", name)
        image_root = cfg_require(cfg, "image_root", name)
        difficulties = list(cfg_get(cfg, "difficulties", list(readers.FGOVD_FILES)))
        self.items = {
            d: readers.read_fgovd(root, image_root, d, self.max_examples) for d in difficulties
        }
        for d, boxes in self.items.items():
            if not boxes:
                raise ValueError(
                    f"evaluator {name!r}: FG-OVD {d} file {readers.FGOVD_FILES[d]} under {root} "
                    "has no boxes"
                )

    per_item = True

    def difficulty_box_vectors(self, encoder) -> dict[str, np.ndarray]:
        """Each difficulty's [N, E] box vectors, every distinct image encoded once for all."""
        every = [it for boxes in self.items.values() for it in boxes]
        paths = list(dict.fromkeys(it.image_path for it in every))
        owner = {path: n for n, path in enumerate(paths)}
        vectors = box_vectors(
            encoder,
            paths,
            [owner[it.image_path] for it in every],
            [it.box for it in every],
            self.batch_size,
            workers=self.load_workers,
            jpeg_draft=self.jpeg_draft,
        )
        ends = np.cumsum([len(boxes) for boxes in self.items.values()])
        return dict(zip(self.items, np.split(vectors, ends[:-1]), strict=True))

    def run(self, encoder, items: list | None = None) -> dict[str, float]:
        """Accuracy per difficulty; `items` gets {"split", "index", "scores"} per box, index the
        box's line in its file and scores its cosines to [positive] + negatives."""
        results = {}
        for difficulty, vectors in self.difficulty_box_vectors(encoder).items():
            texts = [it.texts for it in self.items[difficulty]]
            scores, valid = box_text_scores(encoder, vectors, texts, self.batch_size)
            results[difficulty] = fgovd_accuracy(scores, valid)
            if items is not None:
                items += [
                    {"split": difficulty, "index": i, "scores": row[ok].tolist()}
                    for i, (row, ok) in enumerate(zip(scores, valid, strict=True))
                ]
        return results
