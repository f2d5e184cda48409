"""Offline phrase extraction: ShareGPT4V JSON or JSONL captions -> our training JSONL.

    python -m beta_clip_jax.data.prepare --input=share-captioner_coco_lcs_sam_1246k_1107.json \
        --format=sharegpt4v --image_root=/data/sharegpt4v --out=train.jsonl [--spacy_model=...]

Each output line is {"image": relative path, "caption": str, "sentences": [...], "phrases": [...]}:
the caption de-duplicated (spec 3.2 step 1), split naively on ". ", and the phrases of the whole
caption. The training pipeline samples sentences from it and keeps the phrases that occur in them.
Phrases come from spaCy (noun chunks + the reference's extra patterns, spec 3.2 step 5) when spaCy
and the model are importable, otherwise from the dependency-free fallback in data/hierarchy.py;
the summary says which. ShareGPT4V input skips its first 1000 entries (SV-1k) by default.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

from absl import app, flags

from beta_clip_jax.data import hierarchy

_SIDE_WORDS = ["left", "right", "top", "bottom", "front", "back", "middle", "center"]
_SPATIAL_WORDS = _SIDE_WORDS + [
    "inside", "outside", "above", "below", "under", "over", "centered", "frontside",
    "backside", "near", "nearby", "far",
]  # fmt: skip


def read_entries(path: str, fmt: str, skip_first: int):
    """(image, caption) pairs of the input, after the first `skip_first`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path!r} not found")
    if fmt == "sharegpt4v":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for entry in data[skip_first:]:
            try:
                caption = entry["conversations"][1]["value"]
            except (KeyError, IndexError, TypeError):
                caption = None
            if isinstance(caption, str):
                caption = caption.replace("\n", " ")
            yield entry.get("image"), caption
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            lines = (line for line in f if line.strip())
            for i, line in enumerate(lines):
                if i >= skip_first:
                    entry = json.loads(line)
                    yield entry.get("image"), entry.get("caption")
    else:
        raise ValueError(f"--format must be sharegpt4v or jsonl, got {fmt!r}")


def split_caption(caption: str) -> list[str]:
    """The caption's sentences after de-duplication (what training samples from)."""
    return hierarchy.split_sentences(hierarchy.dedupe_caption(caption))


def fallback_phrases(sentences: list[str]) -> list[str]:
    return hierarchy.extract_phrases_fallback(". ".join(sentences))


class SpacyExtractor:
    """Phrases as the reference builds them, on one spaCy Doc of the joined caption.

    (a) noun chunks plus "[DET] (ADJ|NOUN|PROPN)+ ADP [the] <side> [of]" spans, longest
    non-overlapping kept (`filter_spans`), in text order; (b) VERB+ADP bigrams; (c) "next to" and
    "ADP [DET] <spatial word> [of]" spans (longest match). Then de-duplicated, stop-phrases dropped.
    """

    def __init__(self, model: str):
        import spacy
        from spacy.matcher import Matcher

        self.nlp = spacy.load(model, disable=["ner", "lemmatizer"])
        self.name = f"spaCy {spacy.__version__} {model} {self.nlp.meta.get('version', '')}"
        self.sides, self.spatial = Matcher(self.nlp.vocab), Matcher(self.nlp.vocab)
        self.sides.add(
            "np_side",
            [
                [
                    {"POS": "DET", "OP": "?"},
                    {"POS": {"IN": ["ADJ", "NOUN", "PROPN"]}, "OP": "+"},
                    {"POS": "ADP"},
                    {"LOWER": "the", "OP": "?"},
                    {"LOWER": {"IN": _SIDE_WORDS}},
                    {"LOWER": "of", "OP": "?"},
                ]
            ],
        )
        self.spatial.add(
            "spatial",
            [
                [{"LOWER": "next"}, {"LOWER": "to"}],
                [
                    {"POS": "ADP"},
                    {"POS": "DET", "OP": "?"},
                    {"LOWER": {"IN": _SPATIAL_WORDS}},
                    {"LOWER": "of", "OP": "?"},
                ],
            ],
        )

    def phrases(self, doc) -> list[str]:
        from spacy.util import filter_spans

        side_spans = [doc[s:e] for _, s, e in self.sides(doc)]
        nps = sorted(filter_spans(list(doc.noun_chunks) + side_spans), key=lambda s: s.start)
        verb_adp = [
            f"{t.text} {doc[t.i + 1].text}"
            for t in doc[:-1]
            if t.pos_ == "VERB" and doc[t.i + 1].pos_ == "ADP"
        ]
        spatial = filter_spans([doc[s:e] for _, s, e in self.spatial(doc)])
        spatial = sorted(spatial, key=lambda s: s.start)
        texts = [s.text for s in nps] + verb_adp + [s.text for s in spatial]
        return hierarchy.clean_phrases(texts)

    def run(self, texts, processes: int):
        for doc in self.nlp.pipe(texts, batch_size=256, n_process=max(1, processes)):
            yield self.phrases(doc)


def make_extractor(spacy_model: str | None):
    """(extractor or None, description): spaCy if importable with its model, else fallback."""
    if spacy_model:
        try:
            ext = SpacyExtractor(spacy_model)
            return ext, ext.name
        except Exception as e:  # ImportError, or OSError for a missing model package
            return None, f"fallback heuristic (spaCy {spacy_model!r} unavailable: {e})"
    return None, "fallback heuristic (no --spacy_model)"


def prepare(
    input_path, fmt, out_path, image_root=None, spacy_model=None, skip_first=None, processes=1
):
    """Write the JSONL; returns a summary dict (counts, extractor used)."""
    if skip_first is None:
        skip_first = 1000 if fmt == "sharegpt4v" else 0
    stats = {"written": 0, "dropped_bad_caption": 0, "dropped_missing_image": 0}
    records = []
    for image, caption in read_entries(input_path, fmt, skip_first):
        sentences = split_caption(caption) if isinstance(caption, str) else []
        if not isinstance(image, str) or not sentences:
            stats["dropped_bad_caption"] += 1
            continue
        if image_root and not os.path.exists(os.path.join(image_root, image)):
            stats["dropped_missing_image"] += 1
            continue
        records.append({"image": image, "caption": caption, "sentences": sentences})
    extractor, stats["phrases_from"] = make_extractor(spacy_model)
    sentence_lists = [r["sentences"] for r in records]
    if extractor is not None:
        phrase_lists = extractor.run((". ".join(s) for s in sentence_lists), processes)
    elif processes > 1:
        pool = multiprocessing.get_context("spawn").Pool(processes)
        phrase_lists = pool.imap(fallback_phrases, sentence_lists, chunksize=256)
    else:
        phrase_lists = map(fallback_phrases, sentence_lists)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for record, phrases in zip(records, phrase_lists, strict=True):
            record["phrases"] = phrases
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            stats["written"] += 1
    if extractor is None and processes > 1:
        pool.close()
    stats["skip_first"] = skip_first
    return stats


def _define_flags() -> None:
    """Flags are defined only when run as a command, so importing this module defines none."""
    flags.DEFINE_string("input", None, "ShareGPT4V json or JSONL with image + caption.")
    flags.DEFINE_enum("format", "sharegpt4v", ["sharegpt4v", "jsonl"], "Input format.")
    flags.DEFINE_string("image_root", None, "If set, drop entries whose image is missing.")
    flags.DEFINE_string("out", None, "Output JSONL path.")
    flags.DEFINE_string("spacy_model", "en_core_web_sm", "spaCy model; '' = fallback.")
    flags.DEFINE_integer("skip_first", None, "Entries to skip (default: 1000 for sharegpt4v).")
    flags.DEFINE_integer("processes", 1, "Worker processes for phrase extraction.")


def main(argv):
    del argv
    f = flags.FLAGS
    stats = prepare(
        f.input, f.format, f.out, f.image_root, f.spacy_model or None, f.skip_first, f.processes
    )
    json.dump(stats, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["input", "out"])
    app.run(main)
