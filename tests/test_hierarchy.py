"""Caption hierarchy: dedupe, split, sampling, phrases (β-CLIP's order), fixed-shape slots, and
the SV-1k hold-out of the b16_urban recipe."""

import json
import os

import numpy as np
import pytest
from ml_collections import config_flags
from PIL import Image

from beta_clip_jax.config_check import train_set_size
from beta_clip_jax.data import hierarchy as H
from beta_clip_jax.data import pipeline, prepare, sources
from beta_clip_jax.tokenizer import EOT, SOT, Tokenizer

LONG = (
    "The image captures a bustling city street at night. A red car is parked on the left side "
    "of the road, next to a tall building with glowing windows. A woman in a blue dress is "
    "leaning against a lamppost on the right. In the background, there are several trees and "
    "a clear sky. The overall scene gives a sense of urban life. A man sitting on a bench."
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_dedupe_repeated_substrings_and_words():
    stutter = "a dog " + "on the grass " * 6 + "and and the the sky is blue blue. " + "x" * 80
    # Only identical whitespace tokens merge ("blue" != "blue."); the lazy pattern keeps the
    # shortest repeating unit (10 x's, then 3 + 1 after the last pass), not the longest.
    assert H.dedupe_caption(stutter) == "a dog on the grass and the sky is blue blue. xxxx"
    assert H.dedupe_caption("x" * 80 + " " + "y" * 30) == "xxxx yyyy"
    assert H.dedupe_caption("ab" * 60) == "ab" * 5
    # Short captions only get the token merge.
    assert H.dedupe_caption("abcabcabcabc the the end") == "abcabcabcabc the end"


def test_dedupe_token_merge_is_exact():
    # Case and punctuation make tokens differ, so these stay.
    assert H.dedupe_caption("Red red car. The The. red red, blue") == (
        "Red red car. The The. red red, blue"
    )
    assert H.dedupe_caption("hello hello world world") == "hello world"
    # Every whitespace run becomes one space (2+ words); the ends are stripped.
    assert H.dedupe_caption("a\tb  c\nd ") == "a b c d"
    assert H.dedupe_caption("Hi  ") == "Hi"
    # Under 2 characters: unchanged.
    assert H.dedupe_caption(" ") == " " and H.dedupe_caption("a") == "a"


def test_dedupe_repeats_do_not_span_newlines():
    # "." does not match a newline, so "abc\ndef\n" is no repeating unit; only the whitespace
    # is normalised afterwards.
    assert H.dedupe_caption("abc\ndef\n" * 20) == " ".join(["abc def"] * 20)


def test_merge_and_clean_phrases_are_case_sensitive():
    phrases = ["The image", "a Cat", "a cat", "the image", "image", "the", "The", "a Cat", ""]
    assert H.merge_phrases(phrases) == ["The image", "a Cat", "a cat", "The"]
    # Whitespace differences are distinct strings for the exact merge, one for clean_phrases.
    assert H.merge_phrases(["a cat", "a  cat"]) == ["a cat", "a  cat"]
    assert H.clean_phrases([" a cat ", "a  cat", "The image"]) == ["a cat", "The image"]


def test_split_and_sample():
    sents = H.split_sentences("One. Two.  . Three. Four")
    assert sents == ["One", "Two", "Three", "Four"]
    sents = H.split_sentences("s0. s1. s2. s3. s4. s5. s6")
    assert len(sents) == 7
    rng = np.random.default_rng(0)
    picked = H.sample_sentences(sents, 5, rng)
    assert len(set(picked)) == 5 and set(picked) <= set(sents)
    # Fewer than max: all, in order.
    assert H.sample_sentences(sents[:3], 5, rng) == sents[:3]
    # Deterministic given the generator state.
    a = H.sample_sentences(sents, 5, np.random.default_rng(7))
    assert a == H.sample_sentences(sents, 5, np.random.default_rng(7))


def test_fallback_phrases():
    ph = H.extract_phrases_fallback(LONG)
    for expected in ["A red car", "a tall building", "a lamppost on the right", "leaning against"]:
        assert expected in ph
    for expected in ["next to", "on the left", "several trees", "a blue dress", "sitting on"]:
        assert expected in ph
    assert not set(ph) & H.DROPPED_PHRASES and len(set(ph)) == len(ph)
    # Noun chunks come first (reference category order), spatial relations last.
    assert ph.index("A red car") < ph.index("leaning against") < ph.index("next to")
    # The drop list is exact: "The image" / "The Image" are phrases, "the image" is not.
    assert ph[0] == "The image"
    assert H.extract_phrases_fallback("the image. The Image.") == ["The Image"]
    # A chunk extended over "on the right" is not repeated as "the right" (no overlaps).
    assert "a lamppost on the right" in ph and "the right" not in ph


def test_precomputed_phrases_filtered_to_sampled_sentences():
    sentences = ["a red car on the road", "a dog", "blue sky"]
    phrases = ["a red car", "The Road", "a dog", "the image", "blue sky", "a red car"]
    rng = np.random.default_rng(0)
    h = H.build_hierarchy("", rng, max_sentences=2, max_phrases=10, sentences=sentences)
    assert len(h.sentences) == 2
    h2 = H.build_hierarchy(
        "",
        np.random.default_rng(0),
        max_sentences=2,
        max_phrases=10,
        sentences=sentences,
        phrases=phrases,
    )
    assert h2.sentences == h.sentences and h2.caption == ". ".join(h.sentences)
    expected = [
        p for p in ["a red car", "The Road", "a dog", "blue sky"] if p.lower() in h2.caption.lower()
    ]
    assert h2.phrases == expected
    # All sentences sampled: every precomputed phrase is kept (cleaned), even if not verbatim.
    h3 = H.build_hierarchy(
        "",
        np.random.default_rng(0),
        max_sentences=5,
        max_phrases=10,
        sentences=sentences,
        phrases=phrases + ["red car on road"],
    )
    assert h3.sentences == sentences
    assert h3.phrases == ["a red car", "The Road", "a dog", "blue sky", "red car on road"]
    # "dog" inside "hotdog" is not a whole-word occurrence.
    assert H.phrases_in_text(["dog", "hot"], "a hotdog stand") == []


def test_build_hierarchy_from_long_caption():
    h = H.build_hierarchy(LONG, np.random.default_rng(3), max_sentences=5, max_phrases=4)
    assert len(h.sentences) == 5 and h.caption == ". ".join(h.sentences)
    assert len(h.phrases) == 4
    assert H.build_hierarchy("", np.random.default_rng(0), max_sentences=5, max_phrases=3) == (
        H.TextHierarchy("", [], [])
    )


def test_tokenize_slots(tok):
    h = H.TextHierarchy("cap one. cap two", ["cap one", "cap two"], ["cap", "one", "two"])
    lengths = dict(caption_length=16, sentence_length=12, phrase_length=6)
    out = H.tokenize_hierarchy(h, tok, max_sentences=5, max_phrases=4, **lengths)
    assert out["caption"].shape == (16,) and out["caption"].dtype == np.int32
    assert out["sentences"].shape == (5, 12) and out["sentences"].dtype == np.int32
    assert out["phrases"].shape == (4, 6) and out["phrases"].dtype == np.int32
    assert out["valid"].tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False]
    np.testing.assert_array_equal(out["caption"], tok.encode([h.caption], 16)[0])
    np.testing.assert_array_equal(out["sentences"][:2], tok.encode(h.sentences, 12))
    np.testing.assert_array_equal(out["phrases"][:3], tok.encode(h.phrases, 6))
    assert not out["sentences"][2:].any() and not out["phrases"][3:].any()
    assert out["caption"][0] == SOT and out["truncated"].tolist() == [0, 0, 0]
    long = H.TextHierarchy("word " * 40, ["word " * 40], [])
    lengths = dict(caption_length=8, sentence_length=10, phrase_length=6)
    out = H.tokenize_hierarchy(long, tok, max_sentences=1, max_phrases=0, **lengths)
    assert out["phrases"].shape == (0, 6) and out["valid"].shape == (2,)
    assert out["caption"][-1] == EOT and (out["sentences"][:, -1] == EOT).all()
    assert out["truncated"].tolist() == [1, 1, 0]  # counted per level


# --- per-sentence phrase groups (prepare.py's "sentence_phrases") ------------------------------


def group(noun=(), verb_adp=(), spatial=()):
    return {"noun": list(noun), "verb_adp": list(verb_adp), "spatial": list(spatial)}


def reference_order(picked_groups, max_phrases):
    """β-CLIP's list for a sampled caption, restated: every noun phrase of the sampled sentences
    in sampled order, then every verb+adp, then every spatial relation; exact de-dup, drop list,
    first `max_phrases`."""
    seen, out = set(), []
    for kind in ("noun", "verb_adp", "spatial"):
        for g in picked_groups:
            for p in g[kind]:
                if p not in seen:
                    seen.add(p)
                    if p not in ("the", "the image", "image"):
                        out.append(p)
    return out[:max_phrases]


def test_sentence_phrases_give_the_reference_order():
    sentences = ["The image shows a cat on the left", "A dog is leaning against a wall"]
    groups = [
        group(["The image", "a cat on the left"], [], ["on the left"]),
        group(["A dog", "a wall", "a cat on the left", "image"], ["leaning against"]),
    ]
    h = H.build_hierarchy(
        "", np.random.default_rng(0), max_sentences=5, max_phrases=30,
        sentences=sentences, sentence_phrases=groups,
    )  # fmt: skip
    # Fewer than 5 sentences: all, in order; nouns of both, then verb+adp, then spatial.
    assert h.sentences == sentences
    assert h.phrases == [
        "The image", "a cat on the left", "A dog", "a wall", "leaning against", "on the left",
    ]  # fmt: skip
    # The flat "phrases" are ignored when groups are present (they may come from older tools).
    h2 = H.build_hierarchy(
        "", np.random.default_rng(0), max_sentences=5, max_phrases=3,
        sentences=sentences, phrases=["x"], sentence_phrases=groups,
    )  # fmt: skip
    assert h2.phrases == ["The image", "a cat on the left", "A dog"]


def test_sentence_phrases_sampled_order_and_first_30():
    # 7 sentences, 8 noun phrases each: the 5 sampled give 40 nouns, so the first 30 are all
    # noun phrases, in sampled-sentence order; verb+adp and spatial ones are cut.
    sentences = [f"sentence {k}" for k in range(7)]
    groups = [
        group([f"noun {k}.{j}" for j in range(8)] + ["The dog"], [f"verb {k}"], [f"near {k}"])
        for k in range(7)
    ]
    by_sentence = dict(zip(sentences, groups, strict=True))
    for seed in range(5):
        h = H.build_hierarchy(
            "", np.random.default_rng(seed), max_sentences=5, max_phrases=30,
            sentences=sentences, sentence_phrases=groups,
        )  # fmt: skip
        assert len(h.sentences) == 5 and h.caption == ". ".join(h.sentences)
        assert h.phrases == reference_order([by_sentence[s] for s in h.sentences], 30)
        assert all(p.startswith(("noun", "The dog")) for p in h.phrases)
        first = by_sentence[h.sentences[0]]["noun"]
        assert h.phrases[: len(first)] == first  # the first sampled sentence leads
        # Same draws as a record without groups: the sentence sample does not change.
        plain = H.build_hierarchy(
            "", np.random.default_rng(seed), max_sentences=5, max_phrases=30, sentences=sentences
        )
        assert plain.sentences == h.sentences


def test_sentence_phrases_alignment_and_bad_groups():
    # An empty sentence is dropped together with its group.
    h = H.build_hierarchy(
        "", np.random.default_rng(0), max_sentences=5, max_phrases=30,
        sentences=["a cat", "  ", "a dog"],
        sentence_phrases=[group(["a cat"]), group(["ghost"]), group(["a dog"])],
    )  # fmt: skip
    assert h.sentences == ["a cat", "a dog"] and h.phrases == ["a cat", "a dog"]
    # No phrase at all: the hierarchy still has its sentences, the phrase list is empty.
    h = H.build_hierarchy(
        "", np.random.default_rng(0), max_sentences=5, max_phrases=30,
        sentences=["It is"], sentence_phrases=[group()],
    )  # fmt: skip
    assert h.sentences == ["It is"] and h.phrases == []
    kw = dict(max_sentences=5, max_phrases=3)
    with pytest.raises(ValueError, match="same length"):
        H.build_hierarchy("", np.random.default_rng(0), sentences=["a"], sentence_phrases=[], **kw)
    with pytest.raises(ValueError, match="same length"):
        H.build_hierarchy("a", np.random.default_rng(0), sentence_phrases=[group()], **kw)
    for bad in (["a cat"], {"nouns": ["a"]}, {"noun": "a cat"}, {"noun": [1]}):
        with pytest.raises(ValueError, match="sentence_phrases"):
            H.build_hierarchy(
                "", np.random.default_rng(0), sentences=["a"], sentence_phrases=[bad], **kw
            )


# --- SV-1k is held out once, whether training reads the json or the prepared JSONL -------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_sharegpt4v(root, n):
    """A ShareGPT4V-style json of n entries sharing one image; entry k says "number k"."""
    Image.new("RGB", (8, 8), (200, 30, 30)).save(os.path.join(root, "img.png"))
    caption = lambda k: {"value": f"A red car number {k}. A tall tree"}
    entries = [
        {"image": "img.png", "conversations": [{"value": "<image>"}, caption(k)]} for k in range(n)
    ]
    path = os.path.join(root, "share-captioner_filtered.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return path


def test_recipe_holds_out_sv1k_exactly_once(tmp_path):
    from beta_clip_jax.tokenizer import Tokenizer

    n, held_out = sources.SHAREGPT4V_HELD_OUT + 6, sources.SHAREGPT4V_HELD_OUT
    path = write_sharegpt4v(str(tmp_path), n)
    out = str(tmp_path / "train.jsonl")
    stats = prepare.prepare(path, "sharegpt4v", out, image_root=str(tmp_path), spacy_model=None)
    assert stats["skip_first"] == held_out and stats["written"] == n - held_out
    parser = config_flags.config_flags._ConfigFileParser(name="config")
    tok = Tokenizer()
    for config_file in ("b16_urban.py", "b16_urban_bce.py"):
        config = parser.parse(os.path.join(ROOT, "configs", config_file))
        assert config.data.name == "jsonl" and config.data.skip_first is None
        for name, data_path in (("jsonl", out), ("sharegpt4v", path)):
            data = config.data
            data.name, data.path, data.image_root = name, data_path, str(tmp_path)
            data.image_size, data.text_length, data.phrase_length = 8, 32, 8
            data.num_workers, data.pack_texts = 0, False  # read the captions back unpacked
            assert train_set_size(config) == n - held_out
            it = pipeline.build_train_iterator(
                data, batch_size_per_process=2, seed=0, tokenizer=tok, training=False,
                num_epochs=1,
            )  # fmt: skip
            rows = [tuple(row) for b in it for row in b["caption"]]
            want = [f"A red car number {k}. A tall tree" for k in range(held_out, n)]
            assert rows == [tuple(r) for r in tok.encode(want, 32)], (config_file, name)
