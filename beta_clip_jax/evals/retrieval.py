"""Image-text retrieval evaluator: Urban1k, ShareGPT4V-1k, DCI, COCO, Flickr30k and a JSONL of
our training format (a user's own held-out data).

Always reports the plain dual-encoder score (CLS embedding vs caption embedding): t2i_r1/5/10,
i2t_r1/5/10. With `tci` on, it also reports beta-CLIP's text-conditioned score (each gallery image
pooled with its own ground-truth caption, as beta-CLIP's evaluator logs it) under keys prefixed
"tci_". That score lets the gallery see its own caption, so it is not a leak-free retrieval
protocol; it is kept for parity with the reference's logs and labelled as such in the console
table. docs/evals.md describes each dataset's protocol and which published numbers it matches.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from etils import epath

from beta_clip_jax.data import hierarchy, sources
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
from beta_clip_jax.evals.metrics import retrieval_ranks, retrieval_recall

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
    if kind == "coco":
        return _read_coco(name, cfg)
    if kind == "flickr30k":
        return _read_flickr30k(name, cfg)
    if kind == "jsonl":
        return _read_jsonl(name, cfg)
    raise ValueError(f"not a retrieval kind: {kind!r}")


JSONL_CAPTION_MODES = ("caption", "joined")
_MAX_SKIP_WARNINGS = 20
_log = logging.getLogger(__name__)


def _read_jsonl(name: str, cfg: Any) -> readers.RetrievalSet:
    # `root` too, so that the evaluate command's --root=FILE fills it.
    path, root = cfg_get(cfg, "path"), cfg_get(cfg, "root")
    if path and root and path != root:
        raise ValueError(f"evaluator {name!r} (jsonl): set path or root (the same file), not both")
    return read_jsonl_set(
        path or root or cfg_require(cfg, "path", name),
        cfg_get(cfg, "image_root"),
        caption_mode=cfg_get(cfg, "caption_mode", "caption"),
        eval_fraction=float(cfg_get(cfg, "eval_fraction", 0.0)),
        skip_first=int(cfg_get(cfg, "skip_first", sources.default_skip_first("jsonl"))),
        check_images=bool(cfg_get(cfg, "check_images", True)),
    )


def read_jsonl_set(
    path: str,
    image_root: str | None = None,
    *,
    caption_mode: str = "caption",
    eval_fraction: float = 0.0,
    skip_first: int = 0,
    check_images: bool = True,
) -> readers.RetrievalSet:
    """One caption per image from a JSONL of our training format, in file order.

    Records are read by the training `JsonlSource`, so relative image paths resolve exactly as
    in training (image_root, default the file's folder). eval_fraction > 0 reads only the tail
    that `data.eval_fraction` keeps out of training (sources.held_out_range; skip_first must
    then equal the run's data.skip_first), else every record. caption_mode "caption": the
    caption de-duplicated as training does; "joined": all its sentences (the precomputed
    `sentences` when present) joined with ". ", as a training caption is when none is dropped.
    A record training would skip is left out with a warning and listed in `skipped`.
    """
    if caption_mode not in JSONL_CAPTION_MODES:
        raise ValueError(f"jsonl caption_mode {caption_mode!r} not in {list(JSONL_CAPTION_MODES)}")
    source = sources.JsonlSource(path, image_root)
    start, stop = 0, len(source)
    if eval_fraction:
        start, stop = sources.held_out_range(len(source), eval_fraction, skip_first)
    images, captions, skipped = [], [], []
    for index in range(start, stop):
        image, caption, problem = _jsonl_pair(source, index, caption_mode, check_images)
        if problem:
            skipped.append(f"{source.record_id(index)}: {problem}")
        else:
            images.append(image)
            captions.append(caption)
    for line in skipped[:_MAX_SKIP_WARNINGS]:
        _log.warning("jsonl eval: skipping %s", line)
    more = len(skipped) - _MAX_SKIP_WARNINGS
    if more > 0:
        _log.warning("jsonl eval: %d more records of %s skipped", more, path)
    if not images:
        raise ValueError(
            f"{path}: none of records {start}..{stop - 1} (of {len(source)}) can be evaluated: "
            + "; ".join(skipped[:3])
        )
    data = readers.one_to_one(images, captions)
    data.skipped = skipped
    return data


def _jsonl_pair(source, index: int, caption_mode: str, check_images: bool):
    """(image path, caption, None), or (None, None, "reason: detail") with the training
    pipeline's skip reasons, so a record is rejected here exactly when training rejects it."""
    try:
        record = source[index]
    except UnicodeDecodeError as e:
        return None, None, f"bad_utf8: {e}"
    except sources.UnsafePathError as e:
        return None, None, f"unsafe_path: {e}"
    except Exception as e:  # malformed JSON, a missing "image" or "caption" key
        return None, None, f"bad_record: {type(e).__name__}: {e}"
    caption = record["caption"]
    if not isinstance(caption, str):
        return None, None, f"non_text_caption: caption is {type(caption).__name__}"
    # All sentences kept (no sampling), so the rng is never drawn from.
    texts = hierarchy.build_hierarchy(
        caption,
        np.random.default_rng(0),
        max_sentences=1 << 30,
        max_phrases=0,
        sentences=record.get("sentences"),
    )
    if not texts.sentences:
        return None, None, f"empty_caption: caption has no text ({caption[:80]!r})"
    path = record["image_path"]
    if check_images:
        problem = sources.image_problem(path)
        if problem:
            return None, None, ": ".join(problem)
    elif not epath.Path(path).exists():
        return None, None, f"missing_image: no file {path}"
    if caption_mode == "joined":
        return path, texts.caption, None
    return path, hierarchy.dedupe_caption(caption), None


COCO_PROTOCOLS = ("val2017", "karpathy")
FLICKR30K_PROTOCOLS = ("karpathy_1k", "full")
KARPATHY_FIELDS = ("json_path", "split")


def _path(cfg: Any, key: str, name: str, *under_root: str) -> str:
    """cfg[key], else root/<under_root...> (root is then required)."""
    return cfg_get(cfg, key) or os.path.join(cfg_require(cfg, "root", name), *under_root)


def _protocol(name: str, cfg: Any, choices: tuple[str, ...], default: str) -> str:
    protocol = cfg_get(cfg, "protocol", default)
    if protocol not in choices:
        raise ValueError(
            f"evaluator {name!r} ({cfg_get(cfg, 'kind')}): protocol {protocol!r} not in "
            f"{list(choices)}"
        )
    return protocol


def _refuse_fields(name: str, cfg: Any, protocol: str, fields: tuple[str, ...]) -> None:
    given = [f for f in fields if cfg_get(cfg, f) is not None]
    if given:
        raise ValueError(
            f"evaluator {name!r} ({cfg_get(cfg, 'kind')}): protocol {protocol!r} does not read "
            f"{given}; they belong to another protocol"
        )


def _read_coco(name: str, cfg: Any) -> readers.RetrievalSet:
    """protocol "val2017" (default) or "karpathy" (the default when json_path / split are set)."""
    uses_karpathy_fields = any(cfg_get(cfg, f) is not None for f in KARPATHY_FIELDS)
    protocol = _protocol(
        name, cfg, COCO_PROTOCOLS, "karpathy" if uses_karpathy_fields else "val2017"
    )
    per_image = int(cfg_get(cfg, "captions_per_image", 5))
    if protocol == "val2017":
        _refuse_fields(name, cfg, protocol, KARPATHY_FIELDS)
        return readers.read_coco_captions(
            _path(cfg, "annotation_json", name, "annotations", "captions_val2017.json"),
            _path(cfg, "image_root", name),
            captions_per_image=per_image,
        )
    _refuse_fields(name, cfg, protocol, ("annotation_json",))
    return readers.read_karpathy(
        _path(cfg, "json_path", name, "dataset_coco.json"),
        _path(cfg, "image_root", name),
        split=cfg_get(cfg, "split", "test"),
        captions_per_image=per_image,
    )


def _flickr_image_root(name: str, cfg: Any) -> str:
    """image_root, else root/flickr30k-images when that folder exists, else root."""
    if cfg_get(cfg, "image_root"):
        return cfg_get(cfg, "image_root")
    root = cfg_require(cfg, "root", name)
    folder = os.path.join(root, "flickr30k-images")
    return folder if readers.is_dir(folder) else root


def _read_flickr30k(name: str, cfg: Any) -> readers.RetrievalSet:
    """protocol "karpathy_1k" (default) or "full" (the whole token file, Long-CLIP's table)."""
    protocol = _protocol(name, cfg, FLICKR30K_PROTOCOLS, "karpathy_1k")
    per_image = int(cfg_get(cfg, "captions_per_image", 5))
    token_path = cfg_get(cfg, "token_path")
    if protocol == "full":
        _refuse_fields(name, cfg, protocol, (*KARPATHY_FIELDS, "test_list"))
        return readers.read_flickr_token(
            _path(cfg, "token_path", name, readers.FLICKR_TOKEN_FILE),
            _flickr_image_root(name, cfg),
            captions_per_image=per_image,
        )
    split = cfg_get(cfg, "split", "test")
    test_list = cfg_get(cfg, "test_list")
    json_path = cfg_get(cfg, "json_path")
    if test_list and json_path:
        raise ValueError(
            f"evaluator {name!r} (flickr30k): set json_path (captions from the Karpathy json) or "
            "test_list (captions from the token file), not both"
        )
    if test_list or token_path:
        if not test_list:
            raise ValueError(
                f"evaluator {name!r} (flickr30k): protocol 'karpathy_1k' with token_path needs "
                "test_list (the Karpathy test image names, a text file or dataset_flickr30k.json); "
                "protocol 'full' reads every image of the token file"
            )
        return readers.read_flickr_token(
            _path(cfg, "token_path", name, readers.FLICKR_TOKEN_FILE),
            _flickr_image_root(name, cfg),
            captions_per_image=per_image,
            image_list=readers.read_image_list(test_list, split=split),
        )
    json_path = json_path or _path(cfg, "json_path", name, "dataset_flickr30k.json")
    if not epath.Path(json_path).exists():
        raise FileNotFoundError(
            f"Flickr30k karpathy_1k: expected the Karpathy split json at {json_path!r}, which does "
            f"not exist. {readers.KARPATHY_HINT} Or set token_path + test_list to read "
            f"{readers.FLICKR_TOKEN_FILE} restricted to the Karpathy test images."
        )
    return readers.read_karpathy(
        json_path, _flickr_image_root(name, cfg), split=split, captions_per_image=per_image
    )


def _rank_items(sim, text_to_image, scoring: str) -> list[dict]:
    """Per caption and per image: the 0-based rank of its ground truth (retrieval_ranks)."""
    i2t, t2i = retrieval_ranks(sim, text_to_image)
    out = [
        {"scoring": scoring, "direction": "t2i", "index": j, "image": int(img), "rank": int(r)}
        for j, (img, r) in enumerate(zip(text_to_image, t2i, strict=True))
    ]
    return out + [
        {"scoring": scoring, "direction": "i2t", "index": i, "rank": int(r)}
        for i, r in enumerate(i2t)
    ]


def retrieval_scores(
    encoder,
    data: readers.RetrievalSet,
    batch_size: int,
    *,
    tci: bool,
    image_mode: str = "crop",
    items: list | None = None,
    loader=image_batches,
) -> dict[str, float]:
    """CLS retrieval recall (and, if tci, the text-conditioned variant) on one manifest;
    `items` (optional) gets every caption's and image's rank (scoring "cls" / "tci"); `loader`
    is base.image_batches or an evaluator's (its load_workers and jpeg_draft)."""
    num_images = len(data.image_paths)
    load = loader(data.image_paths, encoder.image_size, image_mode)
    images = embed_images(encoder, load, num_images, batch_size)
    texts = embed_texts(encoder, data.captions, batch_size)
    sims = {"cls": images @ texts.T}
    if tci:
        pooled = embed_conditioned(encoder, load, data.first_caption_per_image(), batch_size)
        sims["tci"] = pooled @ texts.T
    results = {}
    for scoring, sim in sims.items():
        prefix = TCI_PREFIX if scoring == "tci" else ""
        for key, value in retrieval_recall(sim, data.text_to_image).items():
            results[prefix + key] = value
        if items is not None:
            items += _rank_items(sim, data.text_to_image, scoring)
    results["num_images"] = float(num_images)
    results["num_texts"] = float(len(data.captions))
    return results


class RetrievalEvaluator(Evaluator):
    """Config: kind, the kind's paths (see read_retrieval_set), tci, image_mode, + common fields.

    Paths per kind:
      * urban1k: root.
      * sharegpt4v_1k: json_path + image_root (+ num, caption_mode).
      * dci: root (+ image_root, caption_mode "short+extra" | "extra").
      * coco, protocol "val2017" (default; the COCO 5k of Long-CLIP / FineLIP / FG-CLIP v1):
        root holding annotations/captions_val2017.json and val2017/, or annotation_json +
        image_root (the folder holding val2017/); the first captions_per_image (5) captions of
        each image, images in ascending id order.
      * coco, protocol "karpathy" (the Karpathy 5k test, val2014 images; also chosen when
        json_path or split is set without a protocol): root (+ json_path, default
        root/dataset_coco.json; image_root, default root; split, default "test").
      * flickr30k, protocol "karpathy_1k" (default; the standard 1k test): the Karpathy json
        (json_path, default root/dataset_flickr30k.json; split) or the token file (token_path,
        default root/results_20130124.token) restricted to test_list (a text file of image
        names, or a Karpathy json whose split entries are taken).
      * flickr30k, protocol "full" (Long-CLIP / FineLIP's "Flickr30k": all 31,783 images of the
        token file, not comparable with 1k numbers): token_path or root.
      * Flickr images: image_root, default root/flickr30k-images if present, else root.
      * COCO / Flickr: captions_per_image (default 5). The val2017 and token-file readers refuse
        an image with fewer; the Karpathy json keeps what there is.
      * jsonl (our training format, e.g. a held-out file): path or root (the file), image_root
        (default the file's folder), caption_mode "caption" | "joined", eval_fraction and
        skip_first (only the tail data.eval_fraction held out of training), check_images
        (default on: decode every image when built). Records training would skip are left out
        and counted in the result's "skipped" (read_jsonl_set).

    tci defaults on for the long-caption sets (as beta-CLIP logs it) and off for COCO/Flickr.
    image_mode "crop" (CLIP transform) or "squash" (FG-CLIP's square resize).
    """

    LONG_CAPTION_KINDS = ("urban1k", "sharegpt4v_1k", "dci", "jsonl")

    def __init__(self, name: str, cfg: Any, image_size: int | None = None):
        super().__init__(name, cfg, image_size)
        self.kind = cfg_require(cfg, "kind", name)
        self.tci = bool(cfg_get(cfg, "tci", self.kind in self.LONG_CAPTION_KINDS))
        self.image_mode = cfg_get(cfg, "image_mode", "crop")
        self.data = read_retrieval_set(name, self.kind, cfg).truncated(self.max_examples)

    per_item = True

    def run(self, encoder, items: list | None = None) -> dict[str, float]:
        results = retrieval_scores(
            encoder,
            self.data,
            self.batch_size,
            tci=self.tci,
            image_mode=self.image_mode,
            items=items,
            loader=self.image_batches,
        )
        if self.data.skipped is not None:
            results["skipped"] = float(len(self.data.skipped))
        return results
