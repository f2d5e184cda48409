"""A user's own JSONL: the `jsonl` evaluator's manifest and scores, and data.eval_fraction's
split between training and that evaluator (disjoint and complete)."""

import json
import logging
import os

import numpy as np
import pytest
from test_data_sources import caption_for, make_jsonl
from test_evals_fakes import IdFake, id_image, save_png

from beta_clip_jax.config_check import train_set_size
from beta_clip_jax.config_defaults import base_config
from beta_clip_jax.data import pipeline, sources
from beta_clip_jax.evals.registry import build_evaluator
from beta_clip_jax.evals.retrieval import read_jsonl_set

BAD = {1: "missing_image", 3: "empty_caption", 4: "corrupt_image"}


def test_manifest_order_paths_captions_and_skips(tmp_path, caplog):
    path, entries = make_jsonl(str(tmp_path), n=7, bad=BAD)
    with caplog.at_level(logging.WARNING):
        data = read_jsonl_set(path)
    good = [0, 2, 5, 6]
    # Paths resolve against the file's folder, as the training JsonlSource resolves them.
    assert data.image_paths == [os.path.join(str(tmp_path), entries[i][0]) for i in good]
    assert data.captions == [caption_for(i) for i in good]
    assert data.text_to_image.tolist() == [0, 1, 2, 3]
    assert [s.split(": ")[:2] for s in data.skipped] == [
        ["data.jsonl:2", "missing_image"],
        ["data.jsonl:4", "empty_caption"],
        ["data.jsonl:5", "corrupt_image"],
    ]
    for line in ("data.jsonl:2: missing_image", "data.jsonl:5: corrupt_image"):
        assert line in caplog.text
    # Without the decode check a corrupt file that exists is kept (only existence is checked).
    fast = read_jsonl_set(path, check_images=False)
    assert len(fast.image_paths) == 5 and len(fast.skipped) == 2
    # Another image_root: the same relative paths joined to it.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "images").mkdir(parents=True)
    (elsewhere / entries[6][0]).write_bytes((tmp_path / entries[6][0]).read_bytes())
    moved = read_jsonl_set(path, image_root=str(elsewhere))
    assert moved.image_paths == [str(elsewhere / entries[6][0])] and len(moved.skipped) == 6


def _write_own(root, lines):
    """A JSONL of raw lines (dicts are dumped), images id_image(k) at images/<k>.png."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    path = os.path.join(root, "own.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    return path


def _own_record(root, k, caption=None, **extra):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    save_png(id_image(k), os.path.join(root, "images", f"{k}.png"))
    caption = caption or f"A long caption of item {k}. It goes on about item {k}"
    return {"image": f"images/{k}.png", "caption": caption, **extra}


def test_caption_modes_and_line_numbers(tmp_path):
    root = str(tmp_path)
    lines = [
        _own_record(root, 1, "A red red car. It is parked"),
        "",  # a blank line: no record, but line numbers still count it
        _own_record(root, 2, "raw text", sentences=["First  part", "", "second part"]),
        "{not json",
        {"image": "images/1.png"},  # no caption key
    ]
    path = _write_own(root, lines)
    data = read_jsonl_set(path)
    assert data.captions == ["A red car. It is parked", "raw text"]
    joined = read_jsonl_set(path, caption_mode="joined")
    assert joined.captions == ["A red car. It is parked", "First part. second part"]
    assert [s.split(": ")[:2] for s in data.skipped] == [
        ["own.jsonl:4", "bad_record"],
        ["own.jsonl:5", "bad_record"],
    ]
    with pytest.raises(ValueError, match="caption_mode"):
        read_jsonl_set(path, caption_mode="short")


def _hand_recall(image_emb, text_emb):
    """R@1/5/10 both ways on a 1:1 gallery, counted rank by rank."""
    sim = image_emb @ text_emb.T
    n = len(sim)
    t2i = [sum(sim[i, j] > sim[j, j] for i in range(n)) for j in range(n)]
    i2t = [sum(sim[i, j] > sim[i, i] for j in range(n)) for i in range(n)]
    out = {f"t2i_r{k}": 100.0 * sum(r < k for r in t2i) / n for k in (1, 5, 10)}
    out.update({f"i2t_r{k}": 100.0 * sum(r < k for r in i2t) / n for k in (1, 5, 10)})
    return out


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_jsonl_evaluator_recall_on_idfake(tmp_path):
    root = str(tmp_path)
    ids = [3, 7, 1, 12, 5, 9, 20, 14, 2, 30, 11, 6]
    lines = [_own_record(root, k) for k in ids]
    lines.insert(4, {"image": "images/missing.png", "caption": "item 4"})
    lines.insert(8, {"image": "images/3.png", "caption": "  "})
    path = _write_own(root, lines)
    ev = build_evaluator("own", {"kind": "jsonl", "root": path, "batch_size": 5})
    fake = IdFake()
    out = ev.run(fake)
    assert out["skipped"] == 2 and out["num_images"] == len(ids) == out["num_texts"]
    images, texts = fake.image_table[ids], fake.text_table[ids]
    want = _hand_recall(images, texts)
    assert {k: out[k] for k in want} == pytest.approx(want)
    assert 0 < out["t2i_r1"] < 100  # the fake is imperfect, so the count is not vacuous
    # Text-conditioned (on by default, a long-caption kind): each image pooled with its caption.
    tci = _hand_recall(_unit(images + 0.5 * texts), texts)
    assert {k: out["tci_" + k] for k in tci} == pytest.approx(tci)


def _data_config(path, fraction, skip_first=None):
    config = base_config("tiny")
    data = config.data
    data.name, data.path, data.eval_fraction, data.skip_first = "jsonl", path, fraction, skip_first
    data.image_size, data.text_length, data.phrase_length = 8, 32, 8
    data.num_workers, data.pack_texts, data.max_skip_fraction = 0, False, 0.0
    data.min_records_for_skip_check = 1
    return config


@pytest.mark.parametrize("skip_first", [None, 3])
def test_eval_fraction_split_is_disjoint_and_complete(tmp_path, skip_first):
    n, fraction = 20, 0.25
    path, entries = make_jsonl(str(tmp_path), n=n)
    config = _data_config(path, fraction, skip_first)
    skip = skip_first or 0
    start, stop = sources.held_out_range(n, fraction, skip)
    held = set(range(start, stop))
    assert stop == n and len(held) == round(fraction * (n - skip) + 0.01)
    first, length = pipeline.train_range(n, skip, None, fraction)
    train = list(range(first, first + length))  # every process reads this range (global order)
    assert not held & set(train)
    # Complete: every record after skip_first is trained on or held out.
    assert sorted(train) + sorted(held) == list(range(skip, n))
    assert train_set_size(config) == start - skip
    # The evaluator reads exactly the held-out records, in order.
    ev = build_evaluator(
        "held", {"kind": "jsonl", "path": path, "eval_fraction": fraction, "skip_first": skip}
    )
    abs_paths = [os.path.join(str(tmp_path), e[0]) for e in entries]
    assert ev.data.image_paths == abs_paths[start:] and ev.data.skipped == []
    # max_records caps training inside its part; the held-out tail stays out of reach.
    assert pipeline.train_range(n, skip, 100, fraction)[1] == start - skip


def test_training_never_reads_the_held_out_records(tmp_path):
    from beta_clip_jax.tokenizer import Tokenizer

    n, fraction = 20, 0.25
    # Every held-out record is unusable: training would count a skip if it ever read one.
    path, _ = make_jsonl(str(tmp_path), n=n, bad={i: "missing_image" for i in range(15, n)})
    data = _data_config(path, fraction).data
    it = pipeline.build_train_iterator(
        data, batch_size_per_process=5, seed=0, tokenizer=Tokenizer(), training=True,
        num_epochs=2,
    )  # fmt: skip
    batches = list(it)
    assert sum(len(b["image"]) for b in batches) == 2 * 15
    assert it.metrics()["data/skipped_missing_image"] == 0


def test_held_out_range_rules():
    assert sources.held_out_range(10, 0.0) == (10, 10)
    assert sources.held_out_range(10, 0.25) == (7, 10)  # 2.5 rounds half up
    assert sources.held_out_range(10, 0.01) == (9, 10)  # at least one when asked for
    assert sources.held_out_range(10, 0.5, skip_first=4) == (7, 10)
    assert sources.held_out_range(3, 0.5, skip_first=5) == (3, 3)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="eval_fraction"):
            sources.held_out_range(10, bad)
    with pytest.raises(ValueError, match="eval_fraction=0.9"):
        pipeline.train_range(2, 0, None, 0.9)
