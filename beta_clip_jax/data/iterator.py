"""The training batch iterator: skip accounting per unique record, truncation warnings, resume.

`PositionLoader` (pipeline.py) marks each batch slot with the shard offset k of the record it
holds ("_offset"; the source index is first + step * k) and the shard's size ("_shard_size"),
and lists every record it could not use ("_examples": lines "k<TAB>reason: detail"). The
iterator strips these keys and keeps a ledger by offset: a record counts as seen once and, if
unusable, as skipped once, however often the stream draws it again (every epoch, or as someone
else's replacement). The skip counts and the data.max_skip_fraction check are therefore about
distinct records, and the check runs from the first batch on: once
data.min_records_for_skip_check distinct records were seen, or the whole shard if it is smaller.

Deduplicating here rather than in the loader keeps the loader's replacement rule a pure
function of (seed, position, attempt): worker processes each hold a copy of the loader, so a
"known bad" set shared between them would make batches depend on the number of workers. The
loader only memoises, per copy, which records failed, so it does not read them again; since
whether a record is usable does not depend on its random draw, that changes no batch.
"""

from __future__ import annotations

import base64
import logging
import math

import grain
import numpy as np
from absl import flags

from beta_clip_jax.data import hierarchy

SKIP_REASONS = (
    "missing_image", "corrupt_image", "empty_caption", "non_text_caption", "bad_utf8",
    "bad_record", "image_too_large", "unsafe_path",
)  # fmt: skip
# Layout of the per-record "_counts" vector: the skip reasons, then per text level the texts
# that filled their length (truncated or exactly full; counted, not skipped: truncation keeps
# EOT), then phrases a packed batch had no room for (data/packing.py).
TRUNCATION_COUNTERS = tuple(f"truncated_{level}" for level in hierarchy.LEVELS)
COUNTERS = (*SKIP_REASONS, *TRUNCATION_COUNTERS, "pack_dropped_phrases")
# The layout of states saved before image_too_large and unsafe_path (they carry no names).
_COUNTERS_BEFORE_NAMES = (*SKIP_REASONS[:6], *TRUNCATION_COUNTERS, "pack_dropped_phrases")
EXAMPLES_PER_REASON = 5
# The config field that sets each text level's length, and what it defaults to.
_LENGTH_FIELDS = {
    "caption": ("caption_length", " (default: data.text_length)"),
    "sentence": ("sentence_length", " (default: data.text_length)"),
    "phrase": ("phrase_length", ""),
}

log = logging.getLogger(__name__)


class DataSkipError(RuntimeError):
    """Too many records could not be used (past data.max_skip_fraction)."""


def failure_line(offset: int, text: str) -> str:
    """One "_examples" line: the record's shard offset, a tab, "reason: detail"."""
    return f"{int(offset)}\t{text}"


def parse_failure(line: str) -> tuple[int, str, str]:
    """(offset, reason, "reason: detail") of a `failure_line`."""
    offset, text = line.split("\t", 1)
    return int(offset), text.split(":", 1)[0], text


class SkipLedger:
    """Which records of this process's shard were seen, and which were unusable, by offset."""

    def __init__(self):
        self.size = 0  # records in the shard; known from the first batch
        self.num_seen = 0
        self._seen = None  # bool [size] until every record was seen, then None
        self.bad: dict[int, str] = {}  # offset -> reason
        self.examples: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}

    def see(self, offsets: np.ndarray, size: int) -> None:
        if not self.size:
            self.size = int(size)
            self._seen = np.zeros(self.size, bool)
        if self._seen is None:
            return
        new = np.unique(offsets)
        new = new[~self._seen[new]]
        self._seen[new] = True
        self.num_seen += len(new)
        if self.num_seen == self.size:  # a full pass: every later record is a repeat
            self._seen = None

    def add_bad(self, offset: int, reason: str, text: str) -> bool:
        """Records one failed read; True the first time this record fails."""
        if offset in self.bad:
            return False
        self.bad[offset] = reason
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(text)
        return True

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(SKIP_REASONS, 0)
        for reason in self.bad.values():
            out[reason] += 1
        return out

    def check_due(self, min_records: int, process_count: int = 1) -> bool:
        """Enough distinct records seen to judge the fraction: min_records, or this process's
        share of one pass (each process reads 1/process_count of every epoch)."""
        share = math.ceil(self.size / max(int(process_count), 1))
        return bool(self.size) and self.num_seen >= min(min_records, share)

    def state(self) -> dict:
        bits = None
        if self._seen is not None:
            bits = base64.b64encode(np.packbits(self._seen).tobytes()).decode("ascii")
        bad = {r: sorted(k for k, v in self.bad.items() if v == r) for r in SKIP_REASONS}
        return {
            "shard_size": self.size,
            "records_seen": self.num_seen,
            "seen_bits": bits,
            "bad": {r: k for r, k in bad.items() if k},
            "examples": {r: list(e) for r, e in self.examples.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> SkipLedger:
        ledger = cls()
        ledger.size = int(state["shard_size"])
        ledger.num_seen = int(state["records_seen"])
        if state.get("seen_bits"):
            packed = np.frombuffer(base64.b64decode(state["seen_bits"]), np.uint8)
            ledger._seen = np.unpackbits(packed, count=ledger.size).astype(bool)
        elif ledger.size and ledger.num_seen < ledger.size:
            ledger._seen = np.zeros(ledger.size, bool)  # first batch not read yet
        ledger.bad = {int(k): r for r, ks in state["bad"].items() for k in ks}
        ledger.examples = {r: list(state["examples"].get(r, [])) for r in SKIP_REASONS}
        return ledger


def skip_message(ledger: SkipLedger, max_skip_fraction: float) -> str:
    """The DataSkipError text: totals, distinct example records per reason, the three fixes."""
    skipped, seen = len(ledger.bad), ledger.num_seen
    fraction = skipped / seen
    lines = [
        f"{skipped} of {seen} distinct data records read so far were unusable ({fraction:.2%} "
        f"> data.max_skip_fraction={max_skip_fraction}; the training range has {ledger.size} "
        "records, each counted once by this process however often it is drawn):"
    ]
    for reason, n in ledger.counts().items():
        if n:
            lines.append(f"  {reason}: {n} record{'s' if n > 1 else ''}, e.g.")
            lines += [f"    {e.split(': ', 1)[-1]}" for e in ledger.examples[reason]]
    suggest = math.ceil(fraction * 100) / 100
    lines += [
        "To go on, do one of:",
        "  - fix these records (or their image files) and rerun;",
        f"  - raise data.max_skip_fraction (e.g. --config.data.max_skip_fraction={suggest:g}) to "
        "train without them: each unusable record is replaced in its batch by another record;",
        "  - write a copy without them with `python -m beta_clip_jax.data.prepare --input=FILE "
        "--format=jsonl --out=NEW.jsonl` (--image_root=ROOT if the images are not beside FILE; "
        "--check lists them without writing), which drops the records training would skip, "
        "and train on NEW.jsonl.",
    ]
    return "\n".join(lines)


class TrainIterator(grain.DatasetIterator):
    """Iterator of CONTRACTS.md batches; keeps the data counters and resumes exactly.

    Its state is the next batch index plus the counters (JSON-able), not grain's reader state,
    so a run may resume with another num_workers / num_threads. Usable with get_state/set_state
    and with grain.checkpoint.CheckpointSave/Restore (Orbax). Counts are this process's;
    `metrics()` gives them as `data/skipped_<reason>` etc. Call `close()` to stop workers.
    """

    def __init__(self, batches, data_cfg, log_examples: bool = True, process_count: int = 1):
        super().__init__()
        self.process_count = int(process_count)
        self._batches = batches  # MapDataset of raw batches (with the "_" keys above)
        self._read = grain.ReadOptions(
            num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch
        )
        self._workers = int(data_cfg.num_workers)
        self._buffer = int(data_cfg.prefetch)
        self.max_skip_fraction = float(data_cfg.max_skip_fraction)
        self.min_records = int(data_cfg.min_records_for_skip_check)
        self._lengths = hierarchy.level_lengths(data_cfg)
        self.log_examples = log_examples
        self._inner = None
        self._next_batch = 0
        # Truncation and packing totals; the skip slots mirror the ledger's distinct counts.
        self.counts = np.zeros(len(COUNTERS), np.int64)
        self.ledger = SkipLedger()
        self._seen_base = 0  # records another process reported before a shared restore
        self._warned: set[str] = set()

    @property
    def records_seen(self) -> int:
        return self.ledger.num_seen

    @property
    def examples(self) -> dict[str, list[str]]:
        return self.ledger.examples

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
        offsets = np.asarray(batch.pop("_offset")).reshape(-1)
        size = int(np.asarray(batch.pop("_shard_size")).reshape(-1)[0])
        # The skip slots of "_counts" count failed reads, repeats included; the ledger below
        # counts distinct records instead, so only the other counters are summed here.
        self.counts[len(SKIP_REASONS) :] += counts[len(SKIP_REASONS) :]
        lines = (line for text in details.reshape(-1).tolist() for line in text.split("\n"))
        failed = [parse_failure(line) for line in lines if line]
        self.ledger.see(np.array([f[0] for f in failed] + offsets.tolist(), np.int64), size)
        for offset, reason, text in failed:
            if self.ledger.add_bad(offset, reason, text):
                self.counts[COUNTERS.index(reason)] += 1
                if reason not in self._warned and self.log_examples:
                    self._warned.add(reason)
                    log.warning("skipping unusable data record (first %s): %s", reason, text)
        self._warn_truncation()
        self._check()
        return batch

    def _warn_truncation(self):
        """Once per level and run: texts are being cut, and which field keeps them whole."""
        for level, counter in zip(hierarchy.LEVELS, TRUNCATION_COUNTERS, strict=True):
            n = int(self.counts[COUNTERS.index(counter)])
            if not n or counter in self._warned:
                continue
            self._warned.add(counter)
            field, default = _LENGTH_FIELDS[level]
            log.warning(
                "%d %s texts so far filled data.%s=%d tokens and were cut there (or fit it "
                "exactly; EOT kept): raise data.%s%s to keep them whole (counted in data/%s)",
                n, level, field, self._lengths[field], field, default, counter,
            )  # fmt: skip

    def _check(self):
        ledger = self.ledger
        if not ledger.check_due(self.min_records, self.process_count):
            return
        if len(ledger.bad) > self.max_skip_fraction * ledger.num_seen:
            raise DataSkipError(skip_message(ledger, self.max_skip_fraction))

    def metrics(self) -> dict[str, int]:
        """Totals for metrics.jsonl (this process's): data/skipped_<reason> (distinct unusable
        records), data/truncated_<level> and their sum data/truncated_texts,
        data/pack_dropped_phrases, data/records_seen (distinct records read)."""
        out = {f"data/skipped_{r}": int(self.counts[COUNTERS.index(r)]) for r in SKIP_REASONS}
        levels = {f"data/{c}": int(self.counts[COUNTERS.index(c)]) for c in TRUNCATION_COUNTERS}
        out.update(levels)
        out["data/truncated_texts"] = sum(levels.values())
        out["data/pack_dropped_phrases"] = int(self.counts[COUNTERS.index("pack_dropped_phrases")])
        out["data/records_seen"] = int(self.ledger.num_seen) - self._seen_base
        return out

    def get_state(self) -> dict:
        return {
            "next_batch": self._next_batch,
            "counts": [int(n) for n in self.counts],
            "counter_names": list(COUNTERS),
            **self.ledger.state(),
        }

    def set_state(self, state: dict) -> None:
        self.close()  # the reader restarts lazily at the restored position
        self._next_batch = int(state["next_batch"])
        self.counts = np.zeros(len(COUNTERS), np.int64)
        names = state.get("counter_names")
        if names is None:
            known = (COUNTERS, _COUNTERS_BEFORE_NAMES)
            names = next((n for n in known if len(n) == len(state["counts"])), None)
        if names is not None and len(names) == len(state["counts"]):
            for name, n in zip(names, state["counts"], strict=True):
                if name in COUNTERS:  # restored by name: new counters start at 0
                    self.counts[COUNTERS.index(name)] = n
        else:  # a checkpoint of an older counter layout: the order resumes, the tallies restart
            log.warning("data counters of an older layout in the checkpoint; counting anew")
        if "bad" in state:
            self.ledger = SkipLedger.from_state(state)
        else:  # counted per read, before the ledger: which records they were is unknown
            log.warning("checkpoint without the per-record skip ledger; skip counts restart")
            self.ledger = SkipLedger()
            self.counts[: len(SKIP_REASONS)] = 0

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """`merge_states` (the checkpoint calls it through the iterator it is given)."""
        return merge_states(states)

    def set_shared_state(self, state: dict, process_index: int) -> None:
        """Restores a `merge_states` state, which holds no process: every process takes the
        position and the merged ledger (a record any process counted is not counted again),
        and process 0 alone the totals, so that counters summed over processes stay right
        with any number of processes."""
        self.set_state(state)
        self._share_totals(process_index)

    def adopt_merged(self, state: dict, process_index: int) -> None:
        """Takes the merged ledger and totals of a checkpoint save while running on (the
        reader and its position are kept): from here on no process counts again a record
        another one counted, so the summed counters are exact again after every save."""
        if int(state["next_batch"]) != self._next_batch:
            raise ValueError(f"merged state at batch {state['next_batch']}, not {self._next_batch}")
        position, reader = self._next_batch, self._inner
        self._inner = None  # set_state would close the running reader
        self.set_state(state)
        self._next_batch, self._inner = position, reader
        self._share_totals(process_index)

    def _share_totals(self, process_index: int) -> None:
        self._seen_base = 0
        if int(process_index) != 0:
            self.counts[:] = 0
            self._seen_base = self.ledger.num_seen

    def close(self) -> None:
        if self._inner is not None:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
            self._inner = None


def merge_states(states: list[dict]) -> dict:
    """One iterator state for every process from each process's `get_state()`: the common
    position, the totals summed, the ledgers' union (records seen, distinct unusable records
    and their examples). What a checkpoint stores, so a run resumes on any number of
    processes."""
    positions = {int(s["next_batch"]) for s in states}
    if len(positions) != 1:
        raise ValueError(f"the processes' data iterators are at different batches: {positions}")
    names = list(COUNTERS)
    counts = np.zeros(len(names), np.int64)
    for state in states:
        for name, n in zip(state.get("counter_names", names), state["counts"], strict=True):
            if name in COUNTERS:
                counts[names.index(name)] += int(n)
    ledgers = [SkipLedger.from_state(s) for s in states if "bad" in s]
    merged = _merge_ledgers(ledgers)
    for reason, n in merged.counts().items():  # distinct over all processes
        counts[names.index(reason)] = n
    return {
        "next_batch": positions.pop(),
        "counts": [int(n) for n in counts],
        "counter_names": names,
        **merged.state(),
    }


def _merge_ledgers(ledgers: list[SkipLedger]) -> SkipLedger:
    out = SkipLedger()
    out.size = max((ledger.size for ledger in ledgers), default=0)
    if out.size:
        seen = np.zeros(out.size, bool)
        for ledger in ledgers:
            if not ledger.size:
                continue
            if ledger._seen is None:  # a full pass: every record seen
                seen[:] = True
            else:
                seen[: ledger.size] |= ledger._seen
        out.num_seen = int(seen.sum())
        out._seen = None if out.num_seen == out.size else seen
    for ledger in ledgers:
        for offset, reason in ledger.bad.items():
            out.bad.setdefault(offset, reason)
        for reason, texts in ledger.examples.items():
            kept = out.examples[reason]
            kept += [t for t in texts if t not in kept][: EXAMPLES_PER_REASON - len(kept)]
    return out


def _ensure_flags_parsed():
    """grain workers read absl flags; outside `app.run` (tests, notebooks) use their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
