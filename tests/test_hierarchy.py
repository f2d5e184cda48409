"""Caption hierarchy (spec 3.2): dedupe, split, sampling, phrases, fixed-shape tokenisation."""

import numpy as np
import pytest

from beta_clip_jax.data import hierarchy as H
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
    out = H.dedupe_caption(stutter)
    assert out.count("on the grass") == 1
    assert "and and" not in out and "the the" not in out and "blue blue" not in out
    # Short captions only get the duplicate-word merge.
    assert H.dedupe_caption("abcabcabcabc the the end") == "abcabcabcabc the end"


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
    assert not {p.lower() for p in ph} & H.DROPPED_PHRASES
    assert len({p.lower() for p in ph}) == len(ph)
    # Noun chunks come first (reference category order), spatial relations last.
    assert ph.index("A red car") < ph.index("leaning against") < ph.index("next to")
    assert H.extract_phrases_fallback("the image. The Image.") == []


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
    out = H.tokenize_hierarchy(
        h, tok, max_sentences=5, max_phrases=4, text_length=16, phrase_length=6
    )
    assert out["sentences"].shape == (6, 16) and out["sentences"].dtype == np.int32
    assert out["phrases"].shape == (4, 6) and out["phrases"].dtype == np.int32
    assert out["valid"].tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False]
    np.testing.assert_array_equal(out["sentences"][:3], tok.encode([h.caption, *h.sentences], 16))
    np.testing.assert_array_equal(out["phrases"][:3], tok.encode(h.phrases, 6))
    assert not out["sentences"][3:].any() and not out["phrases"][3:].any()
    assert out["sentences"][0, 0] == SOT and int(out["truncated"]) == 0
    long = H.TextHierarchy("word " * 40, ["word " * 40], [])
    out = H.tokenize_hierarchy(
        long, tok, max_sentences=1, max_phrases=0, text_length=8, phrase_length=6
    )
    assert out["phrases"].shape == (0, 6) and out["valid"].shape == (2,)
    assert (out["sentences"][:, -1] == EOT).all() and int(out["truncated"]) == 2
