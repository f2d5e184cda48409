"""Tokenizer parity with transformers' CLIPTokenizer built from the same vocabulary."""

import pickle

import numpy as np
import pytest

from beta_clip_jax.tokenizer import EOT, SOT, VOCAB_SIZE, Tokenizer, bytes_to_unicode

TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "Hello, World!!! What's up? (yes) [no] {maybe}...",
    "it's they're we've I'm you'll he'd don't",
    "3.14159 and 1,000,000 items, 2nd place, 10x zoom",
    "naïve café — résumé 😀 日本語 Ελληνικά Straße",
    "tabs\tand\nnewlines   and     runs of spaces  ",
    "hyphen-ated words_with_underscores e-mail@example.com #hashtag",
    "",
    "🐶🐱🐭 emoji only",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_tok(tok):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer(vocab=dict(tok.encoder), merges=list(tok.merges))


def hf_ids(hf, text):
    return hf(text)["input_ids"]


def test_constants(tok, hf_tok):
    assert tok.vocab_size == VOCAB_SIZE == len(hf_tok)
    assert tok.encoder["<|startoftext|>"] == SOT == hf_tok.bos_token_id
    assert tok.encoder["<|endoftext|>"] == EOT == hf_tok.eos_token_id
    assert len(set(bytes_to_unicode().values())) == 256


@pytest.mark.parametrize("text", TEXTS)
def test_matches_hf(tok, hf_tok, text):
    ours = tok.encode([text], length=77)[0]
    ref = hf_ids(hf_tok, text)
    n = len(ref)
    assert ours[:n].tolist() == ref
    assert not ours[n:].any()


def test_html_unescaped_like_openai(tok, hf_tok):
    # HF's tokenizer does no HTML unescaping (OpenAI's does); compare on the unescaped text.
    escaped, plain = "&amp; html &lt;tags&gt; &quot;q&quot;", '& html <tags> "q"'
    assert np.array_equal(tok.encode([escaped]), tok.encode([plain]))
    ref = hf_ids(hf_tok, plain)
    assert tok.encode([escaped], length=77)[0][: len(ref)].tolist() == ref


def test_long_text_truncation_keeps_eot(tok, hf_tok):
    text = " ".join(f"word{i} is red" for i in range(200))
    length = 248
    ours = tok.encode([text, "short"], length=length)
    assert ours.shape == (2, length) and ours.dtype == np.int32
    full = hf_ids(hf_tok, text)
    assert len(full) > length
    # HF's own truncation cuts the content and re-appends EOT: the same as ours.
    ref = hf_tok(text, truncation=True, max_length=length)["input_ids"]
    assert ours[0].tolist() == ref
    assert ours[0, -1] == EOT and ours[0, 0] == SOT
    assert ours[0, :-1].tolist() == full[: length - 1]
    assert int(np.argmax(ours[0])) == length - 1


def test_exact_fit_and_edge_lengths(tok):
    ids = tok.encode_one("a red circle")
    exact = tok.encode(["a red circle"], length=len(ids) + 2)[0]
    assert exact.tolist() == [SOT, *ids, EOT]
    short = tok.encode(["a red circle"], length=2)[0]
    assert short.tolist() == [SOT, EOT]
    with pytest.raises(ValueError):
        tok.encode(["x"], length=1)


def test_decode_roundtrip_and_pickle(tok):
    text = "a large red circle in the top left, naïve café"
    ids = tok.encode([text], length=40)[0]
    assert tok.decode(ids).replace(" ,", ",") == text
    clone = pickle.loads(pickle.dumps(tok))
    assert np.array_equal(clone.encode([text]), tok.encode([text]))


def test_save_hf(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save_hf(str(tmp_path))
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:6]:
        ref = hf(text)["input_ids"]
        assert tok.encode([text], length=77)[0][: len(ref)].tolist() == ref
    assert hf.model_max_length == 248
