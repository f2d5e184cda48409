"""Offline phrase extraction: ShareGPT4V JSON, JSONL or CSV captions -> our training JSONL,
ArrayRecord shards or WebDataset shards.

    python -m beta_clip_jax.data.prepare \
        --input=share-captioner_coco_lcs_sam_1246k_1107_filtered.json --format=sharegpt4v \
        --image_root=/data/sharegpt4v --out=train_spacy.jsonl [--spacy_model=en_core_web_sm]
    python -m beta_clip_jax.data.prepare --input=my_data/captions.csv --format=csv \
        --out_format=array_record --shards=8 --out=my_data/ar/train --processes=8

Each output line is {"image", "caption", "sentences", "sentence_phrases", "phrases"}: the caption
de-duplicated and split naively on ". " (what training samples from), one {"noun", "verb_adp",
"spatial"} phrase group per sentence (each sentence parsed on its own), and the flat merge of
those groups (for readers of the older format). Training merges the groups of the sentences it
samples in β-CLIP's order (data/hierarchy.py). Phrases come from spaCy when spaCy and the model are
importable, otherwise from the dependency-free fallback in data/hierarchy.py; the summary says
which. ShareGPT4V input skips its first 1000 entries (SV-1k) by default, so the JSONL is trained on
with no further skip. Every image is decoded with the training decoder; an entry training would
skip (unparseable line, no caption text, missing or undecodable image) is dropped and reported
with its input line (JSONL, CSV) or entry index (json). `--check` reports without writing
anything. docs/data.md describes the format.

`--out_format=array_record` (or `webdataset`) writes the same records, with the encoded image
bytes inside (`--noinline_images`: ArrayRecord records keep the image path instead), into
`--shards` files `OUT-00000-of-0000N.array_record` (`.tar`) of consecutive records, so the
shards in order keep the input order; the summary's `data_path` is their brace pattern, the
`data.path` to train on. A CSV input is read as `data.name=csv` reads it (`--image_key`,
`--caption_key`, `--separator`). spaCy runs with `--processes` worker processes
(`nlp.pipe(n_process=...)`), as do the image checks and the fallback phrases.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import sys

from absl import app, flags

from beta_clip_jax.data import fileio, hierarchy, sources

_SIDE_WORDS = ["left", "right", "top", "bottom", "front", "back", "middle", "center"]
_SPATIAL_WORDS = _SIDE_WORDS + [
    "inside", "outside", "above", "below", "under", "over", "centered", "frontside",
    "backside", "near", "nearby", "far",
]  # fmt: skip
_log = logging.getLogger(__name__)


INPUT_FORMATS = ("sharegpt4v", "jsonl", "csv")
OUT_FORMATS = ("jsonl", "array_record", "webdataset")


def read_entries(path: str, fmt: str, skip_first: int, csv_options: dict | None = None):
    """(where, image, caption, problem) of each input entry after the first `skip_first`.

    `where` is the 1-based line number for JSONL and CSV (blank lines count as lines but are
    no entries), the 0-based entry index for ShareGPT4V json; `problem` is "reason: detail" for
    a line that cannot be parsed (its image and caption are then None), else None.
    `csv_options`: CsvSource's image_key / caption_key / separator.
    """
    if not fileio.exists(path):
        raise FileNotFoundError(f"input {path!r} not found")
    if fmt == "sharegpt4v":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for index, entry in enumerate(data[skip_first:], skip_first):
            try:
                caption = entry["conversations"][1]["value"]
            except (KeyError, IndexError, TypeError):
                caption = None
            if isinstance(caption, str):
                caption = caption.replace("\n", " ")
            image = entry.get("image") if isinstance(entry, dict) else None
            yield index, image, caption, None
    elif fmt == "jsonl":
        with open(path, "rb") as f:  # bytes, so one bad line cannot stop the whole read
            entries = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            for n, line in itertools.islice(entries, skip_first, None):
                yield n, *_parse_line(line)
    elif fmt == "csv":
        yield from _csv_entries(path, skip_first, csv_options or {})
    else:
        raise ValueError(f"--format must be one of {', '.join(INPUT_FORMATS)}, got {fmt!r}")


def _csv_entries(path: str, skip_first: int, options: dict):
    from beta_clip_jax.data.csv_source import CsvSource

    source = CsvSource(path, index_cache_dir="", **options)
    for index in range(min(skip_first, len(source)), len(source)):
        where = source.line_number(index)
        try:
            row = source.row(index)
        except UnicodeDecodeError as e:
            yield where, None, None, f"bad_utf8: {e}"
            continue
        except ValueError as e:
            yield where, None, None, f"bad_record: {e}"
            continue
        yield where, row[source.image_key], row[source.caption_key], None


def _parse_line(line: bytes):
    """(image, caption, problem) of one JSONL line."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, None, f"bad_utf8: {e}"
    except json.JSONDecodeError as e:
        return None, None, f"bad_record: not JSON ({e})"
    if not isinstance(entry, dict):
        return None, None, f"bad_record: a JSON {type(entry).__name__}, not an object"
    return entry.get("image"), entry.get("caption"), None


def split_caption(caption: str) -> list[str]:
    """The caption's sentences after de-duplication (what training samples from)."""
    return hierarchy.split_sentences(hierarchy.dedupe_caption(caption))


def fallback_groups(sentences: list[str]) -> list[dict[str, list[str]]]:
    return [hierarchy.fallback_phrase_groups(s) for s in sentences]


def spatial_relations(doc) -> list[str]:
    """β-CLIP's spatial relations of a parsed Doc, lower-cased, de-duplicated, in text order.

    One left-to-right scan, matches never overlap: "next" (ADV) + "to" (ADP), or an ADP, an
    optional DET, a head word from the spatial list and an optional "of" (ADP). Token texts are
    joined with single spaces.
    """
    out, i = [], 0
    while i < len(doc):
        end = _spatial_end(doc, i)
        if end:
            out.append(" ".join(t.text.lower().strip() for t in doc[i:end]))
            i = end
        else:
            i += 1
    return hierarchy.merge_phrases(out)


def _spatial_end(doc, i: int) -> int:
    """End (exclusive) of the spatial relation starting at token i, or 0."""
    n, t = len(doc), doc[i]
    if i + 1 < n and t.lower_ == "next" and t.pos_ == "ADV":
        nxt = doc[i + 1]
        if nxt.lower_ == "to" and nxt.pos_ == "ADP":
            return i + 2
    if t.pos_ != "ADP":
        return 0
    j = i + 1
    if j < n and doc[j].pos_ == "DET":
        j += 1
    if j >= n or doc[j].lower_ not in _SPATIAL_WORDS:
        return 0
    j += 1
    if j < n and doc[j].lower_ == "of" and doc[j].pos_ == "ADP":
        j += 1
    return j


class SpacyPhraseRules:
    """β-CLIP's phrase rules on a parsed spaCy Doc (POS tags and a dependency parse).

    "noun": noun chunks plus "[DET] (ADJ|NOUN|PROPN)+ ADP [the] <side> [of]" spans, the longest
    non-overlapping ones kept (spaCy's `filter_spans`), in text order, stripped; "verb_adp": each
    VERB directly followed by an ADP ("leaning against"), as the Doc's text of the two tokens;
    "spatial": `spatial_relations`. Each kind is de-duplicated exactly (`merge_phrases`); the
    kinds are concatenated and de-duplicated again when training merges sentences.
    """

    def __init__(self, vocab):
        from spacy.matcher import Matcher

        self.np_side = Matcher(vocab)
        self.np_side.add(
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

    def groups(self, doc) -> dict[str, list[str]]:
        from spacy.util import filter_spans

        spans = list(doc.noun_chunks) + [doc[s:e] for _, s, e in self.np_side(doc)]
        noun = [s.text.strip() for s in filter_spans(spans)]
        verb_adp = [
            doc[i : i + 2].text
            for i in range(len(doc) - 1)
            if doc[i].pos_ == "VERB" and doc[i + 1].pos_ == "ADP"
        ]
        groups = {"noun": noun, "verb_adp": verb_adp, "spatial": spatial_relations(doc)}
        return {k: hierarchy.merge_phrases(v) for k, v in groups.items()}

    def phrases(self, doc) -> list[str]:
        """The whole Doc's phrase list, as β-CLIP builds it for one caption."""
        return hierarchy.merge_phrase_groups([self.groups(doc)])


class SpacyExtractor:
    """A spaCy model + `SpacyPhraseRules`, run per sentence.

    β-CLIP parses the joined sampled caption at every step; parsing each sentence on its own
    lets the groups be precomputed once. Only the parse context across a ". " boundary differs.
    """

    def __init__(self, model: str):
        import spacy

        # NER and the lemmatizer set neither POS nor the parse, so they are skipped for speed.
        self.nlp = spacy.load(model, disable=["ner", "lemmatizer"])
        self.name = f"spaCy {spacy.__version__} {model} {self.nlp.meta.get('version', '')}"
        self.rules = SpacyPhraseRules(self.nlp.vocab)

    def run(self, sentence_lists, processes: int):
        """Per record (a list of sentences): its list of per-sentence phrase groups."""
        sentence_lists = list(sentence_lists)
        flat = (s for sentences in sentence_lists for s in sentences)
        docs = self.nlp.pipe(flat, batch_size=1024, n_process=max(1, processes))
        for sentences in sentence_lists:
            yield [self.rules.groups(doc) for doc in itertools.islice(docs, len(sentences))]


def make_extractor(spacy_model: str | None):
    """(extractor or None, description): spaCy if importable with its model, else fallback."""
    if spacy_model:
        try:
            ext = SpacyExtractor(spacy_model)
            return ext, ext.name
        except Exception as e:  # ImportError, or OSError for a missing model package
            return None, f"fallback heuristic (spaCy {spacy_model!r} unavailable: {e})"
    return None, "fallback heuristic (no --spacy_model)"


# Summary counter of each drop reason (the reasons are the training pipeline's skip reasons).
DROP_COUNTERS = {
    "bad_record": "dropped_bad_record",
    "bad_utf8": "dropped_bad_record",
    "no_image_path": "dropped_bad_record",
    "empty_caption": "dropped_bad_caption",
    "non_text_caption": "dropped_bad_caption",
    "missing_image": "dropped_missing_image",
    "corrupt_image": "dropped_corrupt_image",
    "image_too_large": "dropped_corrupt_image",
    "unsafe_path": "dropped_bad_record",
}
MAX_LISTED_DROPS = 50  # the summary lists this many drops; every drop is logged


class _Drops:
    """Every dropped entry: counted per summary key and logged when found; the summary lists
    the first MAX_LISTED_DROPS in input order."""

    def __init__(self, stats: dict, fmt: str, input_path: str):
        self.stats, self.name = stats, os.path.basename(input_path)
        self.by_line = fmt != "sharegpt4v"  # JSONL and CSV name lines, the json entries
        self.found: list[tuple[int, object, str, str]] = []
        for key in DROP_COUNTERS.values():
            stats.setdefault(key, 0)

    def at(self, where: int) -> str:
        """An entry's name: `input.jsonl:LINE`, or `input.json[INDEX]` for ShareGPT4V."""
        return f"{self.name}:{where}" if self.by_line else f"{self.name}[{where}]"

    def add(self, where: int, image, problem: str) -> None:
        reason, _, detail = problem.partition(": ")
        self.stats[DROP_COUNTERS[reason]] += 1
        _log.warning("prepare: dropping %s (%s): %s", self.at(where), reason, detail)
        self.found.append((where, image, reason, detail))

    def listed(self) -> list[dict]:
        key = "line" if self.by_line else "entry"
        first = sorted(self.found, key=lambda d: d[0])[:MAX_LISTED_DROPS]
        return [{key: w, "image": i, "reason": r, "detail": d} for w, i, r, d in first]


def _text_problem(image, caption, sentences) -> str | None:
    if not isinstance(image, str) or not image:
        return f"no_image_path: image is {image!r}"
    if not isinstance(caption, str):
        return "non_text_caption: " + ("no caption" if caption is None else type(caption).__name__)
    if not sentences:
        return f"empty_caption: caption has no text ({caption[:80]!r})"
    return None


def prepare(
    input_path,
    fmt,
    out_path=None,
    image_root=None,
    spacy_model=None,
    skip_first=None,
    processes=1,
    check=False,
    *,
    out_format="jsonl",
    shards=1,
    inline_images=True,
    csv_options=None,
):
    """Write the JSONL or shards (nothing with `check`); returns a summary dict (counts, drops,
    extractor, the `data_path` to train on).

    `skip_first` None: the training sources' own default for `fmt` (SV-1k for sharegpt4v, none
    for jsonl and csv), so the held-out entries are skipped here and never again on the output.
    Every image is decoded (sources.image_problem, the training decoder; `processes` workers)
    under `image_root`, which defaults to a JSONL or CSV input's folder, as training resolves
    it; a ShareGPT4V json without image_root is not checked. Entries that training would skip
    are dropped and reported by line (JSONL, CSV) or entry index (json). A record whose
    sentences yield no phrase is written with empty groups, not dropped. `out_format`,
    `shards`, `inline_images`: the module doc; `csv_options`: CsvSource's image_key,
    caption_key and separator.
    """
    if skip_first is None:
        skip_first = sources.default_skip_first(fmt)
    if not check and not out_path:
        raise ValueError("prepare needs an output path (or check=True)")
    _check_output(out_format, shards)
    given_root = image_root
    if image_root is None and fmt != "sharegpt4v":
        image_root = sources.jsonl_image_root(input_path, None)
    if image_root is None and not check and _stores_images(out_format, inline_images):
        raise ValueError(f"--out_format={out_format} stores the images: give --image_root")
    stats = {"written": 0, "dropped_bad_caption": 0, "dropped_missing_image": 0}
    drops = _Drops(stats, fmt, input_path)
    records = []
    entries = read_entries(input_path, fmt, skip_first, csv_options)
    for where, image, caption, problem in entries:
        sentences = split_caption(caption) if isinstance(caption, str) else []
        problem = problem or _text_problem(image, caption, sentences)
        if problem:
            drops.add(where, image, problem)
            continue
        record = {"image": image, "caption": caption, "sentences": sentences}
        records.append((where, record, None))
    pool = None
    if processes > 1:
        pool = multiprocessing.get_context("spawn").Pool(processes)
    try:
        if image_root is not None:
            records = _decodable(
                records, image_root, pool, drops, allow_absolute=given_root is None
            )
        else:
            _log.warning("prepare: no --image_root, so the images of %s are not checked", fmt)
        stats.update(_kept_summary(drops, records, image_root, check))
        if not check:
            if not _stores_images(out_format, inline_images):
                _warn_image_root(out_path, image_root, given_root)
            output = _output(out_format, out_path, shards, len(records), inline_images)
            stats["phrases_from"] = _write(records, output, spacy_model, processes, pool, drops)
            stats.update(written=output.written, out_format=out_format)
            if out_format != "jsonl":  # the shards' pattern: what to set data.path to
                stats["data_path"] = output.data_path
    finally:
        if pool is not None:  # every result is consumed by now, or an error is on its way
            pool.terminate()
            pool.join()
    stats["skip_first"] = skip_first
    return stats


def _decodable(records, image_root, pool, drops, allow_absolute=False):
    """The records whose image decodes; the others are dropped (reported). A path that would
    leave image_root is dropped unopened, as training refuses it."""
    resolved = []
    for where, record, _ in records:
        try:
            path = sources.resolve_image_path(
                image_root, record["image"], allow_absolute=allow_absolute
            )
        except sources.UnsafePathError as e:
            drops.add(where, record["image"], f"unsafe_path: {e}")
            continue
        resolved.append((where, record, path))
    paths = [path for _, _, path in resolved]
    problems = (
        pool.imap(sources.image_problem, paths, 64) if pool else map(sources.image_problem, paths)
    )
    kept = []
    for (where, record, path), problem in zip(resolved, problems, strict=True):
        if problem:
            drops.add(where, record["image"], ": ".join(problem))
        else:
            kept.append((where, record, path))
    return kept


def _kept_summary(drops, records, image_root, check) -> dict:
    return {
        "kept": len(records),
        "dropped": drops.listed(),
        "dropped_not_listed": max(len(drops.found) - MAX_LISTED_DROPS, 0),
        "images_checked": image_root is not None,
        "image_root": None if image_root is None else os.path.abspath(image_root),
        "check_only": bool(check),
        "phrases_from": "not run (check only)",
    }


def _warn_image_root(out_path, image_root, given_root) -> None:
    """Training resolves relative paths against data.image_root, else the output's folder."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if given_root is None and image_root and os.path.abspath(image_root) != out_dir:
        _log.warning(
            "prepare: images were found under %s but %s is written to another folder: train "
            "with --config.data.image_root=%s",
            os.path.abspath(image_root), out_path, os.path.abspath(image_root),
        )  # fmt: skip


def _write(records, output, spacy_model, processes, pool, drops) -> str:
    """Phrase groups of every (where, record, image file) written to `output`; returns the
    extractor used. spaCy parses with `processes` processes, the fallback on the pool."""
    extractor, phrases_from = make_extractor(spacy_model)
    sentence_lists = [r["sentences"] for _, r, _ in records]
    if extractor is not None:
        group_lists = extractor.run(sentence_lists, processes)
    elif pool is not None:
        group_lists = pool.imap(fallback_groups, sentence_lists, chunksize=256)
    else:
        group_lists = map(fallback_groups, sentence_lists)
    with output:
        for (where, record, path), groups in zip(records, group_lists, strict=True):
            record["sentence_phrases"] = groups
            record["phrases"] = hierarchy.merge_phrase_groups(groups)
            output.add(record, path, drops.at(where))
    return phrases_from


def _stores_images(out_format: str, inline_images: bool) -> bool:
    return out_format == "webdataset" or (out_format == "array_record" and inline_images)


def _check_output(out_format: str, shards: int) -> None:
    if out_format not in OUT_FORMATS:
        raise ValueError(
            f"--out_format must be one of {', '.join(OUT_FORMATS)}, got {out_format!r}"
        )
    if int(shards) < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    if out_format == "jsonl" and int(shards) != 1:
        raise ValueError(
            "--out_format=jsonl writes one file; --shards is for array_record and webdataset"
        )


class _JsonlOutput:
    """Records as lines of one JSONL file."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.written = 0
        self._file = open(path, "w", encoding="utf-8")

    def add(self, record: dict, image_file, entry_id: str) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.written += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


class _ShardOutput:
    """Records into ArrayRecord or WebDataset shards, with the image bytes (`inline`) or the
    image path; each record's "id" names the input entry it came from."""

    def __init__(self, writer, inline: bool):
        self.writer, self.inline, self.data_path = writer, inline, writer.pattern

    @property
    def written(self) -> int:
        return self.writer.written

    def add(self, record: dict, image_file, entry_id: str) -> None:
        out = {"id": entry_id, **record}
        if self.inline:
            out["image"] = fileio.read_bytes(image_file)
            out["image_ext"] = os.path.splitext(image_file)[1].lstrip(".").lower() or "jpg"
        self.writer.write(out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.writer.close()


def _output(out_format: str, out_path: str, shards: int, total: int, inline: bool):
    """The writer of `out_format`; shard outputs take `out_path` as their PREFIX (a trailing
    .array_record / .tar is dropped)."""
    if out_format == "jsonl":
        return _JsonlOutput(out_path)
    if out_format == "array_record":
        from beta_clip_jax.data.arrayrecord_source import ArrayRecordWriter

        writer = ArrayRecordWriter
    else:
        from beta_clip_jax.data.webdataset_source import WebDatasetWriter

        writer, inline = WebDatasetWriter, True  # a tar sample is its image member
    return _ShardOutput(writer(out_path.removesuffix(writer.suffix), shards, total), inline)


def _define_flags() -> None:
    """Flags are defined only when run as a command, so importing this module defines none."""
    flags.DEFINE_string("input", None, "ShareGPT4V json, JSONL or CSV with image + caption.")
    flags.DEFINE_enum("format", "sharegpt4v", list(INPUT_FORMATS), "Input format.")
    flags.DEFINE_string("image_key", "filepath", "CSV input: the image path column.")
    flags.DEFINE_string("caption_key", "title", "CSV input: the caption column.")
    flags.DEFINE_string("separator", None, "CSV input: the separator (default: by extension).")
    flags.DEFINE_enum("out_format", "jsonl", list(OUT_FORMATS), "What to write.")
    flags.DEFINE_alias("format_out", "out_format")
    flags.DEFINE_integer("shards", 1, "array_record / webdataset: files of consecutive records.")
    flags.DEFINE_bool(
        "inline_images", True, "array_record: store the encoded image bytes (else the path)."
    )
    flags.DEFINE_string(
        "image_root",
        None,
        "Folder the image paths are relative to (default: a JSONL input's folder); every image "
        "is decoded there and entries with a missing or undecodable image are dropped.",
    )
    flags.DEFINE_string(
        "out", None, "Output JSONL path, or the shards' PREFIX (not needed with --check)."
    )
    flags.DEFINE_bool("check", False, "Check and report every entry, write nothing.")
    flags.DEFINE_string("spacy_model", "en_core_web_sm", "spaCy model; '' = fallback.")
    flags.DEFINE_integer(
        "skip_first", None, "Entries to skip (default: 1000 = SV-1k for sharegpt4v, 0 for jsonl)."
    )
    flags.DEFINE_integer("processes", 1, "Worker processes for image checks and phrases.")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.out and not f.check:
        raise app.UsageError("--out is required (or --check to write nothing)")
    csv_options = {"image_key": f.image_key, "caption_key": f.caption_key, "separator": f.separator}
    stats = prepare(
        f.input, f.format, f.out, f.image_root, f.spacy_model or None, f.skip_first, f.processes,
        check=f.check, out_format=f.out_format, shards=f.shards, inline_images=f.inline_images,
        csv_options=csv_options if f.format == "csv" else None,
    )  # fmt: skip
    json.dump(stats, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["input"])
    app.run(main)
