"""Record sources on small real on-disk datasets (ShareGPT4V JSON, JSONL, Urban1K), TFDS mock
data, synthetic scenes; image loading errors; missing-dataset errors. The dataset builders here are
reused by test_pipeline.py."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from beta_clip_jax.data import pipeline, prepare, sources

BAD_UTF8 = b"\xff\xfe bad"


def write_jpeg(path, seed, size=(40, 48)):
    """A small random-textured RGB JPEG (distinct per seed)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BILINEAR)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="JPEG", quality=90)


def caption_for(i):
    return f"A photo number {i} of a red car. The car is parked near a tall tree"


def make_records(root, n, bad):
    """Write images for n records; `bad` maps index -> kind. Returns entries (image, caption).

    Kinds: missing_image (no file), corrupt_image (garbage bytes), empty_caption (""),
    non_text_caption (a number), bad_utf8 (raw invalid UTF-8 in the caption).
    """
    entries = []
    for i in range(n):
        rel = f"images/{i:03d}.jpg"
        kind = bad.get(i)
        if kind == "corrupt_image":
            os.makedirs(os.path.join(root, "images"), exist_ok=True)
            with open(os.path.join(root, rel), "wb") as f:
                f.write(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
        elif kind != "missing_image":
            write_jpeg(os.path.join(root, rel), i)
        caption = {"empty_caption": "  ", "non_text_caption": 42}.get(kind, caption_for(i))
        entries.append((rel, caption, kind))
    return entries


def _dump(value):
    """JSON text of a value, with the bad-UTF-8 marker turned into raw invalid bytes."""
    return json.dumps(value, ensure_ascii=False).encode().replace(b"@BAD@", BAD_UTF8)


def _caption_value(caption, kind):
    return "@BAD@" + caption if kind == "bad_utf8" else caption


def make_sharegpt4v(root, n=24, bad=None, held_out=4):
    """ShareGPT4V-style JSON; the first `held_out` entries stand for SV-1k."""
    entries = make_records(root, n, bad or {})
    items = [
        {
            "id": i,
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": _caption_value(cap, kind)},
            ],
        }
        for i, (rel, cap, kind) in enumerate(entries)
    ]
    path = os.path.join(root, "share.json")
    with open(path, "wb") as f:
        f.write(b"[\n  " + b",\n  ".join(_dump(x) for x in items) + b"\n]\n")
    return path, entries


def make_jsonl(root, n=24, bad=None, extra=None):
    """Our JSONL; `extra(i)` adds fields (sentences/phrases) per record."""
    entries = make_records(root, n, bad or {})
    path = os.path.join(root, "data.jsonl")
    with open(path, "wb") as f:
        for i, (rel, cap, kind) in enumerate(entries):
            rec = {
                "image": rel,
                "caption": _caption_value(cap, kind),
                **(extra(i) if extra else {}),
            }
            f.write(_dump(rec) + b"\n")
        f.write(b"\n")  # trailing blank line is ignored
    return path, entries


def make_urban1k(root, n=12, bad=None):
    bad = bad or {}
    for i in range(1, n + 1):
        kind = bad.get(i)
        os.makedirs(os.path.join(root, "caption"), exist_ok=True)
        os.makedirs(os.path.join(root, "image"), exist_ok=True)
        text = {"empty_caption": b"\nsecond line"}.get(kind, caption_for(i).encode())
        if kind == "bad_utf8":
            text = BAD_UTF8 + text
        with open(os.path.join(root, "caption", f"{i}.txt"), "wb") as f:
            f.write(text + b"\nignored second line\n")
        if kind == "corrupt_image":
            with open(os.path.join(root, "image", f"{i}.jpg"), "wb") as f:
                f.write(b"garbage")
        elif kind != "missing_image":
            write_jpeg(os.path.join(root, "image", f"{i}.jpg"), i)
    return root


def test_load_image(tmp_path):
    write_jpeg(str(tmp_path / "a.jpg"), 0)
    img = sources.load_image(str(tmp_path / "a.jpg"))
    assert img.dtype == np.uint8 and img.shape == (48, 40, 3)
    with open(tmp_path / "a.jpg", "rb") as f:
        np.testing.assert_array_equal(sources.load_image(f.read()), img)
    np.testing.assert_array_equal(sources.load_image(img[..., 0]), np.repeat(img[..., :1], 3, -1))
    np.testing.assert_array_equal(sources.load_image(img[..., :1]), np.repeat(img[..., :1], 3, -1))
    with pytest.raises(FileNotFoundError):
        sources.load_image(str(tmp_path / "missing.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(sources.CorruptImageError, match="bad.jpg"):
        sources.load_image(str(tmp_path / "bad.jpg"))
    # Truncated JPEG: header fine, data cut.
    data = (tmp_path / "a.jpg").read_bytes()
    with pytest.raises(sources.CorruptImageError):
        sources.load_image(data[: len(data) // 2])


def test_sharegpt4v_source(tmp_path):
    path, entries = make_sharegpt4v(str(tmp_path), n=6, bad={2: "bad_utf8", 3: "non_text_caption"})
    src = sources.ShareGPT4VSource(path, str(tmp_path))
    assert len(src) == 6
    rec = src[1]
    assert rec["caption"] == caption_for(1) and rec["image_path"].endswith("images/001.jpg")
    with pytest.raises(UnicodeDecodeError):
        src[2]
    assert src[3]["caption"] == 42
    src2 = pickle.loads(pickle.dumps(src))
    assert src2[5] == src[5]


def test_jsonl_source(tmp_path):
    path, _ = make_jsonl(str(tmp_path), n=5, extra=lambda i: {"phrases": ["a red car"]})
    src = sources.JsonlSource(path, str(tmp_path))
    assert len(src) == 5
    assert src[4]["phrases"] == ["a red car"] and src[4]["caption"] == caption_for(4)
    assert pickle.loads(pickle.dumps(src))[0] == src[0]


def test_urban1k_source(tmp_path):
    make_urban1k(str(tmp_path), n=11, bad={3: "missing_image", 4: "empty_caption"})
    src = sources.Urban1KSource(str(tmp_path))
    assert [src[i]["id"] for i in range(3)] == ["urban1k/1", "urban1k/2", "urban1k/3"]
    assert src[10]["id"] == "urban1k/11" and src[0]["caption"] == caption_for(1)
    assert not os.path.exists(src[2]["image_path"]) and src[3]["caption"] == ""


def test_synthetic_source():
    cfg = pipeline.default_data_config()
    cfg.synthetic.num_train = 3
    src = sources.make_source(cfg, 32)
    rec = src[2]
    assert len(src) == 3 and rec["image"].shape == (32, 32, 3) and rec["phrases"]


def test_missing_and_unknown_datasets(tmp_path):
    cfg = pipeline.default_data_config()
    cfg.name = "sharegpt4v"
    cfg.path = str(tmp_path / "nope.json")
    cfg.image_root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="Lin-Chen/ShareGPT4V"):
        sources.make_source(cfg, 32)
    cfg.name, cfg.path = "urban1k", str(tmp_path)
    with pytest.raises(FileNotFoundError, match="caption/"):
        sources.make_source(cfg, 32)
    cfg.name, cfg.path = "jsonl", None
    with pytest.raises(ValueError, match="prepare"):
        sources.make_source(cfg, 32)
    cfg.name = "laion"
    with pytest.raises(ValueError, match="unknown dataset name.*laion"):
        sources.make_source(cfg, 32)


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        cfg = pipeline.default_data_config()
        cfg.name = "tfds"
        cfg.tfds.name = "ai2dcaption"
        cfg.tfds.id_key = "image_filename"
        src = sources.make_source(cfg, 32)
        rec = src[1]
        assert len(src) == 4 and isinstance(rec["caption"], str)
        assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3
        cfg.max_phrases = 0  # random mock captions may hold no phrase
        cfg.pack_group = 2  # packing groups must tile the batch of 2
        it = pipeline.build_train_iterator(cfg, batch_size_per_process=2, seed=0, image_size=16)
        batch = next(it)
        assert batch["image"].shape == (2, 16, 16, 3) and batch["valid"][:, 0].all()
        cfg.tfds.name = "no_such_dataset_xyz"
        with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
            sources.make_source(cfg, 32)


def test_prepare_fallback_writes_jsonl(tmp_path):
    path, entries = make_sharegpt4v(
        str(tmp_path), n=8, bad={5: "empty_caption", 6: "missing_image"}
    )
    out = str(tmp_path / "out" / "train.jsonl")
    stats = prepare.prepare(path, "sharegpt4v", out, image_root=str(tmp_path), skip_first=2)
    assert stats["phrases_from"].startswith("fallback")
    assert stats["written"] == 4 and stats["dropped_bad_caption"] == 1
    assert stats["dropped_missing_image"] == 1
    with open(out, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert [r["image"] for r in lines] == [entries[i][0] for i in (2, 3, 4, 7)]
    first = lines[0]
    assert first["sentences"] == [
        "A photo number 2 of a red car",
        "The car is parked near a tall tree",
    ]
    assert "a red car" in first["phrases"] and "a tall tree" in first["phrases"]
    # The prepared file reads back through the pipeline with its precomputed texts.
    src = sources.JsonlSource(out, str(tmp_path))
    assert src[0]["sentences"] == first["sentences"]
