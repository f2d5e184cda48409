"""Training input pipeline: grain MapDataset from a record source to CONTRACTS.md batches.

    source indices [skip_first, +max_records) -> shuffle (seeded, reshuffled each epoch) ->
    repeat: the global stream -> this process's rows of each global batch -> per position:
    decode + crop image, caption hierarchy, tokenise -> batch -> (worker processes) ->
    TrainIterator

The global order: global batch s holds the stream positions [s * B, (s + 1) * B) of one stream
over the whole dataset, and process i decodes rows [i * B / P, (i + 1) * B / P) of it. So the
global batch at step s is a pure function of (seed, s), the same for any number of processes and
devices, and a run may resume with another process count (the iterator state is the next batch
index and the counters, with no process in it). Every record is a pure function of (seed,
epoch, source index): its crop and sentence sample come from
`np.random.default_rng([seed, epoch, index, attempt])`. A record that cannot be used is replaced
in the same batch slot by a record drawn from the whole dataset by `(seed, global position,
attempt)`, so batches stay full and identical whatever the number of processes and worker
processes, and the iterator state restores exactly, even with another number of workers. Each loader
copy remembers the records that failed and does not read them again (whether a record is usable
does not depend on its draw, so this changes no batch). Skips travel inside each batch
("_counts", "_examples", with the range offset of each record), so counting is correct with
worker processes; `TrainIterator` (data/iterator.py) strips them, counts each unusable record
once against the distinct records seen, warns once per reason with an example, and stops past
data.max_skip_fraction (docs/data.md, Bad records).
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict

from beta_clip_jax.data import hierarchy, packing, sources, transforms
from beta_clip_jax.data.iterator import (  # noqa: F401 (SKIP_REASONS: re-exported)
    COUNTERS,
    SKIP_REASONS,
    TRUNCATION_COUNTERS,
    DataSkipError,
    TrainIterator,
    failure_line,
)

_REPLACEMENT_STREAM = 0x5EED


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data` defaults (synthetic scenes; K = 1 + 5 + 30 texts as the released runs)."""
    c = ml_collections.ConfigDict()
    c.name = "synthetic"  # synthetic | sharegpt4v | jsonl | urban1k | tfds | csv | webdataset
    # | array_record | folder (data/formats.py)
    c.path = config_dict.placeholder(str)  # the data file, folder or shard pattern
    c.image_root = config_dict.placeholder(str)  # joined with relative image paths
    c.shards = config_dict.placeholder(tuple)  # webdataset / array_record: shard list (not path)
    c.image_key = "filepath"  # csv: the image path column (open_clip's --csv-img-key)
    c.caption_key = "title"  # csv: the caption column (open_clip's --csv-caption-key)
    c.separator = config_dict.placeholder(str)  # csv: None: "\t" for .tsv / .tab, else ","
    # Start-up indexes (CSV rows, tar members, shard sizes) are cached here, keyed by the data
    # files' path, size and mtime: None: ~/.cache/beta_clip_jax; "": memory only (per process).
    c.index_cache = config_dict.placeholder(str)
    c.split = "train"
    c.skip_first = config_dict.placeholder(int)  # None: 1000 (SV-1k) for sharegpt4v, else 0
    c.max_records = config_dict.placeholder(int)  # None: all
    # Last fraction of the records (after skip_first) kept out of training for the `jsonl`
    # evaluator's eval_fraction (sources.held_out_range decides the split for both).
    c.eval_fraction = 0.0
    c.max_sentences = 5
    c.max_phrases = 30
    c.text_length = 248  # caption and sentence tokens, unless set per level below
    c.caption_length = config_dict.placeholder(int)  # None: text_length
    c.sentence_length = config_dict.placeholder(int)  # None: text_length
    c.phrase_length = 30
    # Packing: the texts of each group of pack_group images are concatenated into rows of
    # pack_length tokens (None: the longest level), pack_budget tokens per image (0: measured
    # on the data at start-up); the text tower then skips the padding (data/packing.py). Same
    # numbers; 2.2x faster B/16 steps and 1.5x faster demo steps on CPU (docs/bench.md).
    c.pack_texts = True
    c.pack_group = 8
    c.pack_length = config_dict.placeholder(int)
    c.pack_budget = 0
    c.image_size = config_dict.placeholder(int)  # None: the model's
    c.crop_scale = (0.5, 1.0)
    c.crop_ratio = (3 / 4, 4 / 3)
    c.jpeg_draft = True  # JPEG DCT-domain downscale to >= 2x image_size before cropping
    # Images whose header declares more pixels are skipped undecoded ("image_too_large"); never
    # above PIL's Image.MAX_IMAGE_PIXELS (docs/data.md, Bad records).
    c.max_image_pixels = sources.DEFAULT_MAX_IMAGE_PIXELS
    c.num_workers = 0  # grain worker processes (0: decode in this process)
    c.num_threads = 2  # batches built concurrently per process
    c.prefetch = 2  # batches buffered per thread / per worker
    c.max_skip_fraction = 0.01
    c.min_records_for_skip_check = 1000
    c.max_replacement_attempts = 100
    c.tfds = ml_collections.ConfigDict()
    c.tfds.name = ""
    c.tfds.data_dir = config_dict.placeholder(str)
    c.tfds.image_key = "image"
    c.tfds.caption_key = "caption"
    c.tfds.id_key = config_dict.placeholder(str)
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.num_train = 4096
    c.synthetic.num_eval = 512
    c.synthetic.seed = 0
    c.synthetic.min_objects = 2
    c.synthetic.max_objects = 4
    return c


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class RecordProcessor:
    """Source record -> one training example (uint8 image + tokenised text slots), or `_Skip`."""

    def __init__(self, source, tokenizer, data_cfg, *, image_size: int, training: bool):
        self.source = source
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.random_crop = training and getattr(source, "random_crop", True)
        self.crop_scale = tuple(data_cfg.crop_scale)
        self.crop_ratio = tuple(data_cfg.crop_ratio)
        self.draft_size = 2 * self.image_size if data_cfg.jpeg_draft else None
        self.max_pixels = data_cfg.get("max_image_pixels", sources.DEFAULT_MAX_IMAGE_PIXELS)
        sources.pixel_limit(self.max_pixels)  # a bad setting fails here, before any compile
        self.sizes = {
            "max_sentences": int(data_cfg.max_sentences),
            "max_phrases": int(data_cfg.max_phrases),
            **hierarchy.level_lengths(data_cfg),
        }

    def _record(self, index: int) -> dict:
        record_id = getattr(self.source, "record_id", lambda i: f"record {i}")
        try:
            record = self.source[index]
        except UnicodeDecodeError as e:
            raise _Skip("bad_utf8", f"{record_id(index)}: {e}") from e
        except sources.UnsafePathError as e:  # refused before anything is opened
            raise _Skip("unsafe_path", f"{record_id(index)}: {e}") from e
        except Exception as e:  # malformed JSON line, missing key, unreadable caption file...
            raise _Skip("bad_record", f"{record_id(index)}: {type(e).__name__}: {e}") from e
        return record

    def _texts(self, record: dict, rng: np.random.Generator) -> hierarchy.TextHierarchy:
        rid = record.get("id", "?")
        caption = record.get("caption")
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Skip("bad_utf8", f"{rid}: caption is not UTF-8 ({e})") from e
        if not isinstance(caption, str):
            raise _Skip("non_text_caption", f"{rid}: caption is {type(caption).__name__}")
        extra = {k: record.get(k) for k in ("sentences", "phrases")}
        for key, value in extra.items():
            if value is not None and not (
                isinstance(value, list | tuple) and all(isinstance(t, str) for t in value)
            ):
                raise _Skip("bad_record", f"{rid}: {key} must be a list of strings")
        try:  # per-sentence phrase groups (data/prepare.py) are checked by the hierarchy
            texts = hierarchy.build_hierarchy(
                caption,
                rng,
                max_sentences=self.sizes["max_sentences"],
                max_phrases=self.sizes["max_phrases"],
                sentence_phrases=record.get("sentence_phrases"),
                **extra,
            )
        except (TypeError, ValueError) as e:  # e.g. sentence_phrases of the wrong shape
            raise _Skip("bad_record", f"{rid}: {e}") from e
        if not texts.sentences:
            raise _Skip("empty_caption", f"{rid}: caption has no text ({caption[:80]!r})")
        # A caption that yields no phrase keeps its image, its phrase slots padded: the reference
        # trains on such images with their caption and sentences only.
        return texts

    def _image(self, record: dict, rng: np.random.Generator) -> np.ndarray:
        src = record.get("image_path", record.get("image"))
        rid = record.get("id", "?")
        try:
            img = sources.open_image(src, draft_size=self.draft_size, max_pixels=self.max_pixels)
        except FileNotFoundError as e:
            raise _Skip("missing_image", f"{rid}: {src}") from e
        except sources.ImageTooLargeError as e:
            raise _Skip("image_too_large", f"{rid}: {e}") from e
        except Exception as e:
            raise _Skip("corrupt_image", f"{rid}: {e}") from e
        if self.random_crop:
            return transforms.random_resized_crop(
                img, self.image_size, rng, self.crop_scale, self.crop_ratio
            )
        return transforms.resize_center_crop(img, self.image_size)

    def __call__(self, index: int, rng: np.random.Generator, with_image: bool = True) -> dict:
        record = self._record(index)
        texts = self._texts(record, rng)  # text first: a bad caption costs no image decode
        image = self._image(record, rng) if with_image else None
        try:
            example = hierarchy.tokenize_hierarchy(texts, self.tokenizer, **self.sizes)
        except Exception as e:
            raise _Skip("bad_record", f"{record.get('id', '?')}: tokenizer: {e}") from e
        if with_image:
            example["image"] = image
        return example

    def text_lengths(self, index: int, rng: np.random.Generator) -> list[int] | None:
        """Token count of each of a record's texts (None for an unusable record): what one
        image puts into a packed batch, for sizing the packing budget."""
        try:
            example = self(index, rng, with_image=False)
        except _Skip:
            return None
        _, lengths = packing.slot_tokens({k: v[None] for k, v in example.items()})
        return [int(n) for n in lengths[0] if n]


class PositionLoader:
    """(global stream position, source index) -> example with skips.

    A slot whose record is bad takes a replacement from the whole training range, drawn from
    (seed, position, attempt). The example carries "_offset" (the offset k of the record used
    in the range; source index = first + k) and "_shard_size" (the range's length); every
    failed attempt is counted in "_counts" and described in "_examples" (newline-joined
    `iterator.failure_line`s), which the TrainIterator turns into counts per distinct record.
    """

    def __init__(self, processor, *, seed, first, length, max_attempts):
        self.processor = processor
        self.seed = int(seed)
        self.first, self.length = int(first), int(length)  # source index = first + offset
        self.max_attempts = int(max_attempts)
        # offset -> (reason, failure line) of the records found unusable by this copy. Whether a
        # record is usable does not depend on its draw (the draw only samples sentences and a
        # crop), so answering from here gives what reading again would, without the read: the
        # batches stay the same for every number of worker processes (each has its own copy).
        self._bad: dict[int, tuple[str, str]] = {}

    def _example(self, offset: int, rng) -> dict | tuple[str, str]:
        """The record's example, or (reason, failure line) if it cannot be used."""
        known = self._bad.get(offset)
        if known is not None:
            return known
        try:
            return self.processor(self.first + offset, rng)
        except _Skip as e:
            self._bad[offset] = (e.reason, failure_line(offset, str(e)))
            return self._bad[offset]

    def at(self, position_and_index: tuple[int, int]) -> dict:
        """The example of a (position, index) pair, as ProcessRows gives them."""
        return self(*position_and_index)

    def __call__(self, position: int, index: int) -> dict:
        counts = np.zeros(len(COUNTERS), np.int32)
        failures = []
        epoch = position // self.length
        for attempt in range(self.max_attempts + 1):
            if attempt:
                rng = np.random.default_rng([self.seed, _REPLACEMENT_STREAM, position, attempt])
                index = self.first + int(rng.integers(self.length))
            offset = int(index) - self.first
            rng = np.random.default_rng([self.seed, epoch, int(index), attempt])
            example = self._example(offset, rng)
            if isinstance(example, tuple):
                counts[COUNTERS.index(example[0])] += 1
                failures.append(example[1])
                continue
            truncated = example.pop("truncated")
            first = COUNTERS.index(TRUNCATION_COUNTERS[0])
            counts[first : first + len(truncated)] = truncated
            example["_counts"] = counts
            example["_examples"] = "\n".join(failures)
            example["_offset"] = np.int64(offset)
            example["_shard_size"] = np.int64(self.length)
            return example
        distinct = [line.split("\t", 1)[1] for line in dict.fromkeys(failures)]
        raise DataSkipError(
            f"{self.max_attempts + 1} records in a row could not be used at stream position "
            f"{position} ({len(distinct)} distinct); examples:\n" + "\n".join(distinct[:10])
        )


def train_range(num_records, skip_first, max_records, eval_fraction=0.0) -> tuple[int, int]:
    """(first, length): training reads source indices [first, first + length), every process
    the same range (the global order).

    That is [skip_first, held-out start) capped at max_records; the held-out tail
    (sources.held_out_range) is never read, whatever max_records is.
    """
    start = min(skip_first, num_records)
    end, _ = sources.held_out_range(num_records, eval_fraction, skip_first)
    stop = end if max_records is None else min(end, start + max_records)
    if stop - start < 1:
        raise ValueError(
            f"no records left to train on (of {num_records}, skip_first={skip_first}, "
            f"max_records={max_records}, eval_fraction={eval_fraction})"
        )
    return start, stop - start


class ProcessRows:
    """Process-local stream position n -> (global position, source index) of the global order:
    row j of this process's batch s is row i * per_process + j of global batch s."""

    def __init__(self, stream, *, process_index: int, process_count: int, per_process: int):
        self.stream = stream  # the global stream: global position -> source index
        self.process_index = int(process_index)
        self.per_process = int(per_process)
        self.global_batch = self.per_process * int(process_count)

    def __call__(self, n: int) -> tuple[int, int]:
        s, j = divmod(int(n), self.per_process)
        position = s * self.global_batch + self.process_index * self.per_process + j
        return position, int(self.stream[position])

    def local_length(self, global_length: int) -> int:
        """Local positions of the whole global batches a stream of global_length holds."""
        return global_length // self.global_batch * self.per_process


def build_batches(
    data_cfg,
    *,
    batch_size_per_process: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
    tokenizer=None,
    training: bool = True,
    num_epochs: int | None = None,
    micro_batches: int = 1,
) -> grain.MapDataset:
    """grain MapDataset of raw batches (CONTRACTS.md keys + "_counts" [B, len(COUNTERS)] and
    "_examples" [B]); see the module doc. Raises before any compile for bad data settings."""
    from beta_clip_jax.tokenizer import Tokenizer

    size = data_cfg.image_size or image_size
    if not size:
        raise ValueError("no image size: set data.image_size or pass the model's image_size")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    source = sources.make_source(data_cfg, size)
    skip = data_cfg.skip_first
    skip = sources.default_skip_first(data_cfg.name) if skip is None else skip
    first, length = train_range(
        len(source), skip, data_cfg.max_records, data_cfg.get("eval_fraction", 0.0)
    )
    global_batch = batch_size_per_process * process_count
    if length < global_batch:
        raise ValueError(
            f"{length} training records, fewer than one global batch ({global_batch} = "
            f"{batch_size_per_process} per process x {process_count} processes)"
        )
    stream = grain.MapDataset.range(first, first + length)
    if training:
        stream = stream.shuffle(seed=seed)
    stream = stream.repeat(num_epochs)
    rows = ProcessRows(
        stream,
        process_index=process_index,
        process_count=process_count,
        per_process=batch_size_per_process,
    )
    processor = RecordProcessor(
        source, tokenizer or Tokenizer(), data_cfg, image_size=size, training=training
    )
    loader = PositionLoader(
        processor,
        seed=seed,
        first=first,
        length=length,
        max_attempts=data_cfg.max_replacement_attempts,
    )
    local = grain.MapDataset.range(rows.local_length(len(stream)))
    batches = local.map(rows).map(loader.at).batch(batch_size_per_process, drop_remainder=True)
    if not data_cfg.get("pack_texts"):
        return batches
    # Groups must tile the batch: checked here, before any worker starts.
    packing.group_images(batch_size_per_process, int(data_cfg.pack_group), micro_batches)
    rows = packing.pack_rows_per_group(data_cfg, processor, len(source), seed)
    return batches.map(
        packing.Packer(
            data_cfg,
            rows_per_group=rows,
            micro_batches=micro_batches,
            drop_counter=COUNTERS.index(packing.DROP_COUNTER),
        )
    )


def build_train_iterator(
    data_cfg,
    *,
    batch_size_per_process: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
    tokenizer=None,
    training: bool = True,
    num_epochs: int | None = None,
    micro_batches: int = 1,
) -> TrainIterator:
    """This process's iterator of CONTRACTS.md batches (`data_cfg` = config.data).

    image_size: the model's, used when data.image_size is None. training=False: centre crops, no
    shuffle. num_epochs=None repeats forever. micro_batches: the step's gradient accumulation,
    which packed batches are grouped for.
    """
    batches = build_batches(
        data_cfg, batch_size_per_process=batch_size_per_process, seed=seed,
        process_index=process_index, process_count=process_count, image_size=image_size,
        tokenizer=tokenizer, training=training, num_epochs=num_epochs,
        micro_batches=micro_batches,
    )  # fmt: skip
    return TrainIterator(batches, data_cfg, process_count=process_count)
