"""Image-text retrieval evaluator: Urban1k, ShareGPT4V-1k, DCI, COCO and Flickr30k.

Always reports the plain dual-encoder score (CLS embedding vs caption embedding): t2i_r1/5/10,
i2t_r1/5/10. With `tci` on, it also reports beta-CLIP's text-conditioned score (each gallery image
pooled with its own ground-truth caption, beta_clip.md 5.2) under keys prefixed "tci_". That
score lets the gallery see its own caption, so it is not a leak-free retrieval protocol; it is
kept for parity with the reference's logs and labelled as such in the console table.
"""

from __future__ import annotations

import os
from typing import Any

from beta_clip_jax.evals import readers
from beta_clip_jax.evals.base import (
    Evaluator,
    cfg_get,
    cfg_require,
    embed_conditioned,
    embed_images,
    embed_texts,
    image_batches,
)
from beta_clip_jax.evals.metrics import retrieval_recall

TCI_PREFIX = "tci_"


def read_retrieval_set(name: str, kind: str, cfg: Any) -> readers.RetrievalSet:
    """The manifest for one retrieval kind, from its config paths."""
    if kind == "urban1k":
        return readers.read_urban1k(cfg_require(cfg, "root", name))
    if kind == "sharegpt4v_1k":
        return readers.read_sharegpt4v_1k(
            cfg_require(cfg, "json_path", name),
            cfg_require(cfg, "image_root", name),
            num=int(cfg_get(cfg, "num", 1000)),
            caption_mode=cfg_get(cfg, "caption_mode", "beta_clip"),
        )
    if kind == "dci":
        return readers.read_dci(
            cfg_require(cfg, "root", name),
            cfg_get(cfg, "image_root"),
            caption_mode=cfg_get(cfg, "caption_mode", "short+extra"),
        )
    if kind in ("coco", "flickr30k"):
        root = cfg_require(cfg, "root", name)
        default_json = "dataset_coco.json" if kind == "coco" else "dataset_flickr30k.json"
        return readers.read_karpathy(
            cfg_get(cfg, "json_path", os.path.join(root, default_json)),
            cfg_get(cfg, "image_root", root),
            split=cfg_get(cfg, "split", "test"),
            captions_per_image=int(cfg_get(cfg, "captions_per_image", 5)),
        )
    raise ValueError(f"not a retrieval kind: {kind!r}")


def retrieval_scores(
    encoder, data: readers.RetrievalSet, batch_size: int, *, tci: bool, image_mode: str = "crop"
) -> dict[str, float]:
    """CLS retrieval recall (and, if tci, the text-conditioned variant) on one manifest."""
    num_images = len(data.image_paths)
    load = image_batches(data.image_paths, encoder.image_size, image_mode)
    images = embed_images(encoder, load, num_images, batch_size)
    texts = embed_texts(encoder, data.captions, batch_size)
    results = retrieval_recall(images @ texts.T, data.text_to_image)
    if tci:
        pooled = embed_conditioned(encoder, load, data.first_caption_per_image(), batch_size)
        for key, value in retrieval_recall(pooled @ texts.T, data.text_to_image).items():
            results[TCI_PREFIX + key] = value
    results["num_images"] = float(num_images)
    results["num_texts"] = float(len(data.captions))
    return results


class RetrievalEvaluator(Evaluator):
    """Config: kind, the kind's paths (see read_retrieval_set), tci, image_mode, + common fields.

    Paths per kind: urban1k root; sharegpt4v_1k json_path + image_root (+ num, caption_mode);
    dci root (+ image_root, caption_mode "short+extra" | "extra"); coco / flickr30k root
    (+ json_path, image_root, split, captions_per_image). tci defaults on for the long-caption sets
    (as beta-CLIP logs it) and off for COCO/Flickr. image_mode "crop" (CLIP transform) or
    "squash" (FG-CLIP's square resize).
    """

    LONG_CAPTION_KINDS = ("urban1k", "sharegpt4v_1k", "dci")

    def __init__(self, name: str, cfg: Any, image_size: int | None = None):
        super().__init__(name, cfg, image_size)
        self.kind = cfg_require(cfg, "kind", name)
        self.tci = bool(cfg_get(cfg, "tci", self.kind in self.LONG_CAPTION_KINDS))
        self.image_mode = cfg_get(cfg, "image_mode", "crop")
        self.data = read_retrieval_set(name, self.kind, cfg).truncated(self.max_examples)

    def run(self, encoder) -> dict[str, float]:
        return retrieval_scores(
            encoder, self.data, self.batch_size, tci=self.tci, image_mode=self.image_mode
        )
