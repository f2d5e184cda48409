"""Fake encoders with known embeddings (shared by the evals tests) and tiny image helpers.

IdFake: an image's id is encoded in its red channel (8 * id + 4) and a text's id is the last
integer in it; embeddings come from fixed random tables, text = image + noise, so retrieval is
imperfect but predictable. ColourFake: the dense grid is the image's block-averaged RGB, and a
text embeds as counts of the words red / green / blue, so box scores can be worked out by hand.
"""

import re

import numpy as np
from PIL import Image


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def id_image(i, size=(12, 10)):
    """A solid uint8 image (w x h) carrying id i."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0] = 8 * i + 4
    arr[..., 1] = 100
    return arr


def save_png(arr, path):
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


class IdFake:
    """Embeddings looked up by id; conditioned = normalise(image + 0.5 * text)."""

    image_size = 8

    def __init__(self, num_ids=32, dim=16, noise=0.9, seed=0):
        rng = np.random.default_rng(seed)
        self.image_table = _unit(rng.normal(size=(num_ids, dim)))
        self.text_table = _unit(self.image_table + noise * rng.normal(size=(num_ids, dim)))
        self.calls = []

    def image_ids(self, images):
        images = np.asarray(images)
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3), images.shape
        return np.round((images[..., 0].mean(axis=(1, 2)) - 4) / 8).astype(int)

    def text_ids(self, texts):
        return np.array([int(re.findall(r"\d+", t)[-1]) for t in texts])

    def embed_images(self, images):
        self.calls.append(("images", len(images)))
        return self.image_table[self.image_ids(images)]

    def embed_texts(self, texts):
        self.calls.append(("texts", len(texts)))
        return self.text_table[self.text_ids(texts)]

    def conditioned_embeddings(self, images, texts):
        assert len(images) == len(texts)
        return _unit(self.embed_images(images) + 0.5 * self.embed_texts(texts))

    def dense_features(self, images, normalize=True):
        emb = self.embed_images(images)
        return np.broadcast_to(emb[:, None, None, :], (len(emb), 2, 2, emb.shape[1])).copy()


COLOURS = ("red", "green", "blue")


class ColourFake:
    """RGB-valued embeddings; dense grid 4x4 from a 16x16 input."""

    image_size = 16

    def embed_images(self, images):
        return _unit(np.asarray(images, np.float32).mean(axis=(1, 2)) / 255.0)

    def embed_texts(self, texts):
        counts = [[t.split().count(c) for c in COLOURS] for t in texts]
        return _unit(np.asarray(counts, np.float32))

    def conditioned_embeddings(self, images, texts):
        return _unit(self.embed_images(images) + self.embed_texts(texts))

    def dense_features(self, images, normalize=True):
        x = np.asarray(images, np.float32) / 255.0
        n = len(x)
        return x.reshape(n, 4, 4, 4, 4, 3).mean(axis=(2, 4))


RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def quadrant_image(tl, tr, bl, br, width=40, height=20):
    """A uint8 image whose four quadrants have the named colours."""
    arr = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2], arr[:h2, w2:] = RGB[tl], RGB[tr]
    arr[h2:, :w2], arr[h2:, w2:] = RGB[bl], RGB[br]
    return arr


def test_fakes_round_trip():
    fake = IdFake()
    images = np.stack([id_image(i, (8, 8)) for i in (3, 0, 7)])
    assert fake.image_ids(images).tolist() == [3, 0, 7]
    assert fake.text_ids(["caption 3", "a 10 b 12"]).tolist() == [3, 12]
    grid = ColourFake().dense_features(
        np.stack([quadrant_image("red", "blue", "green", "red", 16, 16)])
    )
    assert np.allclose(grid[0, 0, 0], [1, 0, 0]) and np.allclose(grid[0, 3, 0], [0, 1, 0])
