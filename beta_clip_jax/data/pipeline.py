"""Training input pipeline: grain MapDataset from a record source to CONTRACTS.md batches.

    source indices [skip_first, +max_records) -> per-process shard (interleaved, disjoint, drop
    remainder) -> shuffle (seeded, reshuffled each epoch) -> repeat -> per position: decode +
    crop image, caption hierarchy, tokenise -> batch -> (worker processes) -> TrainIterator

Every record is a pure function of (seed, epoch, source index): its crop and sentence sample come
from `np.random.default_rng([seed, epoch, index, attempt])`. A record that cannot be used is
replaced in the same batch slot by a record drawn from `(seed, position, attempt)`, so batches stay
full and identical whatever the number of worker processes, and the iterator state (the next
batch index plus the skip totals) restores exactly, even with another number of workers. Skips
travel inside each batch ("_counts", "_examples"), so counting is correct with worker processes;
`TrainIterator` strips them, keeps totals, warns once per reason with an example, and stops past
`max_skip_fraction`.
"""

from __future__ import annotations

import logging

import grain
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_dict

from beta_clip_jax.data import hierarchy, packing, sources, transforms

SKIP_REASONS = (
    "missing_image", "corrupt_image", "empty_caption", "non_text_caption", "bad_utf8",
    "bad_record",
)  # fmt: skip
# Layout of the per-record "_counts" vector: the skip reasons, then per text level the texts
# that filled their length (truncated or exactly full; counted, not skipped: truncation keeps
# EOT), then phrases a packed batch had no room for (data/packing.py).
TRUNCATION_COUNTERS = tuple(f"truncated_{level}" for level in hierarchy.LEVELS)
COUNTERS = (*SKIP_REASONS, *TRUNCATION_COUNTERS, "pack_dropped_phrases")
_REPLACEMENT_STREAM = 0x5EED

log = logging.getLogger(__name__)


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data` defaults (synthetic scenes; K = 1 + 5 + 30 texts as the released runs)."""
    c = ml_collections.ConfigDict()
    c.name = "synthetic"  # synthetic | sharegpt4v | jsonl | urban1k | tfds
    c.path = config_dict.placeholder(str)  # json / jsonl file or Urban1K folder
    c.image_root = config_dict.placeholder(str)  # joined with relative image paths
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


class DataSkipError(RuntimeError):
    """Too many records could not be used (past data.max_skip_fraction)."""


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
            if value is not None and not all(isinstance(t, str) for t in value):
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
        except ValueError as e:
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
            img = sources.open_image(src, draft_size=self.draft_size)
        except FileNotFoundError as e:
            raise _Skip("missing_image", f"{rid}: {src}") from e
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
    """grain map_with_index function: stream position + source index -> example with skips.

    A slot whose record is bad takes a replacement from the process's own shard, drawn from
    (seed, position, attempt); every failure is counted in "_counts" and described in
    "_examples" (newline-joined "reason: detail").
    """

    def __init__(self, processor, *, seed, shard, max_attempts):
        self.processor = processor
        self.seed = int(seed)
        self.first, self.step, self.length = shard  # source index = first + step * k
        self.max_attempts = int(max_attempts)

    def __call__(self, position: int, index: int) -> dict:
        counts = np.zeros(len(COUNTERS), np.int32)
        failures = []
        epoch = position // self.length
        for attempt in range(self.max_attempts + 1):
            if attempt:
                rng = np.random.default_rng([self.seed, _REPLACEMENT_STREAM, position, attempt])
                index = self.first + self.step * int(rng.integers(self.length))
            rng = np.random.default_rng([self.seed, epoch, int(index), attempt])
            try:
                example = self.processor(int(index), rng)
            except _Skip as e:
                counts[COUNTERS.index(e.reason)] += 1
                failures.append(str(e))
                continue
            truncated = example.pop("truncated")
            first = COUNTERS.index(TRUNCATION_COUNTERS[0])
            counts[first : first + len(truncated)] = truncated
            example["_counts"] = counts
            example["_examples"] = "\n".join(failures)
            return example
        raise DataSkipError(
            f"{self.max_attempts + 1} records in a row could not be used at stream position "
            f"{position}; examples:\n" + "\n".join(failures[:10])
        )


class TrainIterator(grain.DatasetIterator):
    """Iterator of CONTRACTS.md batches; keeps the skip totals and resumes exactly.

    Its state is the next batch index plus the totals (JSON-able), not grain's reader state, so
    a run may resume with another num_workers / num_threads. Usable with get_state/set_state and
    with grain.checkpoint.CheckpointSave/Restore (Orbax). Counts are this process's; `metrics()`
    gives them as `data/skipped_<reason>` etc. Call `close()` to stop worker processes.
    """

    def __init__(self, batches, data_cfg, log_examples: bool = True):
        super().__init__()
        self._batches = batches  # MapDataset of raw batches (with "_counts"/"_examples")
        self._read = grain.ReadOptions(
            num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch
        )
        self._workers = int(data_cfg.num_workers)
        self._buffer = int(data_cfg.prefetch)
        self.max_skip_fraction = float(data_cfg.max_skip_fraction)
        self.min_records = int(data_cfg.min_records_for_skip_check)
        self.log_examples = log_examples
        self._inner = None
        self._next_batch = 0
        self.counts = np.zeros(len(COUNTERS), np.int64)
        self.records_seen = 0
        self.examples: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
        self._warned: set[str] = set()

    def _start(self):
        """Reader from batch `_next_batch` on. Workers take every num_workers-th batch and are
        read round-robin, so the order equals the in-process one."""
        it_ds = self._batches[self._next_batch :].to_iter_dataset(self._read)
        if self._workers > 0:
            _ensure_flags_parsed()
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._workers, per_worker_buffer_size=self._buffer
                )
            )
        return iter(it_ds)

    def __next__(self) -> dict:
        if self._inner is None:
            self._inner = self._start()
        batch = next(self._inner)
        self._next_batch += 1
        counts = batch.pop("_counts").sum(axis=0)
        details = batch.pop("_examples")
        self.counts += counts
        self.records_seen += len(batch["image"]) + int(counts[: len(SKIP_REASONS)].sum())
        for text in details.reshape(-1).tolist():
            for line in filter(None, text.split("\n")):
                reason = line.split(":", 1)[0]
                if len(self.examples[reason]) < 5:
                    self.examples[reason].append(line)
                if reason not in self._warned and self.log_examples:
                    self._warned.add(reason)
                    log.warning("skipping unusable data record (first %s): %s", reason, line)
        self._check()
        return batch

    def _check(self):
        skipped = int(self.counts[: len(SKIP_REASONS)].sum())
        seen = self.records_seen
        if seen >= self.min_records and skipped > self.max_skip_fraction * seen:
            counts = zip(SKIP_REASONS, self.counts[: len(SKIP_REASONS)], strict=True)
            lines = [f"  {r}: {int(n)}" for r, n in counts if n]
            lines += [f"  e.g. {e}" for r in SKIP_REASONS for e in self.examples[r][:3]]
            raise DataSkipError(
                f"{skipped} of {seen} data records were unusable "
                f"({skipped / seen:.2%} > data.max_skip_fraction={self.max_skip_fraction}):\n"
                + "\n".join(lines)
            )

    def metrics(self) -> dict[str, int]:
        """Totals for metrics.jsonl: data/skipped_<reason>, data/truncated_<level> and their sum
        data/truncated_texts, data/pack_dropped_phrases, data/records_seen (this process's)."""
        out = {f"data/skipped_{r}": int(self.counts[COUNTERS.index(r)]) for r in SKIP_REASONS}
        levels = {f"data/{c}": int(self.counts[COUNTERS.index(c)]) for c in TRUNCATION_COUNTERS}
        out.update(levels)
        out["data/truncated_texts"] = sum(levels.values())
        out["data/pack_dropped_phrases"] = int(self.counts[COUNTERS.index("pack_dropped_phrases")])
        out["data/records_seen"] = int(self.records_seen)
        return out

    def get_state(self) -> dict:
        return {
            "next_batch": self._next_batch,
            "counts": [int(n) for n in self.counts],
            "records_seen": int(self.records_seen),
            "examples": {r: list(e) for r, e in self.examples.items()},
        }

    def set_state(self, state: dict) -> None:
        self.close()  # the reader restarts lazily at the restored position
        self._next_batch = int(state["next_batch"])
        self.counts = np.zeros(len(COUNTERS), np.int64)
        if len(state["counts"]) == len(COUNTERS):
            self.counts[:] = state["counts"]
        else:  # a checkpoint of an older counter layout: the order resumes, the tallies restart
            log.warning("data counters of an older layout in the checkpoint; counting anew")
        self.records_seen = int(state["records_seen"])
        self.examples = {r: list(state["examples"].get(r, [])) for r in SKIP_REASONS}

    def close(self) -> None:
        if self._inner is not None:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
            self._inner = None


def shard_range(
    num_records, skip_first, max_records, process_index, process_count, eval_fraction=0.0
):
    """(first, step, length): this process's source indices, first + step * k for k < length.

    Training reads [skip_first, held-out start) capped at max_records; the held-out tail
    (sources.held_out_range) is never read, whatever max_records is.
    """
    start = min(skip_first, num_records)
    end, _ = sources.held_out_range(num_records, eval_fraction, skip_first)
    stop = end if max_records is None else min(end, start + max_records)
    length = (stop - start) // process_count
    if length < 1:
        raise ValueError(
            f"{stop - start} records (of {num_records}, skip_first={skip_first}, "
            f"eval_fraction={eval_fraction}) cannot give every one of {process_count} processes "
            "a record"
        )
    return start + process_index, process_count, length


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
    shard = shard_range(
        len(source), skip, data_cfg.max_records, process_index, process_count,
        data_cfg.get("eval_fraction", 0.0),
    )  # fmt: skip
    first, step, length = shard
    if length < batch_size_per_process:
        raise ValueError(
            f"process shard has {length} records, fewer than one batch ({batch_size_per_process})"
        )
    ds = grain.MapDataset.range(first, first + step * length, step)
    if training:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    processor = RecordProcessor(
        source, tokenizer or Tokenizer(), data_cfg, image_size=size, training=training
    )
    loader = PositionLoader(
        processor, seed=seed, shard=shard, max_attempts=data_cfg.max_replacement_attempts
    )
    batches = ds.map_with_index(loader).batch(batch_size_per_process, drop_remainder=True)
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
    return TrainIterator(batches, data_cfg)


def _ensure_flags_parsed():
    """grain workers read absl flags; outside `app.run` (tests, notebooks) use their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
