"""Scoring rules shared by the evaluators: retrieval recall@K, FG-OVD accuracy, top-k accuracy.

All functions take plain NumPy similarity matrices so they can be checked by hand. Percentages are
returned (0-100), matching how the reference papers report them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Rows of the similarity matrix scored at a time; bounds memory for COCO-sized (5k x 25k) matrices.
_CHUNK = 1024


def _ranks_of_best_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of each row's best-scoring target column.

    rank = number of columns that beat it: a strictly higher score, or an equal score at a lower
    column index (the order a stable descending sort gives). Non-target columns only can beat the
    best target, so "any target in the top K" is exactly rank < K.
    """
    masked = np.where(target, scores, -np.inf)
    best_col = np.argmax(masked, axis=1)
    best = masked[np.arange(len(scores)), best_col]
    cols = np.arange(scores.shape[1])[None, :]
    beats = (scores > best[:, None]) | ((scores == best[:, None]) & (cols < best_col[:, None]))
    return np.sum(beats & ~target, axis=1)


def retrieval_ranks(sim: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks for both directions from `sim` [num_images, num_texts].

    text_to_image[j] is the image index of caption j; an image may own several captions
    (COCO/Flickr: 5). Returns (i2t_ranks [num_images], t2i_ranks [num_texts]), 0-based; an image's
    i2t rank is that of its best-ranked own caption.
    """
    sim = np.asarray(sim)
    sim = sim.astype(
        np.result_type(sim.dtype, np.float32), copy=False
    )  # keep f32: COCO is 5k x 25k
    t2i = np.asarray(text_to_image, np.int64)
    num_images, num_texts = sim.shape
    if t2i.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {t2i.shape}, expected ({num_texts},)")
    if num_texts and (t2i.min() < 0 or t2i.max() >= num_images):
        raise ValueError(f"text_to_image values must lie in [0, {num_images})")
    owns = np.zeros((num_images,), np.int64)
    np.add.at(owns, t2i, 1)
    if np.any(owns == 0):
        missing = np.flatnonzero(owns == 0)[:5].tolist()
        raise ValueError(f"images without any caption, e.g. {missing}")
    image_ids = np.arange(num_images)
    i2t = np.concatenate(
        [
            _ranks_of_best_target(
                sim[s : s + _CHUNK], t2i[None, :] == image_ids[s : s + _CHUNK, None]
            )
            for s in range(0, num_images, _CHUNK)
        ]
        or [np.zeros((0,), np.int64)]
    )
    sim_t = sim.T
    t2i_ranks = np.concatenate(
        [
            _ranks_of_best_target(
                sim_t[s : s + _CHUNK], image_ids[None, :] == t2i[s : s + _CHUNK, None]
            )
            for s in range(0, num_texts, _CHUNK)
        ]
        or [np.zeros((0,), np.int64)]
    )
    return i2t, t2i_ranks


def retrieval_recall(
    sim: np.ndarray,
    text_to_image: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@K in % for both directions: keys t2i_r{k} and i2t_r{k}.

    sim is [num_images, num_texts]; text_to_image defaults to the 1:1 pairing (text j <-> image j).
    I2T counts a hit when any of the image's captions is in the top K; T2I when the caption's one
    image is (the COCO/Flickr 5-caption protocol of Long-CLIP/FineLIP/FG-CLIP).
    """
    sim = np.asarray(sim)
    if text_to_image is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"non-square sim {sim.shape} needs text_to_image")
        text_to_image = np.arange(sim.shape[0])
    i2t, t2i = retrieval_ranks(sim, text_to_image)
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float(np.mean(t2i < k))
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float(np.mean(i2t < k))
    return out


def fgovd_hits(scores: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-item hit for FG-OVD-style scoring; scores [N, 1 + max_negatives], column 0 the positive.

    A hit is positive >= every valid negative: ties count as hits, as in FG-CLIP's reference
    scorer (so items whose negatives repeat the positive verbatim are free hits there too).
    valid masks padded negative columns when items have different numbers of negatives.
    """
    scores = np.asarray(scores, np.float64)
    if valid is None:
        valid = np.ones(scores.shape, bool)
    negs = np.where(np.asarray(valid, bool)[:, 1:], scores[:, 1:], -np.inf)
    return scores[:, 0] >= negs.max(axis=1, initial=-np.inf)


def fgovd_accuracy(scores: np.ndarray, valid: np.ndarray | None = None) -> float:
    """FG-OVD accuracy in %: the mean of fgovd_hits (0 for an empty set)."""
    hits = fgovd_hits(scores, valid)
    return 100.0 * float(np.mean(hits)) if hits.size else 0.0


def topk_accuracy(
    logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in %, keys top{k}; ties are broken towards the lower class index."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    true = logits[np.arange(len(labels)), labels]
    cols = np.arange(logits.shape[1])[None, :]
    rank = np.sum(
        (logits > true[:, None]) | ((logits == true[:, None]) & (cols < labels[:, None])), axis=1
    )
    return {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in ks}


# ---- intra-modal retrieval (image->image, text->text) -------------------------------------


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_metrics(query, query_labels, gallery, gallery_labels, *, same_set=False, chunk=256):
    """Cosine retrieval, relevant = same label -> percent {map, map_at_r, p_at_r, r1}.

    `same_set`: the query set is the gallery (query i is gallery item i) and each query is
    removed from its own gallery. AP averages precision at each relevant rank over all R
    relevant items; mAP@R and P@R look at the top R ranks only. Queries with no relevant item
    are skipped. Ties rank in gallery order.
    """
    q, g = _unit(query), _unit(gallery)
    q_lab, g_lab = np.asarray(query_labels), np.asarray(gallery_labels)
    if same_set and len(q) != len(g):
        raise ValueError("same_set needs the queries to be the gallery")
    ranks = np.arange(1, len(g) + 1)
    sums = {"map": 0.0, "map_at_r": 0.0, "p_at_r": 0.0, "r1": 0.0}
    counted = 0
    for start in range(0, len(q), chunk):
        sim = q[start : start + chunk] @ g.T
        rel = q_lab[start : start + chunk, None] == g_lab[None, :]
        if same_set:
            rows = np.arange(sim.shape[0])
            sim[rows, start + rows] = -np.inf  # ranks last and is not relevant
            rel[rows, start + rows] = False
        order = np.argsort(-sim, axis=1, kind="stable")
        hits = np.take_along_axis(rel, order, axis=1)
        n_rel = hits.sum(1)
        keep = n_rel > 0
        hits, n_rel = hits[keep], n_rel[keep]
        prec = np.cumsum(hits, axis=1) / ranks
        in_top_r = ranks[None, :] <= n_rel[:, None]
        sums["map"] += float(((prec * hits).sum(1) / n_rel).sum())
        sums["map_at_r"] += float(((prec * hits * in_top_r).sum(1) / n_rel).sum())
        sums["p_at_r"] += float(((hits * in_top_r).sum(1) / n_rel).sum())
        sums["r1"] += float(hits[:, 0].sum())
        counted += int(keep.sum())
    return {k: 100.0 * v / max(counted, 1) for k, v in sums.items()}


def image_to_image(embeddings, labels, gallery=None, gallery_labels=None, **kwargs):
    """Image->image retrieval by class; without a gallery, each image queries all the others."""
    if gallery is None:
        return retrieval_metrics(embeddings, labels, embeddings, labels, same_set=True, **kwargs)
    return retrieval_metrics(embeddings, labels, gallery, gallery_labels, **kwargs)


def text_to_text(embeddings, image_ids, **kwargs):
    """Text->text retrieval: each image's first caption queries the remaining captions.

    Relevant = the other captions of the same image (the official protocol for Flickr30k,
    COCO and nocaps). `image_ids` `[N]` gives each caption's image.
    """
    image_ids = np.asarray(image_ids)
    first = np.zeros(len(image_ids), bool)
    first[np.unique(image_ids, return_index=True)[1]] = True
    emb = np.asarray(embeddings)
    return retrieval_metrics(emb[first], image_ids[first], emb[~first], image_ids[~first], **kwargs)
