"""spaCy phrase rules (data/prepare.py) against an independent restatement of β-CLIP's rules, on
hand-parsed Docs (no spaCy model is loaded or downloaded), and the prepared JSONL they feed."""

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from beta_clip_jax.data import hierarchy as H
from beta_clip_jax.data import prepare, sources

# Hand parses: (word, POS, dependency label, head index), as en_core_web_sm would give them.
SENTENCES = {
    "cat": [
        ("The", "DET", "det", 1), ("image", "NOUN", "nsubj", 2), ("shows", "VERB", "ROOT", 2),
        ("a", "DET", "det", 4), ("cat", "NOUN", "dobj", 2), ("on", "ADP", "prep", 4),
        ("the", "DET", "det", 7), ("left", "NOUN", "pobj", 5), ("of", "ADP", "prep", 7),
        ("the", "DET", "det", 10), ("sofa", "NOUN", "pobj", 8),
    ],
    "woman": [
        ("A", "DET", "det", 1), ("woman", "NOUN", "nsubj", 3), ("is", "AUX", "aux", 3),
        ("leaning", "VERB", "ROOT", 3), ("against", "ADP", "prep", 3), ("a", "DET", "det", 6),
        ("lamppost", "NOUN", "pobj", 4), ("next", "ADV", "advmod", 3), ("to", "ADP", "prep", 7),
        ("the", "DET", "det", 10), ("car", "NOUN", "pobj", 8),
    ],
    "front": [
        ("In", "ADP", "prep", 7), ("front", "NOUN", "pobj", 0), ("of", "ADP", "prep", 1),
        ("the", "DET", "det", 4), ("building", "NOUN", "pobj", 2), (",", "PUNCT", "punct", 7),
        ("there", "PRON", "expl", 7), ("are", "AUX", "ROOT", 7), ("two", "NUM", "nummod", 10),
        ("red", "ADJ", "amod", 10), ("cars", "NOUN", "attr", 7),
    ],
    "dogs": [
        ("A", "DET", "det", 1), ("dog", "NOUN", "nsubj", 2), ("sits", "VERB", "ROOT", 2),
        ("on", "ADP", "prep", 2), ("the", "DET", "det", 5), ("left", "NOUN", "pobj", 3),
        ("and", "CCONJ", "cc", 2), ("a", "DET", "det", 8), ("dog", "NOUN", "nsubj", 9),
        ("sleeps", "VERB", "conj", 2), ("on", "ADP", "prep", 9), ("the", "DET", "det", 12),
        ("left", "NOUN", "pobj", 10),
    ],
    "boat": [
        ("There", "PRON", "expl", 1), ("is", "AUX", "ROOT", 1), ("a", "DET", "det", 5),
        ("small", "ADJ", "amod", 5), ("red", "ADJ", "amod", 5), ("boat", "NOUN", "attr", 1),
        ("in", "ADP", "prep", 5), ("the", "DET", "det", 8), ("middle", "NOUN", "pobj", 6),
        ("of", "ADP", "prep", 8), ("the", "DET", "det", 11), ("lake", "NOUN", "pobj", 9),
    ],
    "logo": [
        ("A", "DET", "det", 1), ("logo", "NOUN", "nsubjpass", 3), ("is", "AUX", "auxpass", 3),
        ("printed", "VERB", "ROOT", 3), ("on", "ADP", "prep", 3), ("the", "DET", "det", 6),
        ("image", "NOUN", "pobj", 4), ("near", "ADP", "prep", 3), ("the", "DET", "det", 11),
        ("top", "ADJ", "amod", 11), ("right", "ADJ", "amod", 11), ("corner", "NOUN", "pobj", 7),
    ],
    "case": [
        ("Next", "ADV", "advmod", 10), ("to", "ADP", "prep", 0), ("the", "DET", "det", 3),
        ("bench", "NOUN", "pobj", 1), (",", "PUNCT", "punct", 10), ("a", "DET", "det", 6),
        ("Dog", "PROPN", "nsubj", 10), ("and", "CCONJ", "cc", 6), ("a", "DET", "det", 9),
        ("dog", "NOUN", "conj", 6), ("play", "VERB", "ROOT", 10),
    ],
    "under": [
        ("A", "DET", "det", 1), ("cat", "NOUN", "nsubj", 2), ("hides", "VERB", "ROOT", 2),
        ("under", "ADP", "prep", 2), ("the", "DET", "det", 5), ("table", "NOUN", "pobj", 3),
        ("on", "ADP", "prep", 5), ("top", "NOUN", "pobj", 6), ("of", "ADP", "prep", 7),
        ("the", "DET", "det", 10), ("box", "NOUN", "pobj", 8),
    ],
    "next_adj": [  # "next" tagged ADJ: no "next to" (the rule wants ADV + ADP)
        ("A", "DET", "det", 1), ("cup", "NOUN", "nsubj", 2), ("is", "AUX", "ROOT", 2),
        ("next", "ADJ", "advmod", 2), ("to", "ADP", "prep", 3), ("the", "DET", "det", 6),
        ("plate", "NOUN", "pobj", 4),
    ],
    "none": [("Wow", "INTJ", "ROOT", 0)],
}  # fmt: skip

EXPECTED = {
    "cat": ["The image", "a cat on the left of", "the sofa", "on the left of"],
    "woman": ["A woman", "a lamppost", "the car", "leaning against", "next to"],
    "front": ["front", "the building", "two red cars", "in front of"],
    "dogs": ["A dog", "the left", "a dog", "sits on", "sleeps on", "on the left"],
    "logo": ["A logo", "the image near the top", "printed on", "near the top"],
    "case": ["the bench", "a Dog", "a dog", "next to"],
    "next_adj": ["A cup", "the plate"],
    "none": [],
}


@pytest.fixture(scope="module")
def vocab():
    spacy = pytest.importorskip("spacy")
    return spacy.blank("en").vocab


@pytest.fixture(scope="module")
def rules(vocab):
    return prepare.SpacyPhraseRules(vocab)


def make_doc(vocab, rows, final_space=False):
    from spacy.tokens import Doc

    words, pos, deps, heads = (list(x) for x in zip(*rows, strict=True))
    spaces = [i + 1 < len(words) and pos[i + 1] != "PUNCT" for i in range(len(words))]
    spaces[-1] = final_space
    return Doc(vocab, words=words, spaces=spaces, pos=pos, deps=deps, heads=heads)


# --- an independent restatement of the rules, over a string of "<POS|lower>" token codes --------

SIDES = "left|right|top|bottom|front|back|middle|center"
HEADS = SIDES + "|inside|outside|above|below|under|over|centered|frontside|backside|near|nearby|far"
NP_SIDE = re.compile(
    rf"(<DET\|[^>]*>)?(<(ADJ|NOUN|PROPN)\|[^>]*>)+<ADP\|[^>]*>(<[A-Z]+\|the>)?<[A-Z]+\|({SIDES})>"
    r"(<[A-Z]+\|of>)?"
)
SPATIAL = re.compile(
    rf"<ADV\|next><ADP\|to>|<ADP\|[^>]*>(<DET\|[^>]*>)?<[A-Z]+\|({HEADS})>(<ADP\|of>)?"
)


def codes(doc):
    return [f"<{t.pos_}|{t.text.lower()}>" for t in doc]


def reference_phrases(doc):
    """β-CLIP's phrase list of one parsed caption, from the documented rules."""
    from spacy.util import filter_spans

    c = codes(doc)
    # Every span the NP-side pattern matches, at any start and end (as spaCy's Matcher reports).
    sides = [
        doc[s:e]
        for s in range(len(c))
        for e in range(s + 1, len(c) + 1)
        if NP_SIDE.fullmatch("".join(c[s:e]))
    ]
    nouns = [s.text.strip() for s in filter_spans(list(doc.noun_chunks) + sides)]
    actions = [doc[i : i + 2].text for i in range(len(c) - 1) if re.fullmatch(
        r"<VERB\|[^>]*><ADP\|[^>]*>", c[i] + c[i + 1])]  # fmt: skip
    # Left to right, non-overlapping, first alternative first: what finditer does on the codes.
    relations = [
        " ".join(re.findall(r"\|([^>]*)>", m.group())) for m in SPATIAL.finditer("".join(c))
    ]
    relations = list(dict.fromkeys(relations))
    seen, out = set(), []
    for p in nouns + actions + relations:
        if p not in seen:
            seen.add(p)
            if p not in {"the", "the image", "image"}:
                out.append(p)
    return out


def test_rules_match_the_reference_and_hand_lists(vocab, rules):
    for name, rows in SENTENCES.items():
        doc = make_doc(vocab, rows)
        assert doc.has_annotation("DEP") and doc.has_annotation("POS")
        got = rules.phrases(doc)
        assert got == reference_phrases(doc), name
        if name in EXPECTED:
            assert got == EXPECTED[name], name
        groups = rules.groups(doc)
        assert set(groups) == set(H.PHRASE_CATEGORIES)
        assert H.merge_phrase_groups([groups]) == got
    groups = rules.groups(make_doc(vocab, SENTENCES["woman"]))
    assert groups == {
        "noun": ["A woman", "a lamppost", "the car"],
        "verb_adp": ["leaning against"],
        "spatial": ["next to"],
    }
    # Spatial relations are lower-cased, noun phrases keep their case.
    assert rules.groups(make_doc(vocab, SENTENCES["front"]))["spatial"] == ["in front of"]


def test_phrases_of_a_joined_caption_come_from_sentence_groups(vocab, rules):
    """β-CLIP parses the sampled sentences joined with ". "; with the same parse of each
    sentence, its list equals the merge of the per-sentence groups in sampled order."""
    from spacy.tokens import Doc

    names = [n for n in SENTENCES if n != "none"]
    docs = {n: make_doc(vocab, SENTENCES[n]) for n in names}
    texts = [docs[n].text for n in names]
    by_text = dict(zip(texts, names, strict=True))
    groups = [rules.groups(docs[n]) for n in names]
    period = Doc(vocab, words=["."], spaces=[True], pos=["PUNCT"], deps=["ROOT"], heads=[0])
    for seed in range(4):
        for max_phrases in (30, 7):
            h = H.build_hierarchy(
                "", np.random.default_rng(seed), max_sentences=5, max_phrases=max_phrases,
                sentences=texts, sentence_phrases=groups,
            )  # fmt: skip
            parts = []
            for text in h.sentences:
                parts += [docs[by_text[text]], period]
            joined = Doc.from_docs(parts[:-1], ensure_whitespace=False)
            assert joined.text == h.caption
            assert h.phrases == reference_phrases(joined)[:max_phrases]


class FakeNLP:
    """Stands in for a loaded model: returns the hand-parsed Doc of each sentence."""

    def __init__(self, docs):
        self.docs = {d.text: d for d in docs}

    def pipe(self, texts, batch_size, n_process):
        for t in texts:
            yield self.docs[t]


def test_prepare_writes_sentence_groups_and_keeps_phrase_less_records(
    tmp_path, vocab, rules, monkeypatch
):
    docs = {n: make_doc(vocab, rows) for n, rows in SENTENCES.items()}
    extractor = object.__new__(prepare.SpacyExtractor)
    extractor.nlp, extractor.rules = FakeNLP(docs.values()), rules
    monkeypatch.setattr(prepare, "make_extractor", lambda model: (extractor, "spaCy (hand)"))
    records = [["cat", "woman"], ["none"], ["front", "dogs", "logo"]]
    captions = [". ".join(docs[n].text for n in names) for names in records]
    Image.new("RGB", (4, 4)).save(tmp_path / "img.jpg")  # prepare decodes every image
    inputs = {
        "sharegpt4v": [
            {"image": "img.jpg", "conversations": [{"value": "<image>"}, {"value": c}]}
            for c in captions
        ],
        "jsonl": [{"image": "img.jpg", "caption": c} for c in captions],
    }
    for fmt, entries in inputs.items():
        src = tmp_path / f"in.{fmt}"
        if fmt == "jsonl":
            src.write_text("".join(json.dumps(e) + "\n" for e in entries))
        else:
            src.write_text(json.dumps(entries))
        out = str(tmp_path / f"{fmt}.jsonl")
        skip = 0 if fmt == "sharegpt4v" else None  # jsonl input: nothing is held out by default
        stats = prepare.prepare(str(src), fmt, out, str(tmp_path), "x", skip_first=skip)
        assert stats["written"] == 3 and stats["skip_first"] == 0
        assert stats["dropped_bad_caption"] == stats["dropped_missing_image"] == 0
        with open(out, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        for line, names in zip(lines, records, strict=True):
            assert line["sentences"] == [docs[n].text for n in names]
            assert line["sentence_phrases"] == [rules.groups(docs[n]) for n in names]
            assert line["phrases"] == H.merge_phrase_groups(line["sentence_phrases"])
        # The phrase-less record is written with empty groups, not dropped.
        assert lines[1]["sentence_phrases"] == [{"noun": [], "verb_adp": [], "spatial": []}]
        # The JSONL source passes the groups on, and the hierarchy merges them in order.
        record = sources.JsonlSource(out, str(tmp_path))[0]
        h = H.build_hierarchy(
            record["caption"], np.random.default_rng(0), max_sentences=5, max_phrases=30,
            sentences=record["sentences"], sentence_phrases=record["sentence_phrases"],
        )  # fmt: skip
        assert h.phrases == [
            "The image", "a cat on the left of", "the sofa", "A woman", "a lamppost", "the car",
            "leaning against", "on the left of", "next to",
        ]  # fmt: skip


def test_extractor_falls_back_without_spacy_or_model(monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "spacy", None)  # spaCy not importable at all
        ext, how = prepare.make_extractor("en_core_web_sm")
        assert ext is None and "unavailable" in how
    pytest.importorskip("spacy")
    # A model package that is not installed: spaCy says so without downloading anything.
    ext, how = prepare.make_extractor("en_core_web_sm_not_installed")
    assert ext is None and how.startswith("fallback heuristic")
