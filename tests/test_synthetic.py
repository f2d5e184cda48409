"""Synthetic scenes: determinism, texts/boxes agree with the pixels, negatives are what they say."""

import pickle
import time

import numpy as np
import pytest

from beta_clip_jax.data import synthetic as S

NUM_CHANGED = {"hard": 1, "medium": 2, "easy": 3, "binding": 1}


def parse(text):
    """'a large red circle' -> ('large', 'red', 'circle')."""
    article, size, color, shape = text.split()
    assert article == "a" and size in S.SIZES and color in S.COLORS and shape in S.SHAPES
    return size, color, shape


@pytest.fixture(scope="module")
def records():
    ds = S.SyntheticScenes(24, image_size=64, seed=3, split="eval")
    return [ds[i] for i in range(len(ds))]


def test_deterministic_and_picklable():
    ds = S.SyntheticScenes(5, image_size=48, seed=7)
    clone = pickle.loads(pickle.dumps(ds))
    for i in range(5):
        a, b = ds[i], clone[np.int64(i)]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["caption"] == b["caption"] and a["negatives"] == b["negatives"]
        assert a["caption_negatives"] == b["caption_negatives"]
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
    other_seed = S.SyntheticScenes(5, image_size=48, seed=8)
    other_split = S.SyntheticScenes(5, image_size=48, seed=7, split="eval")
    assert [ds[i]["caption"] for i in range(5)] != [other_seed[i]["caption"] for i in range(5)]
    assert [ds[i]["caption"] for i in range(5)] != [other_split[i]["caption"] for i in range(5)]
    with pytest.raises(IndexError):
        ds[5]


@pytest.mark.parametrize("size", [32, 224])
def test_sizes(size):
    rec = S.SyntheticScenes(2, image_size=size, min_objects=3, max_objects=3)[1]
    assert rec["image"].shape == (size, size, 3) and rec["image"].dtype == np.uint8
    assert rec["boxes"].shape == (3, 4) and rec["boxes"].dtype == np.float32
    assert (rec["boxes"][:, :2] >= 0).all() and (
        rec["boxes"][:, :2] + rec["boxes"][:, 2:] <= size
    ).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        S.SyntheticScenes(1, split="valid")
    with pytest.raises(ValueError):
        S.SyntheticScenes(1, min_objects=1)
    with pytest.raises(ValueError):
        S.SyntheticScenes(1, max_objects=6)


def test_texts_agree_with_scene(records):
    for rec in records:
        n = len(rec["box_texts"])
        assert 2 <= n <= 4 and rec["boxes"].shape == (n, 4) and len(rec["sentences"]) == n
        assert rec["caption"] == ". ".join(rec["sentences"])
        assert len(rec["phrases"]) == 4 * n and len(set(rec["phrases"])) == 4 * n
        attrs = [parse(t) for t in rec["box_texts"]]
        assert len({a[1] for a in attrs}) == n and len({a[2] for a in attrs}) == n
        for (size, color, shape), sentence, box in zip(
            attrs, rec["sentences"], rec["boxes"], strict=True
        ):
            assert f"a {size} {color} {shape}" in sentence
            x, y, w, h = box
            cx, cy = x + w / 2, y + h / 2
            cell = 64 / 3
            position = S.POSITIONS[int(cy // cell) * 3 + int(cx // cell)]
            assert S.POSITION_PHRASES[position] in sentence
            assert f"{shape} {S.POSITION_PHRASES[position]}" in rec["phrases"]
            # large objects are about twice as big as small ones
            assert (w > 12) == (size == "large")


def test_pixels_match_named_colours(records):
    for rec in records:
        img = rec["image"].astype(int)
        claimed = np.zeros(img.shape[:2], bool)
        for text, (x, y, w, h) in zip(rec["box_texts"], rec["boxes"], strict=True):
            _, color, _ = parse(text)
            match = (img == S.COLORS[color]).all(-1)
            assert match[int(y + h / 2), int(x + w / 2)], text  # every shape covers its centre
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            x1, y1 = int(np.ceil(x + w)) + 1, int(np.ceil(y + h)) + 1
            inside = match[y0:y1, x0:x1]
            assert inside.mean() > 0.25, (text, inside.mean())
            # no pixel of this colour outside its own box
            assert match.sum() == inside.sum(), text
            claimed[y0:y1, x0:x1] = True
        # background pixels are never one of the object colours
        palette = np.array(list(S.COLORS.values()))
        any_color = (img[~claimed][:, None, :] == palette[None]).all(-1).any()
        assert not any_color


def test_box_negatives(records):
    for rec in records:
        attrs = [parse(t) for t in rec["box_texts"]]
        assert set(rec["negatives"]) == set(S.DIFFICULTIES)
        for difficulty, per_box in rec["negatives"].items():
            assert len(per_box) == len(attrs)
            for b, negs in enumerate(per_box):
                assert len(negs) == 5
                true = attrs[b]
                others = [a for k, a in enumerate(attrs) if k != b]
                for neg in negs:
                    fake = parse(neg)
                    changed = [k for k in range(3) if fake[k] != true[k]]
                    assert len(changed) == NUM_CHANGED[difficulty], (difficulty, neg)
                    assert neg != rec["box_texts"][b]
                    if difficulty == "binding":  # the new value belongs to another object
                        assert fake[changed[0]] in {o[changed[0]] for o in others}
                        continue
                    for k in changed:
                        if k > 0:  # colour and shape: a value absent from the scene
                            assert fake[k] not in {a[k] for a in attrs}
                    assert fake not in attrs  # never another object's description


def test_caption_negatives(records):
    for rec in records:
        negs = rec["caption_negatives"]
        assert len(negs) == len(S.CAPTION_NEGATIVE_KINDS)
        for kind, neg in zip(S.CAPTION_NEGATIVE_KINDS, negs, strict=True):
            assert neg != rec["caption"]
            parts = neg.split(". ")
            assert len(parts) == len(rec["sentences"])
            diff = sum(p != s for p, s in zip(parts, rec["sentences"], strict=True))
            assert diff == (2 if kind.startswith("swap") else 1), kind


def test_speed_report():
    ds = S.SyntheticScenes(100, image_size=64)
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    rate = len(ds) / (time.perf_counter() - start)
    print(f"synthetic scenes at 64 px: {rate:.0f} images/s")
