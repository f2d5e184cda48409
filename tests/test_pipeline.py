"""Training pipeline on small on-disk datasets: shapes, masks, token ids, skip counts, exact
resume, process sharding, the skip-fraction stop, and worker processes == in-process."""

import json
import os

import numpy as np
import pytest
from test_data_sources import caption_for, make_jsonl, make_sharegpt4v, make_urban1k

from beta_clip_jax.data import hierarchy, pipeline, sources, transforms
from beta_clip_jax.tokenizer import Tokenizer

SIZE = 24
BAD = {
    1: "missing_image",
    4: "corrupt_image",
    6: "empty_caption",
    9: "non_text_caption",
    10: "bad_utf8",
    13: "missing_image",
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def config(name, path, image_root=None, **overrides):
    cfg = pipeline.default_data_config()
    cfg.name, cfg.path, cfg.image_root = name, path, image_root
    cfg.max_sentences, cfg.max_phrases = 3, 4
    cfg.text_length, cfg.phrase_length = 32, 8
    cfg.max_skip_fraction = 0.5
    cfg.min_records_for_skip_check = 1
    cfg.num_threads = 1
    cfg.pack_texts = False  # these tests read the unpacked layout; test_packing.py packs
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def expected_skips(bad_kind, positions, shard, seed, max_attempts=100):
    """(distinct bad records per reason, distinct records read) the documented replacement
    rule gives for these stream positions."""
    first, step, length = shard
    bad, seen = {}, set()
    for pos in positions:
        index = first + step * (pos % length)
        for attempt in range(1, max_attempts + 1):
            seen.add(index)
            if bad_kind(index) is None:
                break
            bad[index] = bad_kind(index)
            rng = np.random.default_rng([seed, 0x5EED, pos, attempt])
            index = first + step * int(rng.integers(length))
    counts = dict.fromkeys(pipeline.SKIP_REASONS, 0)
    for reason in bad.values():
        counts[reason] += 1
    return counts, len(seen)


@pytest.mark.parametrize("fmt", ["sharegpt4v", "jsonl", "urban1k"])
def test_real_layouts_read_back(tmp_path, tok, fmt):
    root = str(tmp_path)
    if fmt == "urban1k":  # stems 1..n, index = stem - 1
        kinds = {i: k for i, k in BAD.items() if k != "non_text_caption"}
        make_urban1k(root, n=16, bad={i + 1: k for i, k in kinds.items()})
        cfg, skip = config("urban1k", root), 0
        caption = lambda i: caption_for(i + 1)
        image = lambda i: os.path.join(root, "image", f"{i + 1}.jpg")
    else:
        make = make_sharegpt4v if fmt == "sharegpt4v" else make_jsonl
        path, _ = make(root, n=16, bad=BAD)
        cfg = config(fmt, path, root, skip_first=2 if fmt == "sharegpt4v" else None)
        skip = 2 if fmt == "sharegpt4v" else 0
        caption = caption_for
        image = lambda i: os.path.join(root, f"images/{i:03d}.jpg")
        kinds = BAD
    it = pipeline.build_train_iterator(
        cfg, batch_size_per_process=4, seed=3, image_size=SIZE, tokenizer=tok, training=False,
        num_epochs=1,
    )  # fmt: skip
    batches = list(it)
    n_good = 16 - skip
    assert len(batches) == (16 - skip) // 4
    expected = {}
    for i in range(skip, 16):
        if i in kinds:
            continue
        h = hierarchy.build_hierarchy(caption(i), np.random.default_rng(0), max_sentences=3,
                                      max_phrases=4)  # fmt: skip
        expected[tuple(tok.encode(h.caption, 32)[0])] = (i, h)
    for b in batches:
        assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
        assert b["caption"].shape == (4, 32) and b["caption"].dtype == np.int32
        assert b["sentences"].shape == (4, 3, 32) and b["sentences"].dtype == np.int32
        assert b["phrases"].shape == (4, 4, 8) and b["valid"].shape == (4, 8)
        assert set(b) == {"image", "caption", "sentences", "phrases", "valid"}
        for row in range(4):
            i, h = expected[tuple(b["caption"][row])]  # every row is a good record
            np.testing.assert_array_equal(b["sentences"][row, 0:2], tok.encode(h.sentences, 32))
            np.testing.assert_array_equal(b["phrases"][row, : len(h.phrases)],
                                          tok.encode(h.phrases, 8))  # fmt: skip
            assert b["valid"][row].tolist() == [True] * 3 + [False] + [True] * 4
            assert not b["sentences"][row, 2].any()
            want = transforms.resize_center_crop(sources.load_image(image(i)), SIZE)
            np.testing.assert_array_equal(b["image"][row], want)
    positions = range(len(batches) * 4)  # the last partial batch is dropped
    counts, seen = expected_skips(kinds.get, positions, (skip, 1, n_good), seed=3)
    m = it.metrics()
    assert {r: m[f"data/skipped_{r}"] for r in pipeline.SKIP_REASONS} == counts
    assert m["data/records_seen"] == seen  # distinct records, each bad one counted once
    assert counts["missing_image"] >= 1 and counts["corrupt_image"] >= 1


def test_precomputed_texts_and_truncation_count(tmp_path, tok):
    sents = ["a red car", "a tall tree", "a blue sky " * 20]
    extra = lambda i: {"sentences": sents, "phrases": ["a red car", "tall tree", "the image"]}
    path, _ = make_jsonl(str(tmp_path), n=4, extra=extra)
    it = pipeline.build_train_iterator(
        config("jsonl", path), batch_size_per_process=2, seed=0, image_size=SIZE, tokenizer=tok
    )
    b = next(it)
    for row in range(2):
        got = {tuple(r) for r in b["sentences"][row]}
        assert got == {tuple(r) for r in tok.encode(sents, 32)}  # order is sampled
        caption = tok.decode(b["caption"][row])
        assert caption.startswith(("a red car", "a tall tree", "a blue sky"))
        np.testing.assert_array_equal(
            b["phrases"][row, :2], tok.encode(["a red car", "tall tree"], 8)
        )
        assert b["valid"][row].tolist() == [True] * 4 + [True, True, False, False]
    # Long sentence and the caption containing it fill their 32 tokens: 2 per image.
    m = it.metrics()
    assert m["data/truncated_texts"] == 4
    levels = [m[f"data/truncated_{level}"] for level in ("caption", "sentence", "phrase")]
    assert levels == [2, 2, 0]  # counted per level


def test_sentence_phrase_groups_in_reference_order_and_phraseless_records_kept(tmp_path, tok):
    """prepare's per-sentence groups: nouns of every sampled sentence (in sampled order) first,
    then verb+adp, then spatial, as the reference orders the phrases of its sampled caption. A
    record whose sentences yield no phrase trains with its phrase slots padded, not skipped."""
    sents = ["a dog leaning against a wall", "a cat on the left"]
    groups = [
        {"noun": ["a dog", "a wall"], "verb_adp": ["leaning against"], "spatial": []},
        {"noun": ["a cat"], "verb_adp": [], "spatial": ["on the left"]},
    ]
    empty = [{"noun": [], "verb_adp": [], "spatial": []}] * 2

    def extra(i):
        return {"sentences": sents, "sentence_phrases": groups if i % 2 == 0 else empty}

    path, _ = make_jsonl(str(tmp_path), n=4, extra=extra)
    cfg = config("jsonl", path, max_sentences=2, max_phrases=5)
    it = pipeline.build_train_iterator(
        cfg, batch_size_per_process=4, seed=0, image_size=SIZE, tokenizer=tok
    )
    b = next(it)
    with_phrases = [row for row in range(4) if b["valid"][row, 3:].any()]
    assert len(with_phrases) == 2  # the records are shuffled; two of each kind
    for row in range(4):
        if row not in with_phrases:
            assert not b["phrases"][row].any()
            continue
        first = tok.decode(b["sentences"][row, 0])
        order = [0, 1] if first.startswith("a dog") else [1, 0]
        nouns = [p for i in order for p in groups[i]["noun"]]
        want = nouns + ["leaning against", "on the left"]
        np.testing.assert_array_equal(b["phrases"][row], tok.encode(want, 8))
        assert b["valid"][row, 3:].all()
    assert not any(v for k, v in it.metrics().items() if k.startswith("data/skipped"))


def test_resume_mid_epoch_is_exact(tmp_path, tok):
    path, _ = make_jsonl(str(tmp_path), n=20, bad={3: "corrupt_image", 7: "missing_image"})
    cfg = config("jsonl", path, num_threads=2)
    kw = dict(batch_size_per_process=3, seed=5, image_size=SIZE, tokenizer=tok)
    it = pipeline.build_train_iterator(cfg, **kw)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    metrics = it.metrics()
    rest = take(it, 10)  # crosses epoch boundaries (6 batches per epoch)
    it2 = pipeline.build_train_iterator(cfg, **kw)
    it2.set_state(state)
    assert it2.metrics() == metrics
    for a, b in zip(rest, take(it2, 10), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert it2.metrics() == it.metrics()
    # Epochs are reshuffled and crops redrawn: epoch 2 differs from epoch 1.
    it3 = pipeline.build_train_iterator(cfg, **kw)
    e1, e2 = take(it3, 6), take(it3, 6)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(e1, e2, strict=True))


def test_orbax_checkpoint_of_iterator(tmp_path, tok):
    import grain
    import orbax.checkpoint as ocp

    cfg = config("synthetic", None)
    cfg.synthetic.num_train = 16
    kw = dict(batch_size_per_process=4, seed=1, image_size=SIZE, tokenizer=tok)
    it = pipeline.build_train_iterator(cfg, **kw)
    take(it, 3)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = take(it, 2)
        it2 = pipeline.build_train_iterator(cfg, **kw)
        mngr.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(it2)))
    for a, b in zip(want, take(it2, 2), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["phrases"], b["phrases"])


def test_processes_get_disjoint_covering_shards(tmp_path, tok):
    path, _ = make_jsonl(str(tmp_path), n=17)  # one record left over with 2 processes
    cfg = config("jsonl", path)
    seen = []
    for pi in range(2):
        it = pipeline.build_train_iterator(
            cfg, batch_size_per_process=2, seed=0, image_size=SIZE, tokenizer=tok,
            process_index=pi, process_count=2,
        )  # fmt: skip
        # Two sentences (< max_sentences): slot 1 is always the record's first sentence.
        seen.append([tuple(r) for b in take(it, 4) for r in b["sentences"][:, 0]])
    assert len(set(seen[0])) == len(set(seen[1])) == 8 and not set(seen[0]) & set(seen[1])
    firsts = tok.encode([caption_for(i).split(". ")[0] for i in range(17)], 32)
    everything = {tuple(r) for r in firsts}
    assert len(set(seen[0]) | set(seen[1])) == 16 and set(seen[0]) | set(seen[1]) <= everything


def test_skip_fraction_stops_with_examples(tmp_path, tok):
    bad = {i: "missing_image" for i in range(0, 12, 2)} | {1: "empty_caption"}
    path, _ = make_jsonl(str(tmp_path), n=12, bad=bad)
    cfg = config("jsonl", path, max_skip_fraction=0.2, min_records_for_skip_check=8)
    it = pipeline.build_train_iterator(
        cfg, batch_size_per_process=4, seed=0, image_size=SIZE, tokenizer=tok
    )
    with pytest.raises(pipeline.DataSkipError, match=r"(?s)unusable.*missing_image.*e\.g\..*jpg"):
        take(it, 5)


def test_worker_processes_match_in_process(tmp_path, tok):
    path, _ = make_jsonl(str(tmp_path), n=12, bad={2: "corrupt_image"})
    kw = dict(batch_size_per_process=2, seed=4, image_size=SIZE, tokenizer=tok)
    ref = pipeline.build_train_iterator(config("jsonl", path), **kw)
    want = take(ref, 5)
    it = pipeline.build_train_iterator(config("jsonl", path, num_workers=2), **kw)
    try:
        got = take(it, 3)
        state = it.get_state()
        got += take(it, 2)
        metrics = it.metrics()
    finally:
        it.close()
    for a, b in zip(want, got, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert metrics == ref.metrics()
    # 10 distinct first-epoch records, plus the replacement's when it was not one of them.
    assert metrics["data/skipped_corrupt_image"] == 1
    assert metrics["data/records_seen"] in (10, 11)
    # The state does not depend on the number of workers: resume it in-process.
    it0 = pipeline.build_train_iterator(config("jsonl", path), **kw)
    it0.set_state(state)
    for a, b in zip(want[3:], take(it0, 2), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["sentences"], b["sentences"])
    assert it0.metrics() == metrics


# A user's own small dataset: 48 images, one corrupt, one with an empty caption (lines 6, 18).
OWN_BAD = {5: "corrupt_image", 17: "empty_caption"}


def own_data(tmp_path, **overrides):
    path, _ = make_jsonl(str(tmp_path), n=48, bad=OWN_BAD)
    defaults = pipeline.default_data_config()
    cfg = config(
        "jsonl", path, max_skip_fraction=defaults.max_skip_fraction,
        min_records_for_skip_check=defaults.min_records_for_skip_check,
    )  # fmt: skip
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


OWN_KW = dict(batch_size_per_process=4, seed=2, image_size=SIZE)  # 12 batches per epoch


def test_small_dataset_stops_in_first_epoch_naming_both_records(tmp_path, tok):
    it = pipeline.build_train_iterator(own_data(tmp_path), tokenizer=tok, **OWN_KW)
    with pytest.raises(pipeline.DataSkipError) as info:
        take(it, 12)
    text = str(info.value)
    assert text.startswith("2 of 48 distinct data records")  # not once per epoch, not >= 1000
    assert "corrupt_image: 1 record" in text and "empty_caption: 1 record" in text
    assert "data.jsonl:6: cannot decode image" in text and "data.jsonl:18: caption" in text
    assert "fix these records" in text and "data.max_skip_fraction=0.05" in text
    assert "python -m beta_clip_jax.data.prepare" in text


def test_small_dataset_counts_each_bad_record_once_over_epochs_and_resume(tmp_path, tok, caplog):
    cfg = own_data(tmp_path, max_skip_fraction=0.05)
    it = pipeline.build_train_iterator(cfg, tokenizer=tok, **OWN_KW)
    want = {"data/skipped_corrupt_image": 1, "data/skipped_empty_caption": 1}
    with caplog.at_level("WARNING"):
        first = take(it, 5)
        mid_pass = json.loads(json.dumps(it.get_state()))  # some records not seen yet
        first += take(it, 9)
        later = json.loads(json.dumps(it.get_state()))
        rest = take(it, 22)  # 36 batches: 3 epochs
    m = it.metrics()
    assert {k: m[k] for k in want} == want and m["data/records_seen"] == 48
    assert sum(v for k, v in m.items() if k.startswith("data/skipped_")) == 2
    skips = [r for r in caplog.records if "skipping unusable" in r.getMessage()]
    assert len(skips) == 2  # one warning per reason, not per read
    for state, expect in ((mid_pass, first[5:] + rest), (later, rest)):
        it2 = pipeline.build_train_iterator(cfg, tokenizer=tok, **OWN_KW)
        it2.set_state(state)
        for a, b in zip(expect, take(it2, len(expect)), strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        assert it2.metrics() == m  # the unique counts survive the restore
    # A checkpoint from before the ledger restores the order; the skip counts start over.
    old = {k: later[k] for k in ("next_batch", "counts", "records_seen", "examples")}
    it3 = pipeline.build_train_iterator(cfg, tokenizer=tok, **OWN_KW)
    it3.set_state(old)
    np.testing.assert_array_equal(next(it3)["image"], rest[0]["image"])
    assert sum(v for k, v in it3.metrics().items() if k.startswith("data/skipped_")) <= 2


def test_small_dataset_with_workers_matches_in_process(tmp_path, tok):
    cfg = own_data(tmp_path, max_skip_fraction=0.05)
    ref = pipeline.build_train_iterator(cfg, tokenizer=tok, **OWN_KW)
    want = take(ref, 26)
    it = pipeline.build_train_iterator(
        own_data(tmp_path, max_skip_fraction=0.05, num_workers=2), tokenizer=tok, **OWN_KW
    )
    try:
        got = take(it, 26)
    finally:
        it.close()
    for a, b in zip(want, got, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert it.metrics() == ref.metrics() and it.metrics()["data/skipped_corrupt_image"] == 1


class _FlakyProcessor:
    """Records 1 and 3 are unusable; counts reads per index."""

    def __init__(self):
        self.reads = {}

    def __call__(self, index, rng):
        self.reads[index] = self.reads.get(index, 0) + 1
        if index in (1, 3):
            raise pipeline._Skip("corrupt_image", f"record {index}: bad bytes")
        return {"x": np.int32(index), "truncated": np.zeros(3, np.int32)}


def test_loader_reads_a_bad_record_once_and_replaces_as_documented(tmp_path):
    proc = _FlakyProcessor()
    loader = pipeline.PositionLoader(proc, seed=7, first=0, length=6, max_attempts=100)
    fresh = pipeline.PositionLoader(_FlakyProcessor(), seed=7, first=0, length=6, max_attempts=100)
    got = [loader(pos, pos % 6) for pos in range(30)]  # 5 epochs, unshuffled
    assert proc.reads[1] == proc.reads[3] == 1
    bad = {1: "corrupt_image", 3: "corrupt_image"}.get
    for pos, example in enumerate(got):
        # Remembering a bad record changes no slot: a loader that never saw it agrees.
        assert int(example["x"]) == int(fresh(pos, pos % 6)["x"])
        assert not bad(int(example["x"])) and int(example["_offset"]) == int(example["x"])
        assert int(example["_counts"][1]) == len(example["_examples"].split("\n")) * bool(
            example["_examples"]
        )
    assert expected_skips(bad, range(30), (0, 1, 6), seed=7) == (
        {**dict.fromkeys(pipeline.SKIP_REASONS, 0), "corrupt_image": 2},
        6,
    )


def test_truncation_warns_once_per_level(tmp_path, tok, caplog):
    sents = ["a red car", "a blue sky " * 20]
    path, _ = make_jsonl(str(tmp_path), n=8, extra=lambda i: {"sentences": sents})
    cfg = config("jsonl", path, sentence_length=16)
    it = pipeline.build_train_iterator(
        cfg, batch_size_per_process=2, seed=0, image_size=SIZE, tokenizer=tok
    )
    with caplog.at_level("WARNING"):
        take(it, 6)
    cut = [r.getMessage() for r in caplog.records if "were cut" in r.getMessage()]
    assert len(cut) == 2  # caption and sentence, once each; no phrase is cut
    assert cut[0].startswith("2 caption texts so far") and "data.caption_length=32" in cut[0]
    assert "data.sentence_length=16" in cut[1] and "(default: data.text_length)" in cut[1]
    assert it.metrics()["data/truncated_sentence"] == 12
