"""CLIP byte-level BPE tokenizer, offline, from the packaged OpenAI vocabulary.

The vocabulary file `assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI's merge list (shipped with
open_clip, MIT licence). The algorithm (byte-to-unicode map, merge ranks, CLIP pre-tokenisation
regex, ftfy + HTML clean-up, lower-casing) is implemented here so no network or torch is needed.

Divergence from the beta-CLIP reference code: a text longer than `length` is cut and its LAST
position is set to EOT (as Long-CLIP's tokenizer does). The reference code cuts without EOT, so
argmax pooling then lands on the largest id left (the start token) instead of the text's end.
`keep_eot=False` reproduces the reference cut for its evaluation numbers (docs/evals.md).

Bounded work per text, whatever its size: `encode` stops once a row is full, cleans at most
_CHARS_PER_TOKEN characters per position of the row (a text that long fills it), and runs BPE
on at most _MAX_WORD_CHARS characters at a time (BPE time grows with the square of a word's
length; longer runs of letters come from garbage, not words). Rows are the same as encoding the
whole text and cutting, for any text real captions are made of.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
from collections.abc import Sequence
from importlib import resources

import ftfy
import numpy as np
import regex

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT = 49406
EOT = 49407
VOCAB_SIZE = 49408
DEFAULT_LENGTH = 248
_NUM_MERGES = 49152 - 256 - 2
_WORD_END = "</w>"
# Contractions, runs of letters, single digits, runs of other non-space symbols. Special-token
# strings typed inside a caption are deliberately NOT matched as specials (they split as text).
_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
_SPACES = regex.compile(r"\s+")
_CACHE_LIMIT = 200_000
# The longest vocabulary entry has 32 characters; 64 per token also leaves room for the spaces,
# HTML entities and characters that cleaning removes.
_CHARS_PER_TOKEN = 64
_MAX_WORD_CHARS = 256  # longer words are split into pieces of this many for BPE


def default_bpe_path() -> str:
    """Path of the packaged merge list."""
    return str(resources.files("beta_clip_jax").joinpath("assets/bpe_simple_vocab_16e6.txt.gz"))


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode char map used by GPT-2/CLIP byte-level BPE.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes are shifted to code points
    256+ so every byte has a visible, non-whitespace stand-in.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Insertion order (printable bytes first, then the shifted ones) defines the vocab order.
    return table


def clean_text(text: str) -> str:
    """ftfy repair, double HTML unescape, whitespace collapse, lower-case (as OpenAI CLIP)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _SPACES.sub(" ", text).strip().lower()


class Tokenizer:
    """OpenAI CLIP BPE tokenizer with a per-word merge cache.

    `encode` returns int32 `[N, length]`: SOT + tokens + EOT, zero padded.
    """

    vocab_size = VOCAB_SIZE
    sot = SOT
    eot = EOT

    def __init__(self, bpe_path: str | None = None):
        self.bpe_path = bpe_path or default_bpe_path()
        with gzip.open(self.bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; the vocabulary uses exactly the first _NUM_MERGES merges.
        self.merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        tokens = chars + [c + _WORD_END for c in chars] + ["".join(m) for m in self.merges]
        tokens += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = dict(enumerate(tokens))
        assert len(tokens) == VOCAB_SIZE and self.encoder[EOT_TOKEN] == EOT
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self._cache: dict[str, tuple[int, ...]] = {}

    def __getstate__(self):
        """Pickle only the vocab path; rebuilding (~0.1 s) keeps pickles for workers small."""
        return {"bpe_path": self.bpe_path}

    def __setstate__(self, state):
        self.__init__(state["bpe_path"])

    def _bpe(self, word: str, word_end: bool = True) -> list[str]:
        """Merge a byte-mapped word greedily by lowest merge rank until no known pair remains.
        `word_end=False`: a piece of a longer word, without the end-of-word mark."""
        parts = list(word[:-1]) + [word[-1] + _WORD_END] if word_end else list(word)
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = -1, len(ranks)
            for i in range(len(parts) - 1):
                r = ranks.get((parts[i], parts[i + 1]), best_rank)
                if r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            a, b = parts[best], parts[best + 1]
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _piece_ids(self, piece: str, word_end: bool = True) -> tuple[int, ...]:
        mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
        return tuple(self.encoder[p] for p in self._bpe(mapped, word_end))

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = self._piece_ids(word)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _word_pieces(self, word: str):
        """The ids of a word, in pieces of at most _MAX_WORD_CHARS characters (only an overlong
        word has more than one; those are not cached)."""
        if len(word) <= _MAX_WORD_CHARS:
            yield self._word_ids(word)
            return
        for start in range(0, len(word), _MAX_WORD_CHARS):
            end = start + _MAX_WORD_CHARS
            yield self._piece_ids(word[start:end], word_end=end >= len(word))

    def encode_one(self, text: str, max_ids: int | None = None) -> list[int]:
        """BPE ids of one text, without SOT/EOT. `max_ids`: stop once at least that many ids
        were found (the text is then cut at _CHARS_PER_TOKEN characters per id before cleaning,
        its whitespace runs collapsed first); None: the whole text."""
        if max_ids is not None and len(text) > _CHARS_PER_TOKEN * max_ids:
            text = _SPACES.sub(" ", text)[: _CHARS_PER_TOKEN * max_ids]
        ids: list[int] = []
        for match in _PATTERN.finditer(clean_text(text)):
            for piece in self._word_pieces(match.group()):
                ids.extend(piece)
                if max_ids is not None and len(ids) >= max_ids:
                    return ids
        return ids

    def encode(
        self, texts: str | Sequence[str], length: int = DEFAULT_LENGTH, *, keep_eot: bool = True
    ) -> np.ndarray:
        """Tokenise texts to int32 `[N, length]`: SOT + ids + EOT, zero padded.

        Over-long texts are cut to `length` with EOT forced into the last position (Long-CLIP
        style). `keep_eot=False` is the β-CLIP reference tokenizer's plain cut: the row then has
        no EOT and a model pooling at argmax(ids) reads whichever token has the largest id.
        """
        if isinstance(texts, str):
            texts = [texts]
        if length < 2:
            raise ValueError(f"length must be >= 2 to hold SOT and EOT, got {length}")
        out = np.zeros((len(texts), length), dtype=np.int32)
        for row, text in enumerate(texts):
            # length - 1 ids fill the row after SOT: more would be cut anyway.
            ids = [SOT, *self.encode_one(text, max_ids=length - 1), EOT]
            if len(ids) > length:
                ids = ids[:length]
                if keep_eot:
                    ids[-1] = EOT
            out[row, : len(ids)] = ids
        return out

    __call__ = encode

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ids; SOT, EOT and padding zeros after EOT are dropped."""
        pieces = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == EOT:
                break
            if i == SOT:
                continue
            pieces.append(self.decoder[i])
        raw = bytearray(self.byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace(_WORD_END, " ").strip()

    def save_hf(self, directory: str, model_max_length: int = DEFAULT_LENGTH) -> None:
        """Write Hugging Face `vocab.json`, `merges.txt` (+ a small tokenizer_config.json).

        `transformers.CLIPTokenizer.from_pretrained(directory)` then gives the same ids (HF pads
        with EOT rather than 0, and does not run ftfy).
        """
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.encoder, f, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in self.merges)
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": model_max_length,
            "bos_token": SOT_TOKEN,
            "eos_token": EOT_TOKEN,
            "pad_token": EOT_TOKEN,
            "unk_token": EOT_TOKEN,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
