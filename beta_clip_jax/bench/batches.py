"""The benchmark's batches: full-length rows (the worst case), ShareGPT4V-like lengths, or a
given batch file; packed as the input pipeline would pack them, with text-token counts.

A batch file (`--batch_file=PATH.npz`) holds `image` uint8 [B, H, W, 3] and `texts` int32
[B, K, L]: slot 0 the caption, slots 1..5 the sentences, the rest the phrases; each row SOT ...
EOT then zeros, an all-zero row an empty slot. It is turned into our batch with the run's
data settings (per-level lengths, packing), so two implementations can be timed on the very
same batch.
"""

from __future__ import annotations

import numpy as np

from beta_clip_jax.data import hierarchy, packing

SOT, EOT = 49406, 49407
# ShareGPT4V-like token counts, SOT and EOT included: a sentence 22-42, its five-sentence caption
# the sentences joined (at most 200), a phrase 5-10 (the released statistics: 4.4 on average,
# 12 at p99.9; 5-10 leans long).
SENTENCE_TOKENS = (22, 42)
CAPTION_MAX_TOKENS = 200
PHRASE_TOKENS = (5, 10)
LENGTHS = ("full", "sharegpt4v")


def _rows(rng, lengths, width: int) -> np.ndarray:
    out = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        if n:
            out[i, :n] = rng.integers(1, SOT, n)
            out[i, 0], out[i, n - 1] = SOT, EOT
    return out


def text_batch(config, batch: int, lengths: str = "full", seed: int = 0) -> dict:
    """Random unpacked batch (docs/CONTRACTS.md): every slot valid; "full" rows fill their
    level's length, "sharegpt4v" rows have ShareGPT4V-like lengths (cut to the level length)."""
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    rng = np.random.default_rng(seed)
    data, size = config.data, int(config.data.get("image_size") or config.model.image_size)
    s, kp = int(data.max_sentences), int(data.max_phrases)
    lc, ls, lp = hierarchy.level_lengths(data).values()
    caps, sents, phrs = [], [], []
    for _ in range(batch):
        if lengths == "full":
            sent, cap, phr = [ls] * s, lc, [lp] * kp
        else:
            sent = rng.integers(SENTENCE_TOKENS[0], SENTENCE_TOKENS[1] + 1, s).tolist()
            cap = min(CAPTION_MAX_TOKENS, sum(n - 2 for n in sent) + max(s - 1, 0) + 2)
            phr = rng.integers(PHRASE_TOKENS[0], PHRASE_TOKENS[1] + 1, kp).tolist()
        caps.append(_rows(rng, [min(cap, lc)], lc)[0])
        sents.append(_rows(rng, [min(n, ls) for n in sent], ls))
        phrs.append(_rows(rng, [min(n, lp) for n in phr], lp))
    return {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "caption": np.stack(caps),
        "sentences": np.stack(sents),
        "phrases": np.stack(phrs),
        "valid": np.ones((batch, 1 + s + kp), bool),
    }


def _fit(rows: np.ndarray, length: int) -> np.ndarray:
    """Rows cut (EOT kept last) or zero-padded to `length`, as our tokenizer would give them."""
    out = np.zeros(rows.shape[:-1] + (length,), np.int32)
    n = np.where(rows.any(-1), np.argmax(rows, axis=-1) + 1, 0)
    for idx in np.ndindex(rows.shape[:-1]):
        k = int(n[idx])
        if k > length:
            out[idx] = rows[idx][:length]
            out[idx][-1] = EOT
        else:
            out[idx][:k] = rows[idx][:k]
    return out


def file_batch(config, path: str) -> dict:
    """The unpacked batch of a batch file with this config's K and per-level lengths."""
    with np.load(path, allow_pickle=False) as f:
        if "image" not in f or "texts" not in f:
            raise ValueError(f"{path}: a batch file holds 'image' and 'texts' (got {f.files})")
        images, texts = np.asarray(f["image"], np.uint8), np.asarray(f["texts"], np.int32)
    if images.ndim != 4 or texts.ndim != 3 or len(images) != len(texts):
        raise ValueError(f"{path}: image {images.shape} and texts {texts.shape} do not match")
    data = config.data
    s, kp = int(data.max_sentences), int(data.max_phrases)
    if texts.shape[1] != 1 + s + kp:
        raise ValueError(
            f"{path}: {texts.shape[1]} text slots per image; the config has 1 + {s} + {kp}"
        )
    lc, ls, lp = hierarchy.level_lengths(data).values()
    return {
        "image": images,
        "caption": _fit(texts[:, 0], lc),
        "sentences": _fit(texts[:, 1 : 1 + s], ls),
        "phrases": _fit(texts[:, 1 + s :], lp),
        "valid": texts.any(axis=-1),
    }


def token_counts(unpacked: dict, batch: dict) -> dict:
    """Text tokens per image: real (SOT to EOT of every valid text) and computed by the tower
    for `batch` (the unpacked padding, or the packed rows)."""
    _, lengths = packing.slot_tokens(unpacked)
    images = len(unpacked["valid"])
    if "text_tokens" in batch:
        computed = batch["text_tokens"].size
    else:
        computed = sum(batch[k].size for k in packing.TEXT_KEYS)
    real = float(lengths.sum()) / images
    return {
        "real_per_image": real,
        "computed_per_image": computed / images,
        "computed_over_real": computed / images / real,
    }


def step_batch(config, unpacked: dict, micro_batches: int = 1) -> dict:
    """The batch the step sees: `unpacked`, or its packed form when config.data.pack_texts.
    Packing takes data.pack_budget, else exactly the rows this batch's fullest group needs."""
    data = config.data
    if not data.get("pack_texts"):
        return unpacked
    group, row = int(data.pack_group), packing.pack_length(data)
    if data.get("pack_budget"):
        rows = packing.rows_for_budget(int(data.pack_budget), group=group, row_length=row)
    else:
        _, lengths = packing.slot_tokens(unpacked)
        groups = packing.group_images(len(lengths), group, micro_batches)
        rows = max(
            packing.rows_needed([int(n) for n in lengths[g].ravel() if n], row) for g in groups
        )
    return packing.pack_batch(
        unpacked, row_length=row, rows_per_group=rows, group=group, micro_batches=micro_batches
    )
