"""Text packing: the texts of a batch concatenated into fixed-length rows, so the text tower
computes real tokens instead of padding.

An unpacked batch carries each text level padded to its own length (caption [B, Lc], sentences
[B, S, Ls], phrases [B, Kp, Lp]). `pack_batch` turns it into

    text_tokens    int32 [G, Rg, R]   G = B / pack_group groups of Rg rows of R tokens
    text_segments  int32 [G, Rg, R]   1, 2, ... per text within its row; 0 = padding
    text_positions int32 [G, Rg, R]   0, 1, ... within each text (positions restart per text)
    text_eot       int32 [G, g, K]    each slot's pooling position, flat in its group's Rg * R
                                      tokens (0 for an empty slot; `valid` masks it)

A text attends only to its own earlier tokens (block-diagonal causal attention) and is read at
its argmax id, the first EOT, exactly where the unpacked tower reads it, so packing changes no
number. Shapes are static: Rg rows per group is the budget. A group whose texts do not fit drops
phrases, the lowest-priority texts (the last phrase of the image with the most), each counted in
`_counts` as pack_dropped_phrases; never silently.

Grouping follows gradient accumulation. The step splits a batch into n micro-batches by
striding, images j::n (and groups j::n); within a micro-batch, group q must hold its images
q*g ... q*g + g - 1, so that the text tower's [groups, g, K] output reshapes to [images, K]
without moving data between devices. Group c therefore holds the images
(c mod n) + n * ((c div n) * g + t), t < g.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from beta_clip_jax.data import hierarchy

TEXT_KEYS = ("caption", "sentences", "phrases")
PACKED_KEYS = ("text_tokens", "text_segments", "text_positions", "text_eot")
DROP_COUNTER = "pack_dropped_phrases"


def group_images(batch_size: int, group: int, micro_batches: int = 1) -> np.ndarray:
    """int [G, group]: the images of each packed group (see the module docstring)."""
    if group <= 0 or batch_size % (group * micro_batches):
        raise ValueError(
            f"batch of {batch_size} images cannot be cut into packing groups of data.pack_group "
            f"{group} in each of {micro_batches} micro-batches; make the batch per process a "
            f"multiple of {group * micro_batches}"
        )
    c = np.arange(batch_size // group)[:, None]
    t = np.arange(group)[None, :]
    return (c % micro_batches) + micro_batches * ((c // micro_batches) * group + t)


def slot_tokens(batch: dict) -> tuple[list[np.ndarray], np.ndarray]:
    """([B x K arrays of token rows]..., lengths [B, K]) of an unpacked batch: every slot's ids up
    to and including its argmax id (the first EOT), 0 for an empty slot."""
    cap = batch["caption"][:, None]
    levels = [cap, batch["sentences"], batch["phrases"]]
    lengths = np.concatenate(
        [np.where(x.any(axis=-1), np.argmax(x, axis=-1) + 1, 0) for x in levels], axis=1
    )
    return levels, lengths * batch["valid"]


def _slot_row(levels: list[np.ndarray], b: int, k: int) -> np.ndarray:
    for level in levels:
        if k < level.shape[1]:
            return level[b, k]
        k -= level.shape[1]
    raise IndexError(k)


def first_fit(lengths: list[int], rows: int, row_length: int) -> list[tuple[int, int]] | None:
    """(row, offset) per text by first-fit decreasing, or None when they do not fit."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free = [row_length] * rows
    out: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        n = lengths[i]
        for r in range(rows):
            if free[r] >= n:
                out[i] = (r, row_length - free[r])
                free[r] -= n
                break
        else:
            return None
    return out


def rows_needed(lengths: list[int], row_length: int) -> int:
    """Fewest rows first-fit decreasing packs these text lengths into."""
    rows = max(1, math.ceil(sum(lengths) / row_length))
    while first_fit(lengths, rows, row_length) is None:
        rows += 1
    return rows


def _drop_one_phrase(lengths: np.ndarray, images: np.ndarray, first_phrase: int) -> int | None:
    """Zeroes the last phrase of the group's image with the most phrases; its batch index."""
    phrases = (lengths[images, first_phrase:] > 0).sum(axis=1)
    if not phrases.any():
        return None
    t = int(np.flatnonzero(phrases == phrases.max())[-1])
    b = int(images[t])
    k = first_phrase + int(np.flatnonzero(lengths[b, first_phrase:])[-1])
    lengths[b, k] = 0
    return b


def pack_texts(texts: list[np.ndarray], rows: int, row_length: int):
    """(tokens, segments, positions [rows, row_length], ends [T]) for texts (each its ids up to
    its EOT), each text's last token at flat index ends[i]; None when they do not fit."""
    placed = first_fit([len(t) for t in texts], rows, row_length)
    if placed is None:
        return None
    tokens, segments, positions = (np.zeros((rows, row_length), np.int32) for _ in range(3))
    ends = np.zeros(len(texts), np.int32)
    segment = np.zeros(rows, np.int32)
    for i, (text, (r, off)) in enumerate(zip(texts, placed, strict=True)):
        n = len(text)
        segment[r] += 1
        tokens[r, off : off + n] = text
        segments[r, off : off + n] = segment[r]
        positions[r, off : off + n] = np.arange(n)
        ends[i] = r * row_length + off + n - 1
    return tokens, segments, positions, ends


def pack_batch(
    batch: dict,
    *,
    row_length: int,
    rows_per_group: int,
    group: int,
    micro_batches: int = 1,
    drop_counter: int | None = None,
) -> dict:
    """The packed form of an unpacked batch (numpy; other keys pass through, `valid` loses the
    dropped phrases, `_counts[:, drop_counter]` counts them when given)."""
    levels, lengths = slot_tokens(batch)
    if lengths.max(initial=0) > row_length:
        raise ValueError(
            f"a text of {lengths.max()} tokens does not fit data.pack_length {row_length}"
        )
    size, k = lengths.shape
    first_phrase = 1 + batch["sentences"].shape[1]
    groups = group_images(size, group, micro_batches)
    shape = (len(groups), rows_per_group, row_length)
    tokens, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
    eot = np.zeros((len(groups), group, k), np.int32)
    counts = np.array(batch["_counts"]) if drop_counter is not None else None
    for c, images in enumerate(groups):
        while True:
            slots = [(t, j) for t, b in enumerate(images) for j in np.flatnonzero(lengths[b])]
            texts = [_slot_row(levels, images[t], j)[: lengths[images[t], j]] for t, j in slots]
            packed = pack_texts(texts, rows_per_group, row_length)
            if packed is not None:
                break
            b = _drop_one_phrase(lengths, images, first_phrase)
            if b is None:
                raise ValueError(
                    f"the captions and sentences of {group} images need more than "
                    f"{rows_per_group} rows of {row_length} tokens; raise data.pack_budget"
                )
            if counts is not None:
                counts[b, drop_counter] += 1
        tokens[c], segments[c], positions[c], ends = packed
        for (t, j), end in zip(slots, ends, strict=True):
            eot[c, t, j] = end
    out = {key: v for key, v in batch.items() if key not in TEXT_KEYS}
    out.update(text_tokens=tokens, text_segments=segments, text_positions=positions)
    out.update(text_eot=eot, valid=np.asarray(batch["valid"], bool) & (lengths > 0))
    if counts is not None:
        out["_counts"] = counts
    return out


def budget_rows(
    image_lengths: list[list[int]],
    *,
    group: int,
    row_length: int,
    samples: int = 256,
    seed: int = 0,
) -> int:
    """Rows per group for packing: the most any of `samples` random groups of `group` images
    (drawn from `image_lengths`, each image's text lengths) needs. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    most = 1
    for _ in range(samples):
        picks = rng.integers(len(image_lengths), size=group)
        most = max(most, rows_needed([n for i in picks for n in image_lengths[i]], row_length))
    return most


def rows_for_budget(tokens_per_image: int, *, group: int, row_length: int) -> int:
    """Rows per group for a budget given in tokens per image (data.pack_budget)."""
    return max(1, math.ceil(tokens_per_image * group / row_length))


class Packer:
    """grain map function: an unpacked batch -> its packed form (data/packing.py)."""

    def __init__(self, data_cfg, *, rows_per_group: int, micro_batches: int, drop_counter: int):
        self.drop_counter = int(drop_counter)
        self.row_length = pack_length(data_cfg)
        self.group = int(data_cfg.pack_group)
        self.rows_per_group = int(rows_per_group)
        self.micro_batches = int(micro_batches)

    def __call__(self, batch: dict) -> dict:
        return pack_batch(
            batch,
            row_length=self.row_length,
            rows_per_group=self.rows_per_group,
            group=self.group,
            micro_batches=self.micro_batches,
            drop_counter=self.drop_counter,
        )


def pack_length(data_cfg) -> int:
    """Tokens per packed row: data.pack_length, else the longest level (the caption's)."""
    return int(data_cfg.get("pack_length") or max(hierarchy.level_lengths(data_cfg).values()))


def pack_rows_per_group(data_cfg, processor, num_records: int, seed: int, samples: int = 256):
    """Packed rows per group of data.pack_group images: from data.pack_budget (tokens per
    image), else measured on `samples` records drawn from the whole source (the same records
    on every process, so every process gets the same shapes)."""
    group, row_length = int(data_cfg.pack_group), pack_length(data_cfg)
    if data_cfg.get("pack_budget"):
        return rows_for_budget(int(data_cfg.pack_budget), group=group, row_length=row_length)
    rng = np.random.default_rng([seed, 0xB0D6E7])
    picks = rng.choice(num_records, size=min(samples, num_records), replace=False)
    lengths = [processor.text_lengths(int(i), np.random.default_rng([seed, int(i)])) for i in picks]
    lengths = [n for n in lengths if n]
    if not lengths:
        raise ValueError(f"none of {len(picks)} sampled records is usable to size the packing")
    rows = budget_rows(lengths, group=group, row_length=row_length, seed=seed)
    logging.info(
        "packing: %d rows of %d tokens per group of %d images (measured on %d records; "
        "set data.pack_budget to fix it)", rows, row_length, group, len(lengths)
    )  # fmt: skip
    return rows
