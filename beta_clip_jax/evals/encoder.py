"""The inference encoder: image, text, dense and text-conditioned embeddings of a model and
its params (`Encoder`), and zero-shot classifiers built from it. Evaluators and the trainer use
it directly; `beta_clip_jax.api` re-exports it beside `load(path)`.

Inputs are batched internally at a fixed batch size (the last batch padded) so each function
compiles once per shape. Images at the model's resolution go in as they are; others are resized
(bicubic, shortest side) and centre-cropped as in CLIP evaluation. Encoders always compute in
float32, whatever `model.dtype` a run trains in, as the reference evaluates in float32.
"""

import dataclasses
import logging

import jax
import numpy as np

from beta_clip_jax.data import packing
from beta_clip_jax.data.transforms import normalize, resize_center_crop
from beta_clip_jax.evals.readers import resolve_templates
from beta_clip_jax.evals.zeroshot import class_embeddings
from beta_clip_jax.mathutil import l2_normalize
from beta_clip_jax.methods import build_model
from beta_clip_jax.models.clip import BetaCLIP

_log = logging.getLogger(__name__)

# Over-long texts: "eot" keeps EOT in the last position (our tokenizer's rule, Long-CLIP's);
# "cut" is the β-CLIP reference evaluators' plain cut, for reproducing their numbers.
TRUNCATIONS = ("eot", "cut")
# Packed text rows per encoder call are rounded up to a multiple of this (bounds compiles).
_ROW_STEP = 4
# Text lengths are trimmed to the smallest of these that holds the batch (then the context
# length): exact under causal attention with EOT pooling, and it bounds the number of compiles.
_TEXT_BUCKETS = (16, 32, 64, 128)


class Encoder:
    """Embeds images and texts with one BetaCLIP model; all outputs are numpy float32."""

    def __init__(
        self,
        model: BetaCLIP,
        params,
        tokenizer=None,
        *,
        batch_size: int = 32,
        mesh=None,
        truncation: str = "eot",
    ):
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        self.truncation = truncation
        model = float32_model(model)
        self.model = model
        self.params = params
        self.mesh = mesh
        if mesh is not None:
            # Each process embeds its own rows: a per-process batch that tiles its devices.
            from beta_clip_jax.sharding import data_parallel_size

            per_process = max(1, data_parallel_size(mesh) // jax.process_count())
            batch_size = -(-batch_size // per_process) * per_process
        # Packed text rows come in one group per data-parallel device of this process.
        self._text_groups = per_process if mesh is not None else 1
        self.batch_size = batch_size
        self._tokenizer = tokenizer
        cfg = model.config
        self.image_size = int(cfg.image_size)
        self.context_length = int(cfg.context_length)
        self._grid = cfg.image_size // cfg.patch_size

        def encode(p, images):
            cls, patches = model.apply({"params": p}, normalize(images), method="encode_image")
            return l2_normalize(cls), l2_normalize(patches), patches

        def encode_text(p, tokens):
            return l2_normalize(model.apply({"params": p}, tokens, method="encode_text"))

        def encode_packed(p, tokens, segments, positions, eot):
            out = model.apply(
                {"params": p}, tokens, segments, positions, eot, method="encode_packed_text"
            )
            return l2_normalize(out)

        def pool(p, images, tokens):
            _, patches = model.apply({"params": p}, normalize(images), method="encode_image")
            text = model.apply({"params": p}, tokens, method="encode_text")
            pooled, attn = model.apply({"params": p}, text[:, None], patches, method="pool")
            return l2_normalize(pooled[:, 0]), attn[:, :, 0]

        # One compiled function per input kind; callers pick an output, the rest stays on device.
        self._image = jax.jit(encode)
        self._text = jax.jit(encode_text)
        self._text_packed = jax.jit(encode_packed)
        self._pool = jax.jit(pool)

    @classmethod
    def from_params(cls, model: BetaCLIP, params, tokenizer=None, **kwargs) -> "Encoder":
        """An Encoder on live (e.g. training) params; nothing is copied or re-laid out.

        With `mesh=` (the trainer's), inputs are this process's rows, split over the mesh's batch
        axes, and outputs are this process's rows again: every process must make the same calls.
        """
        return cls(model, params, tokenizer, **kwargs)

    def _call(self, fn, chunk: list[np.ndarray]):
        if self.mesh is None:
            return fn(self.params, *chunk)
        from jax.experimental import multihost_utils

        from beta_clip_jax.sharding import BATCH_AXES, batch_sharding

        sharding = batch_sharding(self.mesh)
        inputs = [jax.make_array_from_process_local_data(sharding, c) for c in chunk]
        with jax.set_mesh(self.mesh):
            out = fn(self.params, *inputs)
        spec = jax.sharding.PartitionSpec(BATCH_AXES)
        return jax.tree.map(
            lambda x: multihost_utils.global_array_to_host_local_array(x, self.mesh, spec), out
        )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from beta_clip_jax.tokenizer import Tokenizer

            self._tokenizer = Tokenizer()
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """int32 [N, context_length]: SOT + BPE + EOT, zero-padded; over-long texts cut as
        `truncation` says."""
        keep_eot = self.truncation == "eot"
        ids = self.tokenizer.encode(list(texts), self.context_length, keep_eot=keep_eot)
        return np.asarray(ids, np.int32)

    def _images(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise TypeError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if images.shape[1:3] == (self.image_size, self.image_size):
            return images
        return np.stack([resize_center_crop(im, self.image_size) for im in images])

    def _trim(self, tokens: np.ndarray) -> np.ndarray:
        # The model pools each row at its argmax id (the first EOT) under causal attention, so
        # nothing after that position can change a row's embedding. Counting non-zero ids instead
        # would be wrong: id 0 is a real byte piece ("!"), not only padding.
        used = int(np.argmax(tokens, axis=1).max(initial=0)) + 1 if len(tokens) else 1
        length = next((b for b in _TEXT_BUCKETS if used <= b), self.context_length)
        return tokens[:, : min(length, tokens.shape[1])]

    def _batched(self, fn, out: int | None, *arrays: np.ndarray) -> np.ndarray:
        """Output `out` of fn(params, *batch) over fixed-size batches (None: fn returns one
        array); the last batch is padded with copies of its first row, then cut."""
        n, b = len(arrays[0]), self.batch_size
        outs = []
        for start in range(0, n, b):
            chunk = [a[start : start + b] for a in arrays]
            m = len(chunk[0])
            if m < b:
                chunk = [np.concatenate([c, np.repeat(c[:1], b - m, 0)]) for c in chunk]
            result = self._call(fn, chunk)
            outs.append(np.asarray(result if out is None else result[out])[:m])
        if not outs:
            return np.zeros((0, self.model.config.embed_dim), np.float32)
        return np.concatenate(outs)

    def embed_images(self, images) -> np.ndarray:
        """uint8 [N, H, W, 3] -> [N, E], L2-normalised CLS embeddings."""
        return self._batched(self._image, 0, self._images(images))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[N, E], L2-normalised text embeddings."""
        return self.embed_tokens(self.tokenize(texts))

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids int32 [N, L] -> [N, E], L2-normalised.

        The texts of each batch are packed into rows of the context length (data/packing.py:
        the same numbers, less padding), one group of rows per data-parallel device of this
        process; with several processes the row count is agreed between them, so every process
        runs the same shapes."""
        tokens = np.asarray(tokens, np.int32)
        if not len(tokens):
            return np.zeros((0, self.model.config.embed_dim), np.float32)
        chunks = range(0, len(tokens), self.batch_size)
        return np.concatenate([self._packed_chunk(tokens[s : s + self.batch_size]) for s in chunks])

    def _packed_chunk(self, tokens: np.ndarray) -> np.ndarray:
        """[n <= batch_size, L] -> [n, E]: one packed call. The chunk is padded to batch_size
        texts (copies of its first) and the rows per group rounded up to a multiple of
        _ROW_STEP, to bound compiles."""
        n, length = len(tokens), self.context_length
        if n < self.batch_size:
            tokens = np.concatenate([tokens, np.repeat(tokens[:1], self.batch_size - n, 0)])
        ends = np.argmax(tokens, axis=1) + 1  # argmax pooling reads the first EOT
        texts = [row[:k] for row, k in zip(tokens, ends, strict=True)]
        per = self.batch_size // self._text_groups
        parts = [texts[g * per : (g + 1) * per] for g in range(self._text_groups)]
        rows = max(packing.rows_needed([len(t) for t in p], length) for p in parts)
        if self.mesh is not None and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            rows = int(np.max(multihost_utils.process_allgather(np.int32(rows))))
        rows = -(-rows // _ROW_STEP) * _ROW_STEP
        packed = [packing.pack_texts(p, rows, length) for p in parts]
        arrays = [np.stack([p[i] for p in packed]) for i in range(4)]
        out = self._call(self._text_packed, arrays)
        return np.asarray(out).reshape(self.batch_size, -1)[:n]

    def dense_features(self, images, normalize: bool = True) -> np.ndarray:
        """uint8 [N, H, W, 3] -> [N, h, w, E] projected patch tokens (value-only last block),
        each L2-normalised unless normalize=False (FG-OVD ROI-aligns the raw tokens)."""
        out = self._batched(self._image, 1 if normalize else 2, self._images(images))
        return out.reshape(len(out), self._grid, self._grid, self.model.config.embed_dim)

    def conditioned_embeddings(self, images, texts: list[str]) -> np.ndarray:
        """Text-conditioned pooled image embeddings [N, E] (one text per image), L2-normalised."""
        return self._batched(self._pool, 0, *self._pairs(images, texts))

    def attention(self, images, texts: list[str]) -> np.ndarray:
        """The pooler's attention of each text over its image's patches: [N, heads, P]."""
        return self._batched(self._pool, 1, *self._pairs(images, texts))

    def _pairs(self, images, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images = self._images(images)
        if len(texts) != len(images):
            raise ValueError(f"one text per image: got {len(texts)} texts, {len(images)} images")
        return images, self._trim(self.tokenize(texts))

    def zero_shot_classifier(
        self, class_names, templates="openai80", *, logit_scale: float = 100.0
    ) -> "ZeroShotClassifier":
        """A ZeroShotClassifier over `class_names`: embeds the prompts once, then
        `.classify(images)` as often as needed (see ZeroShotClassifier)."""
        return ZeroShotClassifier(self, class_names, templates, logit_scale=logit_scale)


@dataclasses.dataclass
class ZeroShotPrediction:
    """ZeroShotClassifier.classify's result for N images and C classes: probs [N, C] (softmax
    of logit_scale * cosine), top [N, k] class indices (best first, ties to the lower index)
    and names [N][k], the class names of `top`."""

    probs: np.ndarray
    top: np.ndarray
    names: list[list[str]]


class ZeroShotClassifier:
    """Zero-shot classes: each is the normalised mean of its prompts' text embeddings (the CLIP
    prompt ensemble of evals/zeroshot.class_embeddings, as the zeroshot evaluator scores), built
    once in `weights` [C, E] and reused by every classify call.

    templates: "openai80" (the CLIP paper's 80 ImageNet prompts), "openai7", the path of a
    templates file (one per line) or a list of strings, each with one "{}" for the class name.
    logit_scale multiplies the cosine similarities before the softmax (100 as in CLIP's own
    zero-shot example); it changes the probabilities, never the ranking.
    """

    def __init__(self, encoder, class_names, templates="openai80", *, logit_scale=100.0):
        self.encoder = encoder
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise ValueError("zero-shot classifier: class_names is empty")
        self.templates = resolve_templates(templates)
        self.logit_scale = float(logit_scale)
        self.weights = class_embeddings(
            encoder, self.class_names, self.templates, encoder.batch_size
        )

    def scores(self, images) -> np.ndarray:
        """uint8 [N, H, W, 3] -> [N, C] cosine similarity of each image to each class."""
        return l2_normalize(self.encoder.embed_images(images)) @ self.weights.T

    def classify(self, images, top_k: int = 5) -> ZeroShotPrediction:
        """Class probabilities and the top_k classes of each image (uint8 [N, H, W, 3])."""
        scores = self.scores(images)
        logits = self.logit_scale * scores
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : max(1, top_k)]
        names = [[self.class_names[c] for c in row] for row in top]
        return ZeroShotPrediction(probs.astype(np.float32), top, names)


def float32_model(model: BetaCLIP) -> BetaCLIP:
    """`model` computing in float32 (same parameter tree), for evaluation and inference.

    cuDNN attention only runs in bfloat16, so it falls back to JAX's choice; remat only matters
    for gradients."""
    cfg = model.config
    if cfg.dtype == "float32" and cfg.get("attention", "auto") != "cudnn":
        return model
    items = dict(cfg.items(), dtype="float32")
    if items.get("attention") == "cudnn":
        items["attention"] = "auto"
    return build_model(items)
