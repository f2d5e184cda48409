"""Evaluator on the built-in synthetic scenes: the real benchmarks' code paths, no files needed.

On the SyntheticScenes eval split it reports
* long-caption retrieval, caption vs image (t2i_r1/5/10, i2t_r1/5/10; tci_* with `tci`);
* caption_neg_acc: the image prefers its true caption over its attribute-swapped captions;
* box_<difficulty>: FG-OVD-style box scoring of each box's text vs its negatives;
* box_pointing: the pointing game on the dense features: a box's text hits when its most
  similar patch lies in the box (box_patch_mask). Are the object's own tokens the ones that match
  its text? The box scores assume they are;
* pooler_box_attention (with `tci`, for encoders with a pooler): the share of the pooler's
  attention that a box's text puts on the patches inside that box, in %. It tells whether
  text-conditioned pooling looks at the object it names (docs/demo.md: from scratch, β-CAL can
  learn from other tokens, and its box scores suffer).
Both accuracies use the FG-OVD hit rule (positive at the row max, ties included). This is how the
project measures beta-CLIP against plain CLIP fine-tuning on fine-grained negatives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from beta_clip_jax.evals.base import (
    Evaluator,
    cfg_get,
    embed_conditioned,
    embed_images,
    embed_texts,
    image_batches,
    scores_per_item,
    unique_texts,
)
from beta_clip_jax.evals.fgovd import box_text_scores, box_vectors
from beta_clip_jax.evals.gather import sharded_map
from beta_clip_jax.evals.metrics import fgovd_accuracy, retrieval_recall
from beta_clip_jax.evals.retrieval import TCI_PREFIX
from beta_clip_jax.mathutil import l2_normalize


def _get(record: Any, key: str) -> Any:
    return record[key] if isinstance(record, dict) else getattr(record, key)


def _as_list(texts: Any) -> list[str]:
    if texts is None:
        return []
    return [texts] if isinstance(texts, str) else list(texts)


def synthetic_scores(encoder, records: list, batch_size: int, *, tci: bool) -> dict[str, float]:
    """All synthetic metrics for in-memory records (image, caption, boxes, box_texts, negatives)."""
    images = [np.asarray(_get(r, "image")) for r in records]
    captions = [_get(r, "caption") for r in records]
    load = image_batches(images, encoder.image_size, "crop")
    image_emb = embed_images(encoder, load, len(images), batch_size)
    caption_lists = [
        [c] + _as_list(_get(r, "caption_negatives")) for r, c in zip(records, captions, strict=True)
    ]
    texts, refs = unique_texts(caption_lists)
    text_emb = embed_texts(encoder, texts, batch_size)

    results = retrieval_recall(image_emb @ text_emb[[ref[0] for ref in refs]].T)
    if tci:
        pooled = embed_conditioned(encoder, load, captions, batch_size)
        caption_emb = text_emb[[ref[0] for ref in refs]]
        for key, value in retrieval_recall(pooled @ caption_emb.T).items():
            results[TCI_PREFIX + key] = value
    results["num_images"] = float(len(images))
    if any(len(ref) > 1 for ref in refs):
        results["caption_neg_acc"] = fgovd_accuracy(*scores_per_item(image_emb, text_emb, refs))

    # One item per (record, box); each difficulty scores the same boxes with its own negatives.
    owners, boxes, positives = [], [], []
    for n, r in enumerate(records):
        r_boxes = np.asarray(_get(r, "boxes")).reshape(-1, 4)
        for box, text in zip(r_boxes, _get(r, "box_texts"), strict=True):
            owners.append(n)
            boxes.append(tuple(float(v) for v in box))
            positives.append(text)
    if boxes:
        results["box_pointing"] = pointing_accuracy(
            encoder, images, owners, boxes, embed_texts(encoder, positives, batch_size), batch_size
        )
        if tci and hasattr(encoder, "attention"):
            results["pooler_box_attention"] = box_attention_share(
                encoder, images, owners, boxes, positives, batch_size
            )
        difficulties = sorted({d for r in records for d in _get(r, "negatives")})
        # Every box once, each image encoded once; each difficulty then scores its own subset.
        vectors = box_vectors(encoder, images, owners, boxes, batch_size) if difficulties else None
        for d in difficulties:
            text_lists, keep = [], []
            box_index = 0
            for r in records:
                negatives = _get(r, "negatives").get(d, [])
                for b in range(len(_get(r, "box_texts"))):
                    negs = _as_list(negatives[b]) if b < len(negatives) else []
                    if negs:  # a box without negatives at this difficulty cannot be scored
                        keep.append(box_index)
                        text_lists.append([positives[box_index]] + negs)
                    box_index += 1
            if not keep:
                continue
            scores, valid = box_text_scores(encoder, vectors[keep], text_lists, batch_size)
            results[f"box_{d}"] = fgovd_accuracy(scores, valid)
    return results


def box_patch_mask(box: tuple, image_hw: tuple[int, int], grid: int) -> np.ndarray:
    """bool [grid, grid]: the patches whose centres lie inside the (x, y, w, h) pixel box; a box
    too small to hold a centre gets the patch under its own centre."""
    height, width = image_hw
    x, y, w, h = box
    cx = (np.arange(grid) + 0.5) * width / grid
    cy = (np.arange(grid) + 0.5) * height / grid
    mask = np.outer((cy >= y) & (cy <= y + h), (cx >= x) & (cx <= x + w))
    if not mask.any():
        row = min(int((y + h / 2) * grid / height), grid - 1)
        col = min(int((x + w / 2) * grid / width), grid - 1)
        mask[row, col] = True
    return mask


def pointing_accuracy(encoder, images, owners, boxes, box_text_emb, batch_size: int) -> float:
    """% of boxes whose text's most similar patch (cosine on the dense grid) is in the box."""
    load = image_batches(images, encoder.image_size, "squash")  # as for the box scores
    grids = sharded_map(lambda idx: encoder.dense_features(load(idx)), len(images), batch_size)
    hits = []
    for owner, box, text in zip(owners, boxes, box_text_emb, strict=True):
        patches = l2_normalize(grids[owner].reshape(-1, grids.shape[-1]))
        mask = box_patch_mask(box, np.asarray(images[owner]).shape[:2], grids.shape[1])
        hits.append(mask.reshape(-1)[int(np.argmax(patches @ text))])
    return float(100.0 * np.mean(hits))


def box_attention_share(encoder, images, owners, boxes, texts, batch_size: int) -> float:
    """Mean % of the pooler's attention (averaged over heads) that each box's text puts on the
    patches of its own box (box_patch_mask). Uniform attention scores the box's patch share."""
    # Squashed to the model's size as for the box scores, so a box maps by scaling alone.
    load = image_batches(images, encoder.image_size, "squash")

    def compute(indices: np.ndarray) -> np.ndarray:
        attn = np.asarray(
            encoder.attention(
                load(np.asarray([owners[i] for i in indices])), [texts[i] for i in indices]
            ),
            np.float32,
        ).mean(axis=1)  # [b, P]
        grid = int(round(attn.shape[-1] ** 0.5))
        shares = []
        for row, i in zip(attn, indices, strict=True):
            mask = box_patch_mask(boxes[i], np.asarray(images[owners[i]]).shape[:2], grid)
            shares.append(row.reshape(grid, grid)[mask].sum() / max(row.sum(), 1e-12))
        return np.asarray(shares)

    return float(100.0 * sharded_map(compute, len(boxes), batch_size).mean())


class SyntheticEvaluator(Evaluator):
    """Config: num_examples (default 64), seed (default 0), split (default "eval"), image_size
    (default: the encoder's), tci (default True), min_objects / max_objects (default: the
    SyntheticScenes defaults; set them as the training data's); max_examples caps num_examples.
    """

    kind = "synthetic"

    def __init__(self, name: str, cfg: Any, image_size: int | None = None):
        super().__init__(name, cfg, image_size)
        self.num_examples = int(cfg_get(cfg, "num_examples", 64))
        if self.max_examples:
            self.num_examples = min(self.num_examples, int(self.max_examples))
        self.seed = int(cfg_get(cfg, "seed", 0))
        self.split = cfg_get(cfg, "split", "eval")
        self.image_size = cfg_get(cfg, "image_size", None)
        self.tci = bool(cfg_get(cfg, "tci", True))
        # Only what is set is passed on, so the scenes' own defaults stay in one place.
        self.scene_options = {
            k: int(cfg_get(cfg, k)) for k in ("min_objects", "max_objects") if cfg_get(cfg, k)
        }
        self._records: dict[int, list] = {}

    def records(self, image_size: int) -> list:
        """The eval-split scenes at image_size (built once per size; they are deterministic)."""
        if image_size not in self._records:
            from beta_clip_jax.data.synthetic import SyntheticScenes

            scenes = SyntheticScenes(
                num_examples=self.num_examples,
                image_size=image_size,
                seed=self.seed,
                split=self.split,
                **self.scene_options,
            )
            self._records[image_size] = [scenes[i] for i in range(len(scenes))]
        return self._records[image_size]

    def run(self, encoder) -> dict[str, float]:
        size = int(self.image_size or encoder.image_size or self.image_size_hint)
        return synthetic_scores(encoder, self.records(size), self.batch_size, tci=self.tci)
