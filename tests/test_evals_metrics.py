"""Retrieval / FG-OVD / top-k metrics on hand-computed cases, and ROI-align against an independent
scalar NumPy implementation written here from torchvision's documented convention."""

import math

import numpy as np
import pytest

from beta_clip_jax.evals import metrics
from beta_clip_jax.evals.roi_align import box_features, roi_align


def test_identity_gives_perfect_recall():
    out = metrics.retrieval_recall(np.eye(12))
    assert out == {f"{d}_r{k}": 100.0 for d in ("t2i", "i2t") for k in (1, 5, 10)}


def test_hand_computed_ranks_one_to_one():
    sim = np.array(
        [
            [0.9, 0.8, 0.1, 0.0],
            [0.95, 0.7, 0.25, 0.2],
            [0.1, 0.2, 0.3, 0.4],
            [0.0, 0.0, 0.5, 0.6],
        ]
    )
    i2t, t2i = metrics.retrieval_ranks(sim, np.arange(4))
    assert i2t.tolist() == [0, 1, 1, 0]
    assert t2i.tolist() == [1, 1, 1, 0]
    out = metrics.retrieval_recall(sim, ks=(1, 2))
    assert out == {"t2i_r1": 25.0, "t2i_r2": 100.0, "i2t_r1": 50.0, "i2t_r2": 100.0}


def test_reversed_order_ranks():
    # Every image prefers higher-index texts and every text prefers lower-index images, so image
    # i's own text ranks n-1-i and text j's own image ranks j.
    n = 12
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    sim = j + 0.001 * (n - i)
    i2t, t2i = metrics.retrieval_ranks(sim, np.arange(n))
    assert i2t.tolist() == list(range(n - 1, -1, -1))
    assert t2i.tolist() == list(range(n))
    out = metrics.retrieval_recall(sim)
    for d in ("t2i", "i2t"):
        assert out[f"{d}_r1"] == pytest.approx(100 / 12)
        assert out[f"{d}_r5"] == pytest.approx(500 / 12)
        assert out[f"{d}_r10"] == pytest.approx(1000 / 12)


def test_multi_caption_hand_case():
    sim = np.array([[0.1, 0.9, 0.8, 0.2], [0.7, 0.4, 0.5, 0.6]])
    owners = np.array([0, 0, 1, 1])
    i2t, t2i = metrics.retrieval_ranks(sim, owners)
    assert i2t.tolist() == [0, 1]
    assert t2i.tolist() == [1, 0, 1, 0]
    out = metrics.retrieval_recall(sim, owners, ks=(1, 2))
    assert out == {"t2i_r1": 50.0, "t2i_r2": 100.0, "i2t_r1": 50.0, "i2t_r2": 100.0}


def _brute_rank(scores, targets):
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    return min(order.index(t) for t in targets)


def test_multi_caption_matches_brute_force_and_is_permutation_invariant():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(9, 45))
    owners = np.repeat(np.arange(9), 5)
    i2t, t2i = metrics.retrieval_ranks(sim, owners)
    assert i2t.tolist() == [_brute_rank(sim[i], np.flatnonzero(owners == i)) for i in range(9)]
    assert t2i.tolist() == [_brute_rank(sim[:, j], [owners[j]]) for j in range(45)]
    # Shuffling the caption order (with its ownership) and the image order changes nothing.
    pt, pi = rng.permutation(45), rng.permutation(9)
    inv_pi = np.argsort(pi)
    out = metrics.retrieval_recall(sim[pi][:, pt], inv_pi[owners[pt]])
    assert out == metrics.retrieval_recall(sim, owners)


def test_retrieval_rejects_bad_pairings():
    with pytest.raises(ValueError, match="without any caption"):
        metrics.retrieval_recall(np.eye(3), np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="non-square"):
        metrics.retrieval_recall(np.ones((2, 3)))


def test_fgovd_ties_count_and_padding_is_ignored():
    scores = np.array([[0.5, 0.4, 0.5], [0.3, 0.4, 0.0], [0.2, 0.1, 0.9]])
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0]], bool)
    assert metrics.fgovd_hits(scores, valid).tolist() == [True, False, True]
    assert metrics.fgovd_accuracy(scores, valid) == pytest.approx(200 / 3)


def test_topk_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.2, 0.1]])
    out = metrics.topk_accuracy(logits, np.array([1, 2, 1]), ks=(1, 2))
    # row 2: label 1 ties with class 0, which wins the tie (lower index) -> rank 1.
    assert out == {"top1": pytest.approx(100 / 3), "top2": 100.0}


# ---- ROI-align: an independent scalar implementation of the torchvision convention ----


def _sample(feat, y, x):
    height, width = feat.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feat.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * feat[y0, x0]
        + hy * lx * feat[y0, x1]
        + ly * hx * feat[y1, x0]
        + ly * lx * feat[y1, x1]
    )


def _reference_roi_align(feat, box, out_h, out_w, scale, ratio, aligned):
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - off for v in box)
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / out_h, rw / out_w
    gh = ratio if ratio > 0 else math.ceil(rh / out_h)
    gw = ratio if ratio > 0 else math.ceil(rw / out_w)
    count = max(gh * gw, 1)
    out = np.zeros((out_h, out_w, feat.shape[2]))
    for ph in range(out_h):
        for pw in range(out_w):
            acc = np.zeros(feat.shape[2])
            for iy in range(gh):
                y = y1 + ph * bh + (iy + 0.5) * bh / gh
                for ix in range(gw):
                    x = x1 + pw * bw + (ix + 0.5) * bw / gw
                    acc += _sample(feat, y, x)
            out[ph, pw] = acc / count
    return out


@pytest.mark.parametrize(
    "out_size,scale,ratio,aligned",
    [
        ((1, 1), 1.0, -1, True),
        ((2, 3), 1.0, -1, True),
        ((3, 2), 0.5, 2, True),
        ((2, 2), 1.0, -1, False),
    ],
)
def test_roi_align_matches_reference(out_size, scale, ratio, aligned):
    rng = np.random.default_rng(1)
    feat = rng.normal(size=(7, 9, 3))
    h, w = 7 / scale, 9 / scale
    boxes = []
    for _ in range(25):
        x1, x2 = np.sort(rng.uniform(-0.3 * w, 1.3 * w, 2))  # some boxes partly outside
        y1, y2 = np.sort(rng.uniform(-0.3 * h, 1.3 * h, 2))
        boxes.append((x1, y1, x2, y2))
    boxes += [
        (0, 0, w, h),
        (2.0, 3.0, 2.0, 3.0),
        (-5, -5, -1, -1),
        (w - 0.2, h - 0.2, w + 3, h + 3),
    ]
    got = roi_align(feat, np.array(boxes), out_size, scale, ratio, aligned)
    for b, box in enumerate(boxes):
        ref = _reference_roi_align(feat, box, *out_size, scale, ratio, aligned)
        np.testing.assert_allclose(got[b], ref, rtol=1e-10, atol=1e-12)


def test_box_features_whole_image_box_on_333_pixels():
    """A box over a whole 500 x 333 image is x / W * 14 = 14 on both axes, as the reference
    computes it; 333 * (14 / 333) is 14.000000000000002 in float64, which ceil() would turn into
    15 sample rows. With 14 x 14 aligned samples at the cell centres, the box vector is the mean
    of all cells."""
    grid = np.random.default_rng(3).normal(size=(14, 14, 6)).astype(np.float32)
    vec = box_features(grid, np.array([[0.0, 0.0, 500.0, 333.0]]), (333, 500))[0]
    mean = grid.reshape(-1, 6).mean(0)
    np.testing.assert_allclose(vec, mean / np.linalg.norm(mean), atol=1e-6)


def test_box_features_scales_boxes_per_axis():
    # 4x4 grid: columns 0-1 carry e0, columns 2-3 e1 in rows 0-1, and e2 in rows 2-3.
    grid = np.zeros((4, 4, 3))
    grid[:, :2, 0] = 1.0
    grid[:2, 2:, 1] = 1.0
    grid[2:, 2:, 2] = 1.0
    boxes = np.array([[0, 0, 20, 20], [20, 0, 20, 10], [20, 10, 20, 10]])  # image 40 wide, 20 high
    vecs = box_features(grid, boxes, (20, 40))
    np.testing.assert_allclose(vecs, np.eye(3), atol=1e-6)
