"""FG-OVD encodes each distinct image once per run and pools all its boxes from that one grid.

A fake FG-OVD set (several boxes per image, the same images in all four files) is scored with a
fake encoder whose dense grid depends on every pixel and position; the reference is the earlier
per-box computation written here: a fresh grid per box (PIL decode and bicubic squash, the fake's
dense_features, box_features), so it shares nothing with the grouping code. Also: the threaded
loader keeps order and errors, jpeg_draft keeps the original size for box geometry, the
synthetic scenes' boxes score as per box, and two processes split the distinct images and end
with the single-process numbers.

This file is also the two-process worker: `python test_evals_fgovd_once.py PID PORT DATA OUT`.
"""

import json
import os
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from beta_clip_jax.evals import readers
from beta_clip_jax.evals.base import PrefetchLoader, decode_image, image_batches, prepare_image
from beta_clip_jax.evals.fgovd import FgovdEvaluator, box_vectors, sharded_ragged_map
from beta_clip_jax.evals.metrics import fgovd_accuracy
from beta_clip_jax.evals.roi_align import box_features
from beta_clip_jax.evals.synthetic_eval import synthetic_scores

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 16  # the fake's input size; its grid is 4 x 4

# Image files (width, height) and per difficulty (image, box x y w h, positive, negatives).
IMAGES = {"val2017/a.png": (48, 40), "train2017/b.png": (40, 64), "val2017/c.jpg": (64, 48)}
A, B, C = IMAGES
ROWS = {
    "hard": [
        (A, (3.0, 4.5, 20.0, 17.0), "red cube", ["blue cube", "cube"]),
        (B, (0.0, 0.0, 40.0, 64.0), "all", ["none", "all"]),  # the positive among its negatives
        (A, (24.0, 0.0, 24.0, 40.0), "right half", ["left half", "top", "x"]),
        (C, (8.0, 8.0, 16.0, 16.0), "centre", ["corner"]),
        (B, (10.2, 50.1, 2.3, 1.1), "thin", ["wide", "y"]),
    ],
    "medium": [
        (C, (8.0, 8.0, 16.0, 16.0), "centre", ["edge", "side"]),
        (A, (3.0, 4.5, 20.0, 17.0), "red cube", ["red ball"]),
        (C, (0.0, 0.0, 32.0, 48.0), "left half", ["right half"]),
    ],
    "easy": [
        (B, (10.2, 50.1, 2.3, 1.1), "thin", ["a cat"]),
        (A, (40.0, 30.0, 7.5, 9.5), "tiny dot", ["big dot"] * 3),
        (C, (30.5, 5.5, 3.0, 30.0), "stick", ["ball"]),
        (C, (60.0, 40.0, 4.0, 8.0), "corner dot", ["dot"] * 2),
    ],
    "trivial": [
        (A, (24.0, 0.0, 24.0, 40.0), "right half", ["sky"]),
        (B, (0.0, 0.0, 40.0, 64.0), "all", ["nothing", "some"]),
        (C, (40.0, 20.0, 20.0, 25.0), "bottom right", ["top left"]),
        (C, (0.0, 24.0, 64.0, 24.0), "lower half", ["upper half", "middle"]),
    ],
}


class PatchFake:
    """A 4 x 4 grid from a 16 x 16 input: tanh(block means @ mix + position), so every box of a
    grid pools a different vector; texts embed as random vectors seeded by their crc32.

    `batches` keeps the pixels of every dense_features call, to count what was encoded.
    """

    image_size = SIZE

    def __init__(self, dim=8, seed=0):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.mix = rng.normal(size=(3, dim)).astype(np.float32)
        self.pos = (0.5 * rng.normal(size=(4, 4, dim))).astype(np.float32)
        self.batches = []

    def dense_features(self, images, normalize=True):
        images = np.asarray(images)
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3), images.shape
        self.batches.append(images.copy())
        blocks = (images / 255.0).reshape(len(images), 4, 4, 4, 4, 3).mean(axis=(2, 4))
        grid = np.tanh(blocks.astype(np.float32) @ self.mix + self.pos)
        if normalize:
            grid /= np.linalg.norm(grid, axis=-1, keepdims=True)
        return grid

    def embed_images(self, images):
        return self.dense_features(images).mean(axis=(1, 2))

    def conditioned_embeddings(self, images, texts):
        return self.embed_images(images) + self.embed_texts(texts)

    def embed_texts(self, texts):
        return np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.dim) for t in texts]
        ).astype(np.float32)


def make_fgovd(root, rows=ROWS, images=IMAGES):
    """The fake set under root: coco/<image> files and fgovd/<difficulty file>; returns cfg."""
    rng = np.random.default_rng(1)
    for path, (w, h) in images.items():
        full = os.path.join(root, "coco", path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(full, quality=95)
    os.makedirs(os.path.join(root, "fgovd"), exist_ok=True)
    for difficulty, items in rows.items():
        with open(os.path.join(root, "fgovd", readers.FGOVD_FILES[difficulty]), "w") as f:
            for path, box, pos, negs in items:
                rec = {"img_path": path, "bbox": box, "pos_expression": [pos]}
                f.write(json.dumps({**rec, "neg_expression": negs}) + "\n")
    cfg = {"kind": "fgovd", "root": os.path.join(root, "fgovd")}
    return {**cfg, "image_root": os.path.join(root, "coco"), "difficulties": list(rows)}


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def reference_box_vector(fake, pixels, box, image_hw):
    """The per-box path: this box's own grid of the squashed image, pooled with box_features."""
    grid = fake.dense_features(prepare_image(pixels, SIZE, "squash")[None], normalize=False)[0]
    return box_features(grid, box, image_hw)[0]


def reference_scores(fake, vector, pos, negs):
    distinct, where = np.unique([pos, *negs], return_inverse=True)
    return (_unit(fake.embed_texts(list(distinct))) @ vector)[where]


def reference_items(fake, image_root, rows=ROWS, draft_size=None):
    """{difficulty: [scores per box]}: each box with its own decode and grid."""
    out = {}
    for difficulty, items in rows.items():
        out[difficulty] = []
        for path, box, pos, negs in items:
            with Image.open(os.path.join(image_root, path)) as img:
                hw = (img.height, img.width)  # before any draft
                if draft_size:
                    img.draft("RGB", (draft_size, draft_size))
                pixels = np.asarray(img.convert("RGB"))
            vector = reference_box_vector(fake, pixels, box, hw)
            out[difficulty].append(reference_scores(fake, vector, pos, negs))
    return out


def encoded_names(fake, image_root, images=IMAGES):
    """Per dense_features call, the image names of its rows (identified by their pixels)."""
    by_pixels = {}
    for path in images:
        pixels = np.asarray(Image.open(os.path.join(image_root, path)).convert("RGB"))
        by_pixels[prepare_image(pixels, SIZE, "squash").tobytes()] = path
    return [[by_pixels[row.tobytes()] for row in batch] for batch in fake.batches]


@pytest.fixture(scope="module")
def fgovd_cfg(tmp_path_factory):
    return make_fgovd(str(tmp_path_factory.mktemp("fgovd_once")))


def _check_against_reference(results, items, reference):
    for difficulty, want in reference.items():
        got = [r["scores"] for r in items if r["split"] == difficulty]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
        hits = [w[0] >= w.max() for w in want]
        assert results[difficulty] == pytest.approx(100.0 * np.mean(hits))


def test_each_image_encoded_once_and_scores_as_per_box(fgovd_cfg):
    fake = PatchFake()
    items = []
    results = FgovdEvaluator("fgovd", {**fgovd_cfg, "batch_size": 3}).run(fake, items)
    # One call, holding each of the three distinct images once (the old path: 16 boxes, 7 calls).
    assert sorted(encoded_names(fake, fgovd_cfg["image_root"])[0]) == sorted(IMAGES)
    assert len(fake.batches) == 1
    assert [(r["split"], r["index"]) for r in items] == [
        (d, i) for d in ROWS for i in range(len(ROWS[d]))
    ]
    reference = reference_items(PatchFake(), fgovd_cfg["image_root"])
    _check_against_reference(results, items, reference)
    tie = items[1]["scores"]  # hard, line 1: the positive repeated among its negatives
    assert tie[0] == tie[2]


def test_padding_batches_and_workers_keep_the_numbers(fgovd_cfg):
    baseline = []
    FgovdEvaluator("f", {**fgovd_cfg, "batch_size": 3}).run(PatchFake(), baseline)
    for batch_size, workers in ((2, 0), (1, 3), (5, 8)):
        fake, items = PatchFake(), []
        cfg = {**fgovd_cfg, "batch_size": batch_size, "load_workers": workers}
        FgovdEvaluator("f", cfg).run(fake, items)
        assert items == baseline, (batch_size, workers)
        calls = encoded_names(fake, fgovd_cfg["image_root"])
        assert len(calls) == -(-len(IMAGES) // batch_size)
        real = [name for batch in calls for name in dict.fromkeys(batch)]  # padding repeats
        assert sorted(real) == sorted(IMAGES)


def test_bad_config_fields_are_named(fgovd_cfg, tmp_path):
    with pytest.raises(ValueError, match="load_workers must be >= 0"):
        FgovdEvaluator("f", {**fgovd_cfg, "load_workers": -1})
    empty = make_fgovd(str(tmp_path), rows={"hard": ROWS["hard"], "easy": []})
    with pytest.raises(ValueError, match="FG-OVD easy file e_attributes_llava.jsonl.*no boxes"):
        FgovdEvaluator("f", empty)


def test_jpeg_draft_keeps_the_original_size_for_boxes(tmp_path):
    images = {"val2017/big.jpg": (128, 96)}  # 96 // 16 = 6: PIL's 1/4 scale, 32 x 24 pixels
    boxes = [(4.0, 8.0, 60.0, 40.0), (64.0, 0.0, 64.0, 96.0), (100.5, 70.0, 20.0, 25.0)]
    rows = {"hard": [("val2017/big.jpg", b, "thing", ["other", "more"]) for b in boxes]}
    cfg = make_fgovd(str(tmp_path), rows, images)
    path = os.path.join(cfg["image_root"], "val2017/big.jpg")
    drafted, hw = decode_image(path, draft_size=SIZE)
    assert np.asarray(drafted).shape[:2] == (24, 32) and hw == (96, 128)
    assert np.asarray(decode_image(path)[0]).shape[:2] == hw == decode_image(path)[1]

    items = []
    results = FgovdEvaluator("f", {**cfg, "jpeg_draft": True}).run(PatchFake(), items)
    reference = reference_items(PatchFake(), cfg["image_root"], rows, draft_size=SIZE)
    _check_against_reference(results, items, reference)
    # Not vacuous: the drafted image's own size would map the boxes elsewhere, and the full
    # decode scores differently.
    fake = PatchFake()
    wrong = reference_box_vector(fake, np.asarray(drafted), boxes[2], (24, 32))
    right = reference_box_vector(fake, np.asarray(drafted), boxes[2], hw)
    assert np.abs(wrong - right).max() > 1e-3
    full = []
    FgovdEvaluator("f", cfg).run(PatchFake(), full)
    assert (
        max(
            np.abs(np.subtract(a["scores"], b["scores"])).max()
            for a, b in zip(full, items, strict=True)
        )
        > 0
    )


def test_threaded_loader_keeps_order(fgovd_cfg):
    paths = [os.path.join(fgovd_cfg["image_root"], p) for p in IMAGES] * 3
    sequential = np.stack([prepare_image(decode_image(p)[0], SIZE, "crop") for p in paths])
    threaded = image_batches(paths, SIZE, "crop", workers=4)
    in_thread = image_batches(paths, SIZE, "crop", workers=0)
    for indices in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 8, 8, 8], [7, 2, 2, 0]):
        np.testing.assert_array_equal(threaded(np.asarray(indices)), sequential[indices])
        np.testing.assert_array_equal(in_thread(np.asarray(indices)), sequential[indices])


def test_prefetch_loader_order_prefetch_and_errors():
    fetched, lock = [], threading.Lock()
    main = threading.get_ident()

    def fetch(i):
        time.sleep(0.01 * ((7 * i) % 5))  # later items often finish first
        with lock:
            fetched.append((i, threading.get_ident()))
        if i == 11:
            raise FileNotFoundError("no file 11.jpg")
        return i

    loader = PrefetchLoader(fetch, 12, workers=4)
    assert loader([0, 1, 2, 3]) == [0, 1, 2, 3]
    deadline = time.monotonic() + 10.0  # the next run of four decodes with no call
    while len(fetched) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(i for i, _ in fetched) == list(range(8))
    assert loader([4, 5, 6, 7]) == [4, 5, 6, 7]
    assert loader([9, 8, 8]) == [9, 8, 8]
    with pytest.raises(FileNotFoundError, match="11.jpg"):
        loader([10, 11])
    assert sorted(i for i, _ in fetched) == list(range(12))  # each item fetched once
    assert all(tid != main for _, tid in fetched)
    fetched.clear()
    assert PrefetchLoader(fetch, 12, workers=0)([3, 1]) == [3, 1]
    assert [tid for _, tid in fetched] == [main, main]


def test_synthetic_boxes_score_as_per_box():
    from beta_clip_jax.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(num_examples=4, image_size=SIZE, seed=3, split="eval")
    records = [scenes[i] for i in range(len(scenes))]
    images = [np.asarray(r["image"]) for r in records]
    owners = [n for n, r in enumerate(records) for _ in r["box_texts"]]
    boxes = [tuple(b) for r in records for b in np.asarray(r["boxes"]).reshape(-1, 4)]
    fake = PatchFake()
    got = box_vectors(fake, images, owners, boxes, batch_size=3)
    assert sum(len(b) for b in fake.batches) == 6  # 4 images in 2 calls of 3, each image once
    want = np.stack(
        [
            reference_box_vector(fake, images[o], b, images[o].shape[:2])
            for o, b in zip(owners, boxes, strict=True)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    results = synthetic_scores(PatchFake(), records, 3, tci=False)
    positives = [t for r in records for t in r["box_texts"]]
    for d in records[0]["negatives"]:
        negatives = [negs for r in records for negs in r["negatives"][d]]
        scores = [
            reference_scores(fake, v, p, list(n))
            for v, p, n in zip(want, positives, negatives, strict=True)
        ]
        assert results[f"box_{d}"] == pytest.approx(fgovd_accuracy(np.stack(scores)))


def test_ragged_map_checks_row_counts():
    def compute(indices):
        return [np.full((2, 3), i, np.float32) for i in indices]

    rows = sharded_ragged_map(compute, [2, 2, 2], batch_size=2)
    assert rows[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="2 rows for item 1, not 3"):
        sharded_ragged_map(compute, [2, 3, 2], batch_size=2)


def evaluate(cfg):
    """FG-OVD on the fake set at batch 2: (results, per-item rows, image names per call)."""
    fake, items = PatchFake(), []
    results = FgovdEvaluator("fgovd", {**cfg, "batch_size": 2}).run(fake, items)
    return results, items, encoded_names(fake, cfg["image_root"])


def worker(pid, port, cfg_path, out_path):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid
    )
    with open(cfg_path) as f:
        results, items, calls = evaluate(json.load(f))
    with open(out_path, "w") as f:
        json.dump({"results": results, "items": items, "calls": calls}, f)
    jax.distributed.shutdown()


def test_two_processes_split_images_and_agree(tmp_path):
    from test_evals_multihost import _free_port

    cfg = make_fgovd(str(tmp_path))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    single, single_items, _ = evaluate(cfg)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    port, outs = _free_port(), [str(tmp_path / f"out{p}.json") for p in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(p), str(port), str(tmp_path / "cfg.json"), outs[p]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for p in range(2)
    ]
    try:
        logs = [proc.communicate(timeout=60)[0].decode(errors="replace") for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    got = [json.load(open(o)) for o in outs]
    for out in got:
        assert out["results"] == single and out["items"] == single_items
    # Distinct images split, not boxes (first-seen order A, B, C; ceil(3 / 2) = 2 each, C
    # padded). Process 0 pools 5 distinct boxes, process 1 six: the all-gather pads process 0's
    # rows, and dropping that padding (not just the tail's) is what keeps the rows in place.
    assert got[0]["calls"] == [[A, B]] and got[1]["calls"] == [[C, C]]


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
