"""Bad training records, one of each kind, and seeded random ones: each is a counted skip under
its reason (or a good record, cut and counted), the run goes on, every good record comes
through, no exception escapes, and no path outside the image root is opened.

The records go through what training runs: `pipeline.build_train_iterator` over JSONL and
ShareGPT4V files (decode, hierarchy, tokeniser, skip ledger), in order (training=False), one
record per batch and one epoch, so every record is read at its own position.
"""

import json
import os
import random
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_data_sources import write_jpeg

from beta_clip_jax.data import pipeline, sources
from beta_clip_jax.tokenizer import EOT, Tokenizer

SIZE = 24
LONG_CAPTION_CHARS = 100_000


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int) -> bytes:
    """A 1-bit PNG whose header declares width x height but holds one row of pixels: a few
    hundred bytes that a decoder would blow up to width * height bytes (and 3x that as RGB)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + (width + 7) // 8))
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + _chunk(b"IHDR", header) + _chunk(b"IDAT", row) + _chunk(b"IEND", b"")


def config(name, path, image_root=None, **overrides):
    cfg = pipeline.default_data_config()
    cfg.name, cfg.path, cfg.image_root = name, path, image_root
    cfg.max_sentences, cfg.max_phrases = 3, 4
    cfg.text_length, cfg.phrase_length = 32, 8
    cfg.max_skip_fraction = 1.0  # never stop: every record is judged
    cfg.min_records_for_skip_check = 1
    cfg.num_threads = 1
    cfg.pack_texts = False
    cfg.skip_first = 0
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def read_all(cfg, tok):
    """(batches, iterator) of one in-order epoch, one record per batch."""
    it = pipeline.build_train_iterator(
        cfg, batch_size_per_process=1, seed=0, image_size=SIZE, tokenizer=tok, training=False,
        num_epochs=1,
    )  # fmt: skip
    return list(it), it


def caption_tags(batches, tok):
    """The tag word (second word) of each batch's caption: which good record it holds."""
    return {tok.decode(b["caption"][0]).split()[1] for b in batches}


def letters_tag(prefix: str, i: int) -> str:
    """A tag the tokeniser keeps as one word (digits would split off)."""
    return prefix + "".join("abcdefghij"[int(d)] for d in str(i))


def good_caption(tag: str) -> str:
    return f"photo {tag} of a red car parked near a tall tree"


@pytest.fixture
def spy_opened(monkeypatch):
    """Every image source `open_image` is asked to open (the one gate to image files) and the
    size of every image PIL decodes."""
    opened, decoded = [], []
    open_image, load = sources.open_image, ImageFile.ImageFile.load

    def spy_open(src, *args, **kwargs):
        opened.append(src)
        return open_image(src, *args, **kwargs)

    def spy_load(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(sources, "open_image", spy_open)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    return opened, decoded


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_image_files(root, outside):
    """Good JPEGs, one file of each bad image kind under root, and a real image outside it."""
    for i in range(4):
        write_jpeg(os.path.join(root, f"images/good_{i}.jpg"), i)
    rng = np.random.default_rng(0)
    _write(os.path.join(root, "images/random.jpg"), rng.bytes(2048))
    _write(os.path.join(root, "images/empty.png"), b"")
    _write(os.path.join(root, "images/bomb.png"), declared_png(30_000, 30_000))
    _write(os.path.join(root, "images/huge.png"), declared_png(10_000, 10_000))
    write_jpeg(os.path.join(outside, "secret.jpg"), 99)
    return os.path.join(outside, "secret.jpg")


def long_text(start: str, chars: int = LONG_CAPTION_CHARS) -> str:
    """`start` and then seeded random words (no stutter for de-duplication to remove, no
    ". " to split at) up to `chars` characters."""
    rng = random.Random(0)
    words = "red blue car tree road sky tall small leaf wheel door near under with".split()
    text = start
    while len(text) < chars:
        text += " " + " ".join(rng.choice(words) for _ in range(1000))
    return text[:chars]


def jsonl_line(value) -> bytes:
    return json.dumps(value).encode()  # ASCII: escapes keep controls and surrogates as text


def jsonl_cases(secret):
    """(kind, line bytes, expected skip reason or None for a good record)."""
    img = "images/good_0.jpg"

    def good(tag, **extra):
        return {"image": f"images/good_{len(tag) % 4}.jpg", "caption": good_caption(tag), **extra}

    long_caption = long_text(good_caption("long"))
    return [
        ("good", jsonl_line(good("alpha")), None),
        ("good", jsonl_line(good("beta", phrases=["a red car"])), None),
        ("good", jsonl_line(good("gamma", sentences=[good_caption("gamma")])), None),
        ("long_caption", jsonl_line({"image": img, "caption": long_caption}), None),
        (
            "control_chars",
            jsonl_line({"image": img, "caption": "photo ctrl\x00\x07\x1b\x7f of a red car"}),
            None,
        ),  # fmt: skip
        ("lone_surrogate", jsonl_line({"image": img, "caption": "photo sur\ud800 of a car"}), None),
        (
            "random_bytes_image",
            jsonl_line({"image": "images/random.jpg", "caption": "x"}),
            "corrupt_image",
        ),  # fmt: skip
        ("empty_file", jsonl_line({"image": "images/empty.png", "caption": "x"}), "corrupt_image"),
        ("png_bomb", jsonl_line({"image": "images/bomb.png", "caption": "x"}), "image_too_large"),
        (
            "10000x10000",
            jsonl_line({"image": "images/huge.png", "caption": "x"}),
            "image_too_large",
        ),  # fmt: skip
        (
            "missing_file",
            jsonl_line({"image": "images/nope.jpg", "caption": "x"}),
            "missing_image",
        ),  # fmt: skip
        (
            "only_controls",
            jsonl_line({"image": img, "caption": "\x00\x01\x1b\x7f\x9f"}),
            "empty_caption",
        ),  # fmt: skip
        (
            "raw_control_in_json",
            b'{"image": "%s", "caption": "a\x01car"}' % img.encode(),
            "bad_record",
        ),  # fmt: skip
        (
            "invalid_utf8_caption",
            b'{"image": "%s", "caption": "a \xff\xfe car"}' % img.encode(),
            "bad_utf8",
        ),  # fmt: skip
        ("non_utf8_line", b"\xff\xfe\x00{" + bytes(range(128, 250)), "bad_utf8"),
        ("caption_number", jsonl_line({"image": img, "caption": 3.5}), "non_text_caption"),
        ("caption_list", jsonl_line({"image": img, "caption": ["a", "car"]}), "non_text_caption"),
        ("caption_null", jsonl_line({"image": img, "caption": None}), "non_text_caption"),
        ("image_number", jsonl_line({"image": 7, "caption": "a car"}), "bad_record"),
        ("image_null", jsonl_line({"image": None, "caption": "a car"}), "bad_record"),
        (
            "phrases_string",
            jsonl_line({"image": img, "caption": "a car", "phrases": "a car"}),
            "bad_record",
        ),  # fmt: skip
        (
            "phrases_number",
            jsonl_line({"image": img, "caption": "a car", "phrases": 4}),
            "bad_record",
        ),  # fmt: skip
        (
            "sentences_mixed",
            jsonl_line({"image": img, "caption": "a", "sentences": ["a", 1]}),
            "bad_record",
        ),  # fmt: skip
        (
            "groups_number",
            jsonl_line({"image": img, "caption": "a", "sentences": ["a"], "sentence_phrases": 5}),
            "bad_record",
        ),  # fmt: skip
        ("missing_caption", jsonl_line({"image": img}), "bad_record"),
        ("missing_image_key", jsonl_line({"caption": "a car"}), "bad_record"),
        ("not_an_object", jsonl_line([img, "a car"]), "bad_record"),
        ("cut_json", b'{"image": "%s", "capt' % img.encode(), "bad_record"),
        ("deep_nesting", b"[" * 100_000, "bad_record"),
        (
            "dotdot_path",
            jsonl_line({"image": "../outside/secret.jpg", "caption": "a car"}),
            "unsafe_path",
        ),  # fmt: skip
        (
            "inner_dotdot",
            jsonl_line({"image": "images/../../outside/secret.jpg", "caption": "a car"}),
            "unsafe_path",
        ),  # fmt: skip
        ("absolute_path", jsonl_line({"image": secret, "caption": "a car"}), "unsafe_path"),
        (
            "nul_in_path",
            jsonl_line({"image": img + "\x00.png", "caption": "a car"}),
            "unsafe_path",
        ),  # fmt: skip
    ]


def test_each_bad_jsonl_kind_is_one_counted_skip(tmp_path, tok, spy_opened):
    root, outside = str(tmp_path / "data"), str(tmp_path / "outside")
    secret = make_image_files(root, outside)
    cases = jsonl_cases(secret)
    path = os.path.join(root, "data.jsonl")
    _write(path, b"\n".join(line for _, line, _ in cases) + b"\n")
    start = time.perf_counter()
    # image_root set explicitly: absolute paths are refused too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        batches, it = read_all(config("jsonl", path, root), tok)
    assert time.perf_counter() - start < 60  # the 100k-character caption costs no minutes
    assert len(batches) == len(cases)  # no exception, every slot filled
    want = {i: reason for i, (_, _, reason) in enumerate(cases) if reason}
    assert it.ledger.bad == want  # each bad record once, under its reason
    m = it.metrics()
    for reason in pipeline.SKIP_REASONS:
        assert m[f"data/skipped_{reason}"] == list(want.values()).count(reason), reason
    assert m["data/records_seen"] == len(cases)
    # Every good record came through (the bad ones' slots hold good replacements).
    assert caption_tags(batches, tok) == {"alpha", "beta", "gamma", "long", "ctrl", "sur"}
    # The 100k-character caption is kept, cut to its 32 tokens, and counted as cut.
    assert m["data/truncated_caption"] >= 1 and m["data/truncated_sentence"] >= 1
    # Nothing outside the root was opened, and no image over the pixel limit was decoded.
    opened, decoded = spy_opened
    assert not [src for src in opened if "outside" in str(src) or "\x00" in str(src)]
    assert max(w * h for w, h in decoded) <= sources.DEFAULT_MAX_IMAGE_PIXELS
    assert {os.path.basename(str(s)) for s in opened} >= {"random.jpg", "empty.png", "huge.png"}


def sharegpt4v_entry(image, value="A photo of a car.", **extra):
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": value}]
    return {"image": image, "conversations": turns, **extra}


def test_each_bad_sharegpt4v_kind_is_one_counted_skip(tmp_path, tok, spy_opened):
    root, outside = str(tmp_path / "data"), str(tmp_path / "outside")
    secret = make_image_files(root, outside)
    img = "images/good_1.jpg"
    dump = lambda v: json.dumps(v).encode()  # noqa: E731
    cases = [
        (dump(sharegpt4v_entry(img, good_caption("one"))), None),
        (dump(sharegpt4v_entry("images/good_2.jpg", good_caption("two") + "\nsecond line")), None),
        (dump(sharegpt4v_entry(img, 5)), "non_text_caption"),
        (dump(sharegpt4v_entry(img, None)), "non_text_caption"),
        (dump({"image": img}), "bad_record"),
        (dump({"image": img, "conversations": [{"value": "only one"}]}), "bad_record"),
        (dump({"image": img, "conversations": "a car"}), "bad_record"),
        (dump({"image": img, "conversations": [{}, {"from": "gpt"}]}), "bad_record"),
        (dump(sharegpt4v_entry(12)), "bad_record"),
        (dump("just a string"), "bad_record"),
        (dump(sharegpt4v_entry(img)).replace(b"A photo", b"A \xff photo"), "bad_utf8"),
        (dump(sharegpt4v_entry(img)).replace(b"A photo", b"A \x02 photo"), "bad_record"),
        (dump(sharegpt4v_entry("../outside/secret.jpg")), "unsafe_path"),
        (dump(sharegpt4v_entry(secret)), "unsafe_path"),
        (dump(sharegpt4v_entry("images/bomb.png")), "image_too_large"),
        (dump(sharegpt4v_entry("images/random.jpg")), "corrupt_image"),
    ]
    path = os.path.join(root, "share.json")
    _write(path, b"\xef\xbb\xbf[\n" + b",\n".join(c for c, _ in cases) + b"\n]\n")  # with a BOM
    batches, it = read_all(config("sharegpt4v", path, root), tok)
    assert len(batches) == len(cases)
    assert it.ledger.bad == {i: reason for i, (_, reason) in enumerate(cases) if reason}
    assert caption_tags(batches, tok) == {"one", "two"}
    assert not [src for src in spy_opened[0] if "outside" in str(src)]


def test_broken_sharegpt4v_array_names_file_and_entry(tmp_path):
    path = tmp_path / "share.json"
    path.write_bytes(b'[{"image": "a.jpg"}, {"image": "b.jpg", oops}]')
    with pytest.raises(ValueError, match=r"share\.json: not a valid JSON array from byte 21 "):
        sources.ShareGPT4VSource(str(path), str(tmp_path))


def test_paths_without_a_configured_root(tmp_path):
    """No data.image_root: the JSONL's folder is the root, absolute paths are the file's own
    layout, and ".." still may not climb out of the folder."""
    lines = [{"image": "/abs/x.jpg", "caption": "a"}, {"image": "sub/../x.jpg", "caption": "a"},
             {"image": "../x.jpg", "caption": "a"}, {"image": "", "caption": "a"}]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    source = sources.JsonlSource(str(path))
    assert source[0]["image_path"] == "/abs/x.jpg"
    assert source[1]["image_path"] == os.path.join(str(tmp_path), "sub/../x.jpg")
    with pytest.raises(sources.UnsafePathError, match="leaves the image root"):
        source[2]
    with pytest.raises(ValueError, match="non-empty path string"):
        source[3]
    configured = sources.JsonlSource(str(path), str(tmp_path))
    with pytest.raises(sources.UnsafePathError, match="absolute image path"):
        configured[0]


def test_pixel_limit_is_checked_from_the_header(tmp_path, tok, spy_opened):
    """data.max_image_pixels refuses a real, decodable image over it without decoding it; PIL's
    decompression-bomb warning is a refusal whatever the warning filters say."""
    write_jpeg(str(tmp_path / "a.jpg"), 0, size=(40, 48))
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "caption": "a red car"}) + "\n")
    cfg = config("jsonl", str(path), max_image_pixels=40 * 48 - 1)
    source = sources.make_source(cfg, SIZE)
    processor = pipeline.RecordProcessor(source, tok, cfg, image_size=SIZE, training=False)
    with pytest.raises(pipeline._Skip, match="40 x 48 = 1920 pixels") as info:
        processor(0, np.random.default_rng(0))
    assert info.value.reason == "image_too_large" and spy_opened[1] == []
    cfg.max_image_pixels = 40 * 48
    processor = pipeline.RecordProcessor(source, tok, cfg, image_size=SIZE, training=False)
    assert processor(0, np.random.default_rng(0))["image"].shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="max_image_pixels must be a positive number"):
        pipeline.RecordProcessor(
            source, tok, config("jsonl", str(path), max_image_pixels=0), image_size=SIZE,
            training=False,
        )  # fmt: skip
    # 10000 x 10000 lies between PIL's warning and its error: refused under any filter, and
    # even with a limit above PIL's (the limit is capped at Image.MAX_IMAGE_PIXELS).
    huge, bomb = declared_png(10_000, 10_000), declared_png(30_000, 30_000)
    for action in ("error", "ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            for limit in (sources.DEFAULT_MAX_IMAGE_PIXELS, 10**12, None):
                for data in (huge, bomb):
                    with pytest.raises(sources.ImageTooLargeError):
                        sources.open_image(data, max_pixels=limit)
    assert sources.pixel_limit(10**12) == Image.MAX_IMAGE_PIXELS
    (tmp_path / "huge.png").write_bytes(huge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert sources.image_problem(str(tmp_path / "huge.png"))[0] == "image_too_large"
    assert sources.image_problem(str(tmp_path))[0] == "corrupt_image"  # a directory
    assert max((w * h for w, h in spy_opened[1]), default=0) <= 40 * 48


def test_long_texts_tokenise_fast_and_as_if_whole(tok):
    """A text is cut at a character budget before BPE: for real words the rows equal encoding
    the whole text and cutting it; a 100,000-letter word costs no minutes."""
    rng = random.Random(0)
    words = "a red car, parked near the tall tree; its 4 wheels & many leaves!".split()
    text = " ".join(rng.choice(words) for _ in range(LONG_CAPTION_CHARS // 5))
    for length in (8, 77, 248):
        whole = [49406, *tok.encode_one(text), EOT][:length]
        whole[-1] = EOT
        assert tok.encode(text, length)[0].tolist() == whole
    spaced = "a red car" + " " * LONG_CAPTION_CHARS + "on a road"
    assert tok.decode(tok.encode(spaced, 16)[0]) == "a red car on a road"  # spaces cost nothing
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(LONG_CAPTION_CHARS))
    start = time.perf_counter()
    row = tok.encode(letters, 248)[0]
    assert time.perf_counter() - start < 5 and row[-1] == EOT and row.all()
    # A word of up to 256 characters is BPE'd whole, as OpenAI's tokenizer does; a longer one
    # in pieces, the end-of-word mark on the last only.
    assert tok.encode_one(letters[:256]) == list(tok._piece_ids(letters[:256]))
    pieces = [*tok._piece_ids(letters[:256], word_end=False), *tok._piece_ids(letters[256:300])]
    assert tok.encode_one(letters[:300]) == pieces


def random_json(rng: random.Random, depth=0):
    """A random JSON value: numbers, strings with controls and surrogates, lists, objects."""
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 1e308, 2**70, float("nan")])
    if kind in (1, 2, 3):
        alphabet = "abc ./\\\x00\x01\x1b\x7f\x9f\u200b\ud800\udcff\u00e9\U0001f600\n\t."
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    if kind in (4, 5):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["image", "caption", "phrases", "sentences", "sentence_phrases", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def random_record(rng: random.Random, i: int) -> tuple[bytes, bool]:
    """(line, known good): good records, random bytes, random JSON values and records whose
    fields are random JSON values."""
    kind = i % 4
    if kind == 0:
        return jsonl_line(
            {"image": "images/good_0.jpg", "caption": good_caption(letters_tag("g", i))}
        ), True
    if kind == 1:
        line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        return line.replace(b"\n", b" ").replace(b"\r", b" "), False
    if kind == 2:
        return json.dumps(random_json(rng)).encode(), False
    fields = {
        "image": rng.choice(["images/good_1.jpg", "images/random.jpg", "../x.jpg", "/etc/passwd",
                             "images", random_json(rng)]),
        "caption": rng.choice([good_caption(letters_tag("r", i)), random_json(rng)]),
    }  # fmt: skip
    for key in ("phrases", "sentences", "sentence_phrases"):
        if rng.random() < 0.3:
            fields[key] = random_json(rng)
    return json.dumps(fields).encode(), False


@pytest.mark.parametrize("seed", [1, 2])
def test_random_records_are_good_or_counted(tmp_path, tok, seed):
    root = str(tmp_path)
    make_image_files(root, str(tmp_path / "outside"))
    rng = random.Random(seed)
    records = [random_record(rng, i) for i in range(48)]
    path = os.path.join(root, "data.jsonl")
    _write(path, b"\n".join(line for line, _ in records) + b"\n")
    batches, it = read_all(config("jsonl", path, root), tok)
    assert len(batches) == len(records)  # no exception escaped, no slot left empty
    m = it.metrics()
    assert m["data/records_seen"] == len(records)
    assert sum(m[f"data/skipped_{r}"] for r in pipeline.SKIP_REASONS) == len(it.ledger.bad)
    assert set(it.ledger.bad.values()) <= set(pipeline.SKIP_REASONS)
    assert not {i for i, (_, good) in enumerate(records) if good} & set(it.ledger.bad)
    good_tags = {letters_tag("g", i) for i, (_, good) in enumerate(records) if good}
    assert good_tags <= caption_tags(batches, tok)


def test_counters_of_the_layout_before_new_reasons_restore_by_name():
    """A state saved before image_too_large / unsafe_path has 10 counters and no names: the
    truncation and packing totals come back under their names."""
    old = [0] * 6 + [3, 4, 5, 6]  # six skip reasons, caption, sentence, phrase, pack_dropped
    it = pipeline.TrainIterator(None, config("jsonl", "unused"))
    it.set_state({"next_batch": 2, "counts": old})
    m = it.metrics()
    assert [m[f"data/truncated_{x}"] for x in ("caption", "sentence", "phrase")] == [3, 4, 5]
    assert m["data/pack_dropped_phrases"] == 6
    state = json.loads(json.dumps(it.get_state()))
    assert state["counter_names"] == list(pipeline.COUNTERS)
    again = pipeline.TrainIterator(None, config("jsonl", "unused"))
    again.set_state(state)
    assert again.metrics() == m
