"""Zero-shot classification evaluator on an image-folder layout (class subfolders).

Each class's text embedding is the normalised mean of its prompt-template embeddings (the CLIP
prompt ensemble); images use the CLS path; reports top1 and top5 accuracy in %. Class names and
templates are resolved by readers.read_image_folder: an ImageNet tree of WordNet-id folders
(n01440764, ...) gets the CLIP ImageNet-1k names and the 80 OpenAI templates, and id-like
folders with no names file are refused rather than turned into prompts like "a photo of a
n01440764.".
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from beta_clip_jax.evals import readers
from beta_clip_jax.evals.base import (
    Evaluator,
    cfg_get,
    cfg_require,
    embed_images,
    embed_texts,
)
from beta_clip_jax.evals.metrics import topk_accuracy
from beta_clip_jax.mathutil import l2_normalize

_log = logging.getLogger(__name__)


def class_embeddings(encoder, classnames, templates, batch_size: int) -> np.ndarray:
    """[num_classes, E]: per class, the normalised mean over templates of normalised embeddings."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(encoder, prompts, batch_size)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return l2_normalize(emb)


class ZeroShotEvaluator(Evaluator):
    """Config: root (root/<class>/*.jpg); optional classnames_file, and templates (a template-set
    name, "openai80" or "openai7", or a templates file path) or templates_file. Defaults:
    root/classnames.txt, else ImageNet names for WordNet-id folders, else the folder names;
    root/templates.txt, else "openai80" for ImageNet-table names and "openai7" otherwise.

    max_examples keeps an evenly spaced subset of the images, so every class stays represented.
    """

    kind = "zeroshot"

    def __init__(self, name: str, cfg: Any, image_size: int | None = None):
        super().__init__(name, cfg, image_size)
        self.data = readers.read_image_folder(
            cfg_require(cfg, "root", name),
            cfg_get(cfg, "classnames_file"),
            cfg_get(cfg, "templates_file"),
            cfg_get(cfg, "templates"),
        )
        n = len(self.data.image_paths)
        if self.max_examples and self.max_examples < n:
            keep = np.linspace(0, n - 1, int(self.max_examples)).round().astype(int)
            self.data.image_paths = [self.data.image_paths[i] for i in keep]
            self.data.labels = self.data.labels[keep]
        data = self.data
        _log.info(
            "zeroshot %r: %d classes, names from %s (e.g. %r); %d templates from %s; %d images",
            name,
            len(data.classnames),
            data.classnames_from,
            data.templates[0].format(data.classnames[0]),
            len(data.templates),
            data.templates_from,
            len(data.image_paths),
        )

    def run(self, encoder) -> dict[str, float]:
        data = self.data
        classes = class_embeddings(encoder, data.classnames, data.templates, self.batch_size)
        load = self.image_batches(data.image_paths, encoder.image_size, "crop")
        images = embed_images(encoder, load, len(data.image_paths), self.batch_size)
        return topk_accuracy(images @ classes.T, data.labels, (1, 5))
