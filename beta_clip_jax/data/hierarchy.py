"""Per-image text hierarchy (spec/beta_clip.md 3.2): long caption -> caption, sentences, phrases.

The long caption is de-duplicated, split naively on ". ", up to `max_sentences` sentences are
sampled, the caption is those sentences joined with ". ", and the phrases are either the record's
precomputed ones (from `data/prepare.py`, spaCy) restricted to the sampled sentences, or the output
of a dependency-free fallback extractor run on the joined caption. `tokenize_hierarchy` turns the
result into the fixed-shape slots of docs/CONTRACTS.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

# Phrases the reference removes after extraction (spec 3.2 step 5).
DROPPED_PHRASES = frozenset({"the", "the image", "image"})
MAX_PHRASE_WORDS = 6

_DEDUPE_MIN_CHARS = 100
_DEDUPE_PASSES = (10, 5, 3)  # minimum repeated-substring lengths, one pass each
_DEDUPE_MAX_REPLACEMENTS = 10
_REPEATS = {m: re.compile(rf"(.{{{m},20}})\1{{2,}}", re.DOTALL) for m in _DEDUPE_PASSES}
_WORD_OR_PUNCT = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")
_WORDS = re.compile(r"\w+")
_DUPLICATE_WORDS = re.compile(r"\b(\w+)(?:\s+\1\b)+")


@dataclasses.dataclass(frozen=True)
class TextHierarchy:
    """The texts of one image: joined caption, sampled sentences, phrases (all untokenised)."""

    caption: str
    sentences: list[str]
    phrases: list[str]


def dedupe_caption(text: str) -> str:
    """Collapse LLM-caption stutter: repeated substrings (3-20 chars, >= 3 times in a row) and
    consecutive duplicate words, as the reference does before splitting."""
    if len(text) > _DEDUPE_MIN_CHARS:
        for min_len in _DEDUPE_PASSES:
            text = _REPEATS[min_len].sub(r"\1", text, count=_DEDUPE_MAX_REPLACEMENTS)
    return _DUPLICATE_WORDS.sub(r"\1", text)


def split_sentences(text: str) -> list[str]:
    """Naive split on the literal ". " (the reference's rule, not a real sentence splitter)."""
    return [s.strip() for s in text.split(". ") if s.strip()]


def sample_sentences(
    sentences: Sequence[str], max_sentences: int, rng: np.random.Generator
) -> list[str]:
    """`max_sentences` distinct sentences in random order if there are that many, else all,
    in order."""
    if len(sentences) >= max_sentences:
        picks = rng.choice(len(sentences), size=max_sentences, replace=False)
        return [sentences[int(i)] for i in picks]
    return list(sentences)


def _normalise_words(text: str) -> str:
    return " " + " ".join(_WORDS.findall(text.lower())) + " "


def clean_phrases(phrases: Sequence[str]) -> list[str]:
    """Strip, drop empties and the reference's stop-phrases; de-duplicate case-insensitively,
    keeping the first occurrence."""
    seen, out = set(), []
    for p in phrases:
        p = " ".join(str(p).split())
        key = p.lower()
        if p and key not in seen and key not in DROPPED_PHRASES:
            seen.add(key)
            out.append(p)
    return out


def phrases_in_text(phrases: Sequence[str], text: str) -> list[str]:
    """The phrases that occur in `text` as whole words (case- and punctuation-insensitive).

    Precomputed phrases come from the whole long caption, but the reference extracts them from
    the sampled caption only; keeping just those that occur in it gives the same set of positives
    (a phrase never mentioned in the caption text is not one of its granularities) and keeps the
    `max_phrases` budget on the sentences actually used. Order follows the precomputed list.
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


def extract_phrases_fallback(text: str) -> list[str]:
    """Phrases of `text` without spaCy, in the reference's category order.

    (a) noun chunks (a chunk directly followed by "<prep> [the] left/right/.../center [of]" is
    extended over it, like the reference's "NP side" spans), at most the last MAX_PHRASE_WORDS
    words; (b) verb + preposition bigrams ("leaning against"; verbs from a short list or -ing/-ed
    forms after a non-determiner); (c) spatial relations ("next to", "<prep> [det] left/.../far
    [of]"). Then `clean_phrases`.
    """
    toks = _WORD_OR_PUNCT.findall(text)
    low = [t.lower() for t in toks]
    chunks = []
    for s, e in _noun_chunks(toks, low):
        side_end = _spatial_end(low, e, _NP_SIDES, det_ok=False) if e < len(low) else -1
        if side_end > 0 and low[e] != "next":
            e = side_end
        chunks.append(" ".join(toks[max(s, e - MAX_PHRASE_WORDS) : e]))
    verb_preps, spatial = [], []
    for i in range(len(toks) - 1):
        if _is_verb(low, i) and low[i + 1] in _PREPOSITIONS:
            verb_preps.append(f"{toks[i]} {toks[i + 1]}")
        end = _spatial_end(low, i, _SPATIAL_HEADS, det_ok=True)
        if end > 0:
            spatial.append(" ".join(toks[i:end]))
    return clean_phrases(chunks + verb_preps + spatial)


# --- hierarchy + tokenisation ------------------------------------------------------------------


def build_hierarchy(
    caption: str,
    rng: np.random.Generator,
    *,
    max_sentences: int,
    max_phrases: int,
    sentences: Sequence[str] | None = None,
    phrases: Sequence[str] | None = None,
) -> TextHierarchy:
    """Sample the texts of one image (spec 3.2). `sentences`/`phrases`: precomputed, optional.

    Precomputed sentences (already de-duplicated by prepare.py) replace dedupe + split.
    Precomputed phrases are all kept when every sentence was sampled, else only those occurring
    in the sampled sentences (`phrases_in_text`). An empty result (no sentence) is returned
    as-is; the caller decides to skip it.
    """
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    if sentences is None:
        sentences = split_sentences(dedupe_caption(caption))
    else:
        sentences = [" ".join(str(s).split()) for s in sentences]
        sentences = [s for s in sentences if s]
    picked = sample_sentences(sentences, max_sentences, rng)
    joined = ". ".join(picked)
    found: list[str] = []
    if max_phrases > 0 and joined:
        if phrases is None:
            found = extract_phrases_fallback(joined)
        elif len(picked) == len(sentences):
            found = clean_phrases(phrases)  # every sentence kept: all phrases belong
        else:
            found = phrases_in_text(clean_phrases(phrases), joined)
    return TextHierarchy(caption=joined, sentences=picked, phrases=found[:max_phrases])


def tokenize_hierarchy(
    hierarchy: TextHierarchy,
    tokenizer,
    *,
    max_sentences: int,
    max_phrases: int,
    text_length: int,
    phrase_length: int,
) -> dict[str, np.ndarray]:
    """Fixed-shape slots: sentences int32 [1+S, Ls] (slot 0 = caption), phrases int32 [Kp, Lp],
    valid bool [1+S+Kp]; padded slots are all-zero. `truncated` counts texts that fill their
    whole context (cut, or exactly full), as int32."""
    texts = [hierarchy.caption, *hierarchy.sentences[:max_sentences]]
    sent = np.zeros((1 + max_sentences, text_length), np.int32)
    sent[: len(texts)] = tokenizer.encode(texts, text_length)
    phrases = hierarchy.phrases[:max_phrases]
    phr = np.zeros((max_phrases, phrase_length), np.int32)
    if phrases:
        phr[: len(phrases)] = tokenizer.encode(phrases, phrase_length)
    valid = np.zeros((1 + max_sentences + max_phrases,), bool)
    valid[: len(texts)] = True
    valid[1 + max_sentences : 1 + max_sentences + len(phrases)] = True
    truncated = int(np.count_nonzero(sent[:, -1])) + int(np.count_nonzero(phr[:, -1]))
    return {"sentences": sent, "phrases": phr, "valid": valid, "truncated": np.int32(truncated)}
