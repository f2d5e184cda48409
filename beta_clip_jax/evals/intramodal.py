"""Intra-modal retrieval: image->image by class, text->text by shared image.

    evals.intra = dict(kind="intramodal")                       # synthetic scenes, no files
    evals.cub = dict(kind="intramodal", image_root="/data/CUB/images",
                     iso_variant="B/16")                         # + spectrally filtered scores
    evals.coco_t2t = dict(kind="intramodal", json_path="/data/coco/dataset_coco.json")

Image->image: `image_root` holds one folder per class (root/<class>/*.jpg); every image queries
all the others (leave-one-out), or, with `gallery_root` (same class folder names), the queries
are image_root's images and the gallery gallery_root's. Text->text: a Karpathy split json
(`json_path`, `split`, `captions_per_image`); each image's first caption queries the other
captions, relevant = those of the same image. With neither path set, the synthetic version:
classes are synthetic scenes (the same objects) re-rendered with the objects moved to other
cells and a new background; texts are a scene's caption with its sentences reordered and
re-templated.

Metrics (percent): i2i_map, i2i_map_at_r, i2i_p_at_r, i2i_r1 and t2t_* likewise. A parameter
filter of the method registry (methods.param_filters(); the spectral band filter of
methods/, options `iso_variant` / `iso_image_band` / `iso_text_band`) whose options
the config sets adds the same metrics again with the filtered parameters, under the filter's
prefix ("iso_"): the filter is applied in memory to the encoder's params, so one run reports
both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from beta_clip_jax import methods
from beta_clip_jax.evals import readers
from beta_clip_jax.evals.base import Evaluator, cfg_get, embed_images, embed_texts
from beta_clip_jax.evals.metrics import image_to_image, text_to_text

METRICS = ("map", "map_at_r", "p_at_r", "r1")


class IntraModalEvaluator(Evaluator):
    """Config: image_root, gallery_root, json_path, split ("test"), captions_per_image (5),
    image_mode ("crop"); synthetic: num_classes (32), per_class (4), num_scenes (64),
    captions_per_scene (3), seed (0); and the options of the registry's parameter filters.
    max_examples caps the number of images / caption groups.
    """

    kind = "intramodal"

    def __init__(self, name: str, cfg: Any, image_size: int | None = None):
        super().__init__(name, cfg, image_size)
        self.image_mode = cfg_get(cfg, "image_mode", "crop")
        # The parameter filters whose options this config sets, with those options.
        self.filters = []
        for param_filter in methods.param_filters():
            options = {k: cfg_get(cfg, k, None) for k in param_filter.options}
            if any(v is not None for v in options.values()):
                self.filters.append((param_filter, options))
        image_root = cfg_get(cfg, "image_root", "")
        json_path = cfg_get(cfg, "json_path", "")
        self.synthetic = not image_root and not json_path
        limit = int(self.max_examples) if self.max_examples else None
        self.images = self.gallery = self.texts = None
        if image_root:  # read now: a bad path stops the run before compiling
            self.images = _class_folder(image_root, limit)
            gallery_root = cfg_get(cfg, "gallery_root", "")
            if gallery_root:
                self.gallery = _class_folder(gallery_root, None, classes=self.images[2])
        if json_path:
            data = readers.read_karpathy(
                json_path,
                os.path.dirname(os.path.abspath(json_path)),  # image paths are not used
                split=cfg_get(cfg, "split", "test"),
                captions_per_image=int(cfg_get(cfg, "captions_per_image", 5)),
            ).truncated(limit)
            self.texts = (list(data.captions), np.asarray(data.text_to_image))
        if self.synthetic:
            self.syn = {
                "num_classes": int(cfg_get(cfg, "num_classes", 32)),
                "per_class": int(cfg_get(cfg, "per_class", 4)),
                "num_scenes": int(cfg_get(cfg, "num_scenes", 64)),
                "captions_per_scene": int(cfg_get(cfg, "captions_per_scene", 3)),
                "seed": int(cfg_get(cfg, "seed", 0)),
            }
            if limit:
                self.syn["num_classes"] = max(1, min(self.syn["num_classes"], limit))
                self.syn["num_scenes"] = max(1, min(self.syn["num_scenes"], limit))
            self.texts = synthetic_texts(
                self.syn["num_scenes"], self.syn["captions_per_scene"], self.syn["seed"]
            )
        self._synthetic_images: dict[int, tuple] = {}

    def _image_sets(self, size: int):
        if self.synthetic:
            if size not in self._synthetic_images:
                s = self.syn
                self._synthetic_images[size] = synthetic_images(
                    s["num_classes"], s["per_class"], size, s["seed"]
                )
            images, labels = self._synthetic_images[size]
            return (images, labels), None
        query = None if self.images is None else self.images[:2]
        gallery = None if self.gallery is None else self.gallery[:2]
        return query, gallery

    def _embed_images(self, encoder, images, size: int) -> np.ndarray:
        load = self.image_batches(images, size, self.image_mode)
        return embed_images(encoder, load, len(images), self.batch_size)

    def run(self, encoder) -> dict[str, float]:
        size = int(encoder.image_size or self.image_size_hint)
        query, gallery = self._image_sets(size)
        encoders = [("", encoder)]
        for param_filter, options in self.filters:
            encoders.append((param_filter.prefix, filtered_encoder(encoder, param_filter, options)))
        out: dict[str, float] = {}
        for prefix, enc in encoders:
            if query is not None:
                emb = self._embed_images(enc, query[0], size)
                if gallery is None:
                    res = image_to_image(emb, query[1])
                else:
                    g_emb = self._embed_images(enc, gallery[0], size)
                    res = image_to_image(emb, query[1], g_emb, gallery[1])
                out.update({f"{prefix}i2i_{k}": float(res[k]) for k in METRICS})
            if self.texts is not None:
                captions, owners = self.texts
                res = text_to_text(embed_texts(enc, captions, self.batch_size), owners)
                out.update({f"{prefix}t2t_{k}": float(res[k]) for k in METRICS})
        return out


def _class_folder(root: str, limit: int | None, classes: list[str] | None = None):
    """(image paths, int labels, class folder names) of root/<class>/*; labels by folder name."""
    if not readers.is_dir(root):
        raise FileNotFoundError(
            f"intra-modal image folder: expected {root!r} (one folder per class)"
        )
    names = classes or sorted(
        d for d in readers.list_dir(root) if readers.is_dir(os.path.join(root, d))
    )
    index = {n: i for i, n in enumerate(names)}
    paths, labels = [], []
    for name in names:
        folder = os.path.join(root, name)
        if not readers.is_dir(folder):
            continue
        for f in sorted(readers.list_dir(folder)):
            if f.lower().endswith(readers.IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, f))
                labels.append(index[name])
    if not paths:
        raise FileNotFoundError(f"intra-modal image folder {root!r}: no images in <class>/ folders")
    if limit:
        order = np.random.default_rng(0).permutation(len(paths))[:limit]
        order.sort()
        paths, labels = [paths[i] for i in order], [labels[i] for i in order]
    return paths, np.asarray(labels, np.int64), names


def filtered_encoder(encoder, param_filter, options):
    """A copy of `encoder` with `param_filter` applied to its params (intra-modal use only).

    Sharded (multi-host) kernels at the filter's paths are gathered for it and put back with
    their sharding.
    """
    import jax

    from beta_clip_jax.evals.encoder import Encoder

    params = dict(encoder.params)
    originals = {}
    for path in param_filter.paths:
        tower = dict(params[path[0]])
        leaf = dict(tower[path[1]])
        originals[path] = leaf["kernel"]
        leaf["kernel"] = _host(leaf["kernel"])
        tower[path[1]] = leaf
        params[path[0]] = tower
    filtered = param_filter.apply(params, options)
    for path, old in originals.items():
        new = np.asarray(filtered[path[0]][path[1]]["kernel"], np.float32)
        if isinstance(old, jax.Array):
            new = jax.make_array_from_callback(new.shape, old.sharding, lambda idx, a=new: a[idx])
        filtered[path[0]][path[1]]["kernel"] = new
    return Encoder.from_params(
        encoder.model, filtered, encoder.tokenizer, batch_size=encoder.batch_size
    )


def _host(x):
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ---- synthetic intra-modal sets -------------------------------------------------------------


def synthetic_images(num_classes: int, per_class: int, size: int, seed: int = 0):
    """(uint8 images [C * per_class, size, size, 3], labels): class c = the objects of test
    scene c (size, colour, shape), each instance with the objects in other random cells and a
    new background."""
    from beta_clip_jax.data import synthetic as syn

    scenes = syn.SyntheticScenes(num_classes, image_size=size, seed=seed, split="test")
    images, labels = [], []
    for c in range(num_classes):
        objects = scenes.scene(c)
        for j in range(per_class):
            rng = np.random.default_rng([seed, 7, c, j])
            images.append(syn._draw(_relayout(objects, size, rng, syn), size, rng))
            labels.append(c)
    return np.stack(images), np.asarray(labels, np.int64)


def _relayout(objects, size: int, rng, syn):
    cells = rng.choice(len(syn.POSITIONS), size=len(objects), replace=False)
    cell = size / 3.0
    out = []
    for obj, where in zip(objects, cells, strict=True):
        r = syn._RADIUS[obj.size] * cell
        slack = max(0.0, 0.5 * cell - r - 1.0)
        row, col = divmod(int(where), 3)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        out.append(
            dataclasses.replace(obj, position=syn.POSITIONS[int(where)], cx=float(cx), cy=float(cy))
        )
    return out


def synthetic_texts(num_scenes: int, per_scene: int, seed: int = 0):
    """(captions, scene ids): per test scene, its caption rewritten per_scene times with the
    sentences in another order and other sentence templates (distinct when possible)."""
    from beta_clip_jax.data import synthetic as syn

    scenes = syn.SyntheticScenes(num_scenes, seed=seed, split="test")
    captions, owners = [], []
    for i in range(num_scenes):
        objects = scenes.scene(i)
        rng = np.random.default_rng([seed, 11, i])
        seen = {". ".join(o.sentence() for o in objects)}
        texts = [next(iter(seen))]
        for _ in range(20 * per_scene):
            if len(texts) == per_scene:
                break
            order = rng.permutation(len(objects))
            text = ". ".join(
                dataclasses.replace(
                    objects[k], template=int(rng.integers(0, len(syn._TEMPLATES)))
                ).sentence()
                for k in order
            )
            if text not in seen:
                seen.add(text)
                texts.append(text)
        captions += texts
        owners += [i] * len(texts)
    return captions, np.asarray(owners, np.int64)
