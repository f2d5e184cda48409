"""Inference API: `load(path)` -> Encoder with image, text, dense and text-conditioned embeddings.

Inputs are batched internally at a fixed batch size (the last batch padded) so each function
compiles once per shape. Images at the model's resolution go in as they are; others are resized
(bicubic, shortest side) and centre-cropped as in CLIP evaluation. Encoders always compute in
float32, whatever `model.dtype` a run trains in, as the reference evaluates in float32.
`Encoder.zero_shot_classifier(class_names)` builds a reusable zero-shot classifier.
"""

import logging

import jax

from beta_clip_jax.convert import import_pretrained, parse_spec
from beta_clip_jax.evals.encoder import (  # noqa: F401  (the public API)
    TRUNCATIONS,
    Encoder,
    ZeroShotClassifier,
    ZeroShotPrediction,
    float32_model,
)
from beta_clip_jax.methods import build_model

_log = logging.getLogger(__name__)


def load(
    path: str,
    *,
    tokenizer=None,
    batch_size: int = 32,
    model_cfg=None,
    truncation: str = "eot",
) -> Encoder:
    """An Encoder from a workdir, an exported directory, a HF CLIP directory, or a
    `hf:` (a directory or a hub id in the local cache) / `openai:` / `openclip:` / `bclip:`
    spec (an official β-CLIP checkpoint); see beta_clip_jax.convert.

    `model_cfg` (optional) overrides the checkpoint's own config, e.g. context_length=248.
    `truncation` ("eot" | "cut") is how over-long texts are cut (see TRUNCATIONS).
    """
    kind, where = parse_spec(path)
    params, cfg, not_provided = import_pretrained(f"{kind}:{where}", model_cfg)
    if not_provided:
        _log.warning("%s has no pooler weights; conditioned_embeddings uses a random pooler", path)
    model = build_model(cfg)
    return Encoder(
        model, jax.device_put(params), tokenizer, batch_size=batch_size, truncation=truncation
    )
