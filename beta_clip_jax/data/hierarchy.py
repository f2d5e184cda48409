"""Per-image text hierarchy: long caption -> caption, sentences, phrases (β-CLIP's recipe).

The long caption is de-duplicated, split naively on ". ", up to `max_sentences` sentences are
sampled, the caption is those sentences joined with ". ", and the phrases come from one of:
the record's per-sentence spaCy phrases (`data/prepare.py`), merged in β-CLIP's order for the
sampled sentences; older flat precomputed phrases restricted to the sampled sentences; or a
dependency-free fallback extractor run on the joined caption. `tokenize_hierarchy` turns the
result into the fixed-shape slots of docs/CONTRACTS.md. docs/data.md describes the rules.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence

import numpy as np

# Phrases β-CLIP removes after extraction. The test is exact and case-sensitive, so "The image"
# (the usual opening noun chunk of a ShareGPT4V caption) stays a phrase.
DROPPED_PHRASES = frozenset({"the", "the image", "image"})
# Phrase kinds in the order β-CLIP concatenates them before de-duplication and truncation to
# `max_phrases`: noun phrases first, so they dominate the kept budget.
PHRASE_CATEGORIES = ("noun", "verb_adp", "spatial")
MAX_PHRASE_WORDS = 6

_DEDUPE_MIN_CHARS = 100
_DEDUPE_PASSES = (10, 5, 3)  # minimum repeated-substring lengths, one pass each
_DEDUPE_MAX_REPLACEMENTS = 10
# Lazy: the shortest unit of 3..20 chars that repeats (3+ times in a row) is kept, as β-CLIP
# does; no DOTALL, so a repetition never spans a newline.
_REPEATS = {m: re.compile(rf"(.{{{m},20}}?)\1\1+") for m in _DEDUPE_PASSES}
_WORD_OR_PUNCT = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")
_WORDS = re.compile(r"\w+")
# C0/C1 control characters that are not whitespace (NUL, ESC, DEL, ...): no text, so they are
# removed; whitespace ones (tab, newline, ...) become single spaces when texts are split.
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


@dataclasses.dataclass(frozen=True)
class TextHierarchy:
    """The texts of one image: joined caption, sampled sentences, phrases (all untokenised)."""

    caption: str
    sentences: list[str]
    phrases: list[str]


def strip_controls(text: str) -> str:
    """`text` without its non-whitespace control characters: a caption or phrase of nothing
    else is empty (an empty caption is skipped, an empty phrase dropped), not a blank slot."""
    return _CONTROLS.sub("", text)


def dedupe_caption(text: str) -> str:
    """Collapse LLM-caption stutter the way β-CLIP does before splitting.

    Texts over 100 characters lose repeated substrings (3-20 chars, 3+ times in a row; passes
    for minimum lengths 10, 5, 3, at most 10 replacements each). Then, with 2+ words, runs of
    identical whitespace-separated tokens merge: "red red," and "The the" stay, and every
    whitespace run becomes one space. Texts under 2 characters are returned unchanged.
    """
    if len(text) < 2:
        return text
    if len(text) > _DEDUPE_MIN_CHARS:  # measured once, before the passes
        for min_len in _DEDUPE_PASSES:
            text = _REPEATS[min_len].sub(r"\1", text, count=_DEDUPE_MAX_REPLACEMENTS)
    words = text.split()
    if len(words) >= 2:
        text = " ".join(word for word, _ in itertools.groupby(words))
    return text.strip()


def split_sentences(text: str) -> list[str]:
    """Naive split on the literal ". " (the reference's rule, not a real sentence splitter)."""
    return [s.strip() for s in text.split(". ") if s.strip()]


def sample_indices(num: int, max_sentences: int, rng: np.random.Generator) -> list[int]:
    """`max_sentences` distinct indices in random order if there are that many, else all, in
    order."""
    if num >= max_sentences:
        return [int(i) for i in rng.choice(num, size=max_sentences, replace=False)]
    return list(range(num))


def sample_sentences(
    sentences: Sequence[str], max_sentences: int, rng: np.random.Generator
) -> list[str]:
    """The sentences at `sample_indices` (same draws, so the same sample)."""
    return [sentences[i] for i in sample_indices(len(sentences), max_sentences, rng)]


def merge_phrases(phrases: Sequence[str]) -> list[str]:
    """β-CLIP's final phrase list: exact (case-sensitive) de-duplication keeping the first
    occurrence, then the exact stop-phrases removed. Empty strings are dropped too (spaCy never
    yields one; an empty text slot would carry no phrase)."""
    seen, out = set(), []
    for p in phrases:
        if p not in seen:
            seen.add(p)
            if p and p not in DROPPED_PHRASES:
                out.append(p)
    return out


def clean_phrases(phrases: Sequence[str]) -> list[str]:
    """`merge_phrases` after whitespace normalisation, for phrases from other tools or files."""
    return merge_phrases([" ".join(str(p).split()) for p in phrases])


def merge_phrase_groups(groups: Sequence[Mapping[str, Sequence[str]]]) -> list[str]:
    """One phrase list from per-sentence {"noun", "verb_adp", "spatial"} groups: all noun
    phrases (groups in the given order), then all verb+adp, then all spatial; `merge_phrases`."""
    return merge_phrases([p for cat in PHRASE_CATEGORIES for g in groups for p in g.get(cat, ())])


def _check_groups(groups) -> None:
    """Raise ValueError for a malformed "sentence_phrases" entry (a bad record, not a crash)."""
    for g in groups:
        if not isinstance(g, Mapping) or set(g) - set(PHRASE_CATEGORIES):
            raise ValueError(f"sentence_phrases entries must map {PHRASE_CATEGORIES} to lists")
        for value in g.values():
            if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
                raise ValueError("sentence_phrases values must be lists of strings")


def _normalise_words(text: str) -> str:
    return " " + " ".join(_WORDS.findall(text.lower())) + " "


def phrases_in_text(phrases: Sequence[str], text: str) -> list[str]:
    """The phrases that occur in `text` as whole words (case- and punctuation-insensitive).

    For flat precomputed phrases (files without "sentence_phrases"): they come from the whole
    long caption, but the reference extracts them from the sampled caption only; keeping just
    those that occur in it gives about the same positives and keeps the `max_phrases` budget on
    the sentences actually used. Order follows the precomputed list.
    """
    haystack = _normalise_words(text)
    return [p for p in phrases if _normalise_words(p).strip() and _normalise_words(p) in haystack]


# --- dependency-free fallback phrase extractor -------------------------------------------------
# A heuristic stand-in for spaCy's noun chunks + the reference's extra patterns, for when the
# records carry no precomputed phrases. Chunks are the maximal runs of words between punctuation
# and closed-class words (prepositions, conjunctions, pronouns, auxiliaries, frequent caption
# verbs); a run is split before an inner determiner and kept if it has a content word.

_DETERMINERS = frozenset(
    "a an the this that these those its their his her our my your some several many few each "
    "every another both all no any one two three four five six seven eight nine ten".split()
)
_PREPOSITIONS = frozenset(
    "about above across after against along amid among around at atop before behind below "
    "beneath beside besides between beyond by down during for from in inside into like near of "
    "off on onto out outside over past per through throughout to toward towards under "
    "underneath up upon via with within without".split()
)
_CLOSED_CLASS = _PREPOSITIONS | frozenset(
    "and or but nor so yet while whereas although though because as if than which who whom "
    "whose where when whether it they he she we you i them him us there here also very too not "
    "is are was were be been being am has have had do does did can could may might must shall "
    "should will would appears appear seems seem shows show showing shown depicts depict "
    "depicting features featuring captures capturing displays displaying showcases showcasing "
    "contains containing includes including highlights highlighting creates creating adds "
    "adding suggests suggesting gives giving stands standing sits sitting lies lying holds "
    "holding wears wearing looks looking next".split()
)
_AUXILIARIES = frozenset("is are was were be been being am".split())
# Verbs that take a preposition ("leaning against"): a closed list, plus -ing/-ed words right
# after an auxiliary ("is parked on"). Both also end noun chunks.
_VERB_HINTS = frozenset("standing sitting lying holding looking leaning hanging resting".split())
_NP_SIDES = frozenset("left right top bottom front back middle center".split())
_SPATIAL_HEADS = _NP_SIDES | frozenset(
    "inside outside above below under over centered frontside backside near nearby far".split()
)


def _is_word(tok: str) -> bool:
    return tok[0].isalnum()


def _spatial_end(low: list[str], i: int, heads: frozenset[str], det_ok: bool) -> int:
    """End (exclusive) of a spatial relation starting at preposition `low[i]`, or -1."""
    if low[i] == "next" and i + 1 < len(low) and low[i + 1] == "to":
        return i + 2
    if low[i] not in _PREPOSITIONS:
        return -1
    j = i + 1
    if j < len(low) and (low[j] in _DETERMINERS if det_ok else low[j] == "the"):
        j += 1
    if j >= len(low) or low[j] not in heads:
        return -1
    return j + 2 if j + 1 < len(low) and low[j + 1] == "of" else j + 1


def _is_verb(low: list[str], i: int) -> bool:
    w = low[i]
    after_aux = i > 0 and low[i - 1] in _AUXILIARIES
    return w in _VERB_HINTS or (after_aux and len(w) > 4 and w.endswith(("ing", "ed")))


def _noun_chunks(toks: list[str], low: list[str]) -> list[tuple[int, int]]:
    """(start, end) token spans of determiner-led runs of open-class words."""
    spans, start = [], None
    for i, (tok, w) in enumerate(zip(toks, low, strict=True)):
        boundary = not _is_word(tok) or w in _CLOSED_CLASS or _is_verb(low, i)
        if start is not None and (boundary or w in _DETERMINERS):
            spans.append((start, i))
            start = None
        if start is None and not boundary:
            start = i
    if start is not None:
        spans.append((start, len(toks)))
    return [(s, e) for s, e in spans if any(w not in _DETERMINERS for w in low[s:e])]


def fallback_phrase_groups(text: str) -> dict[str, list[str]]:
    """Phrases of `text` without spaCy, by kind (keys of PHRASE_CATEGORIES).

    "noun": noun chunks (a chunk directly followed by "<prep> [the] left/right/.../center [of]"
    is extended over it, like the reference's "NP side" spans), at most the last
    MAX_PHRASE_WORDS words; "verb_adp": verb + preposition bigrams ("leaning against"; verbs
    from a short list or -ing/-ed forms after an auxiliary); "spatial": "next to" and
    "<prep> [det] left/.../far [of]".
    """
    toks = _WORD_OR_PUNCT.findall(text)
    low = [t.lower() for t in toks]
    chunks, covered = [], 0
    for s, e in _noun_chunks(toks, low):
        if s < covered:  # inside an extended chunk: non-overlapping, like spaCy's filter_spans
            continue
        side_end = _spatial_end(low, e, _NP_SIDES, det_ok=False) if e < len(low) else -1
        if side_end > 0 and low[e] != "next":
            e = side_end
        chunks.append(" ".join(toks[max(s, e - MAX_PHRASE_WORDS) : e]))
        covered = e
    verb_preps, spatial = [], []
    for i in range(len(toks) - 1):
        if _is_verb(low, i) and low[i + 1] in _PREPOSITIONS:
            verb_preps.append(f"{toks[i]} {toks[i + 1]}")
        end = _spatial_end(low, i, _SPATIAL_HEADS, det_ok=True)
        if end > 0:
            spatial.append(" ".join(toks[i:end]))
    groups = {"noun": chunks, "verb_adp": verb_preps, "spatial": spatial}
    return {k: merge_phrases(v) for k, v in groups.items()}


def extract_phrases_fallback(text: str) -> list[str]:
    """`fallback_phrase_groups` of `text` merged in the reference's kind order."""
    return merge_phrase_groups([fallback_phrase_groups(text)])


# --- hierarchy + tokenisation ------------------------------------------------------------------


def build_hierarchy(
    caption: str,
    rng: np.random.Generator,
    *,
    max_sentences: int,
    max_phrases: int,
    sentences: Sequence[str] | None = None,
    phrases: Sequence[str] | None = None,
    sentence_phrases: Sequence[Mapping[str, Sequence[str]]] | None = None,
) -> TextHierarchy:
    """Sample the texts of one image. `sentences`, `phrases`, `sentence_phrases`: precomputed.

    Control characters are removed first (`strip_controls`). Precomputed sentences (already
    de-duplicated by prepare.py) replace dedupe + split.
    `sentence_phrases` (one {"noun", "verb_adp", "spatial"} group per sentence) gives the
    reference's phrases of the sampled caption: noun phrases of the sampled sentences in sampled
    order, then verb+adp, then spatial, de-duplicated, the first `max_phrases`; it takes
    precedence over flat `phrases`, which are all kept when every sentence was sampled, else only
    those occurring in the sampled sentences (`phrases_in_text`). An empty result (no sentence)
    is returned as-is; the caller decides to skip it. Raises ValueError for `sentence_phrases`
    without aligned `sentences`.
    """
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    groups = None
    if sentence_phrases is not None:
        if sentences is None or len(sentences) != len(sentence_phrases):
            raise ValueError("sentence_phrases needs sentences of the same length")
        _check_groups(sentence_phrases)
        groups = list(sentence_phrases)
    if sentences is None:
        sentences = split_sentences(dedupe_caption(strip_controls(caption)))
    else:
        sentences = [" ".join(strip_controls(str(s)).split()) for s in sentences]
        keep = [i for i, s in enumerate(sentences) if s]  # drop empties, keep groups aligned
        sentences = [sentences[i] for i in keep]
        groups = None if groups is None else [groups[i] for i in keep]
    picks = sample_indices(len(sentences), max_sentences, rng)
    picked = [sentences[i] for i in picks]
    joined = ". ".join(picked)
    found: list[str] = []
    if max_phrases > 0 and joined:
        if groups is not None:
            found = merge_phrase_groups([groups[i] for i in picks])
        elif phrases is None:
            found = extract_phrases_fallback(joined)
        elif len(picked) == len(sentences):
            found = clean_phrases(phrases)  # every sentence kept: all phrases belong
        else:
            found = phrases_in_text(clean_phrases(phrases), joined)
        found = merge_phrases([strip_controls(p) for p in found])
    return TextHierarchy(caption=joined, sentences=picked, phrases=found[:max_phrases])


LEVELS = ("caption", "sentence", "phrase")  # text groups of a batch, each with its own length


def level_lengths(data_cfg) -> dict[str, int]:
    """Token length per text level: caption_length, sentence_length (both text_length unless
    set) and phrase_length."""
    text = int(data_cfg.text_length)
    return {
        "caption_length": int(data_cfg.get("caption_length") or text),
        "sentence_length": int(data_cfg.get("sentence_length") or text),
        "phrase_length": int(data_cfg.phrase_length),
    }


def tokenize_hierarchy(
    hierarchy: TextHierarchy,
    tokenizer,
    *,
    max_sentences: int,
    max_phrases: int,
    caption_length: int,
    sentence_length: int,
    phrase_length: int,
) -> dict[str, np.ndarray]:
    """Fixed-shape slots, one array per text level: caption int32 [Lc], sentences int32 [S, Ls],
    phrases int32 [Kp, Lp], valid bool [1 + S + Kp] (caption, sentences, phrases); padded slots
    are all-zero. A text longer than its level's length is cut with EOT kept in the last place.
    `truncated` int32 [3] counts, per level (LEVELS), the texts that fill their whole length
    (cut, or exactly full)."""
    caption = tokenizer.encode([hierarchy.caption], caption_length)[0]
    sentences = hierarchy.sentences[:max_sentences]
    sent = np.zeros((max_sentences, sentence_length), np.int32)
    if sentences:
        sent[: len(sentences)] = tokenizer.encode(sentences, sentence_length)
    phrases = hierarchy.phrases[:max_phrases]
    phr = np.zeros((max_phrases, phrase_length), np.int32)
    if phrases:
        phr[: len(phrases)] = tokenizer.encode(phrases, phrase_length)
    valid = np.zeros((1 + max_sentences + max_phrases,), bool)
    valid[: 1 + len(sentences)] = True
    valid[1 + max_sentences : 1 + max_sentences + len(phrases)] = True
    truncated = [int(caption[-1] != 0), np.count_nonzero(sent[:, -1]), np.count_nonzero(phr[:, -1])]
    return {
        "caption": np.asarray(caption, np.int32),
        "sentences": sent,
        "phrases": phr,
        "valid": valid,
        "truncated": np.asarray(truncated, np.int32),
    }
