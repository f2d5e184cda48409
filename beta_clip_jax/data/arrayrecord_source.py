"""ArrayRecord shards (`data.name=array_record`), as `data.prepare --out_format=array_record`
writes them, read at random through array_record's ArrayRecordReader.

One record per example: a msgpack map (or a JSON object) {"image": encoded image bytes, or an
image path string (also as "image_path") relative to `data.image_root`, else to the shards'
folder; "caption"; optional "sentences", "phrases", "sentence_phrases"; optional "id", the
input line it came from}. `data.path` names the shards like WebDataset's (a brace pattern, a
glob, a folder, one file, or the `PREFIX` of `PREFIX-00000-of-0000N.array_record`);
`data.shards` lists them. The records of shard k follow those of shard k - 1.

ArrayRecordReader reads local files and gs:// paths itself. Shards on any other filesystem
(s3://, a fake one in tests...) are copied once into the cache folder (data.index_cache) and
read there. Shards written with groups of several records (not `group_size:1`) still read,
but every random read then decodes a whole group: a warning says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading

import msgpack
import numpy as np
from etils import epath

from beta_clip_jax.data import fileio, index_cache, sources

SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record a chunk: a random read decodes only that record
READER_OPTIONS = "readahead_buffer_size:0"  # no read-ahead: the global order reads at random
_NATIVE_SCHEMES = ("gs://",)
_log = logging.getLogger(__name__)


def _module():
    try:
        from array_record.python import array_record_module
    except ImportError as e:
        raise ImportError("ArrayRecord files need `pip install array-record`") from e
    return array_record_module


def open_reader(path: str):
    """An ArrayRecordReader for random access; ValueError naming a file it cannot open."""
    reader = _module().ArrayRecordReader(path, READER_OPTIONS)
    if not reader.ok():
        raise ValueError(f"cannot open {path} as an ArrayRecord file (missing, cut or foreign)")
    return reader


def _staged(path: str, cache_dir: str | None) -> str:
    """A path ArrayRecordReader can open: local and gs:// paths as they are, any other one
    copied (once, by its identity) into the cache folder."""
    if not fileio.is_remote(path) or path.startswith(_NATIVE_SCHEMES):
        return path
    size, mtime = fileio.identity(path)
    tag = hashlib.sha256(json.dumps([path, size, mtime]).encode()).hexdigest()[:16]
    root = index_cache.cache_root(cache_dir)
    root = root if root and not fileio.is_remote(root) else tempfile.gettempdir()
    local = os.path.join(root, "staged", tag, os.path.basename(path))
    if not (os.path.exists(local) and os.path.getsize(local) == size):
        _log.info("copying %s to %s (ArrayRecordReader reads local and gs:// files)", path, local)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}"
        with epath.Path(path).open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, local)
    return local


def _shard_info(path: str) -> tuple[int, bool]:
    """(records, whether they were written in groups of several) of one shard."""
    reader = open_reader(path)
    try:
        options = reader.writer_options_string() or ""
        return int(reader.num_records()), "group_size:1," not in options + ","
    finally:
        reader.close()


def build_index(paths: list[str]) -> dict:
    info = fileio.thread_map(_shard_info, paths)
    return {
        "counts": np.asarray([n for n, _ in info], np.int64).reshape(-1),
        "grouped": np.asarray([g for _, g in info], bool).reshape(-1),
    }


def decode_record(raw: bytes) -> dict:
    """A record's map: JSON when it starts with "{", else msgpack (strings strict UTF-8:
    UnicodeDecodeError, the bad_utf8 skip; ValueError for anything malformed)."""
    if raw[:1] == b"{":
        return sources.json_object(raw)
    entry = msgpack.unpackb(raw, raw=False)
    if not isinstance(entry, dict):
        raise ValueError(f"a msgpack {type(entry).__name__}, not a map")
    return entry


def encode_record(record: dict) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


class ArrayRecordSource:
    """Records of ArrayRecord shards (module doc). Readers open lazily in each process."""

    def __init__(self, spec, image_root: str | None = None, index_cache_dir: str | None = None):
        shards = fileio.expand_shards(spec, SUFFIX, "ArrayRecord")
        self.paths = fileio.thread_map(lambda p: _staged(p, index_cache_dir), shards)
        index = index_cache.cached_index(
            "array_record", self.paths, {}, lambda: build_index(self.paths), index_cache_dir
        )
        if index["grouped"].any():
            _log.warning(
                "%d of %d ArrayRecord shards (first: %s) were not written with group_size:1: "
                "every random read decodes a whole group of records; rewrite them with "
                "data.prepare --out_format=array_record", int(index["grouped"].sum()),
                len(shards), shards[int(np.argmax(index["grouped"]))],
            )  # fmt: skip
        self._ends = np.cumsum(index["counts"])
        if not len(self) > 0:
            raise ValueError(f"no records in the ArrayRecord shards {shards[:3]}...")
        self._names = [os.path.basename(s) for s in shards]
        self.allow_absolute = not image_root
        self.image_root = image_root or fileio.parent(shards[0])
        self._readers, self._lock = {}, threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._readers, self._lock = {}, threading.Lock()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._ends, index, side="right"))
        return shard, index - (int(self._ends[shard - 1]) if shard else 0)

    def record_id(self, index: int) -> str:
        shard, position = self._locate(index)
        return f"{self._names[shard]}[{position}]"

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            with self._lock:
                reader = self._readers.get(shard) or open_reader(self.paths[shard])
                self._readers[shard] = reader
        return reader

    def __getitem__(self, index: int) -> dict:
        shard, position = self._locate(index)
        entry = decode_record(self._reader(shard).read([position])[0])
        rid = self.record_id(index)
        if isinstance(entry.get("id"), str):
            rid = f"{rid} ({entry['id']})"
        if "caption" not in entry:
            raise ValueError("no 'caption' field")
        record = {"id": rid, "caption": entry["caption"]}
        image = entry.get("image", entry.get("image_path"))
        if isinstance(image, bytes):
            record["image"] = image
        else:
            record["image_path"] = sources.resolve_image_path(
                self.image_root, image, allow_absolute=self.allow_absolute
            )
        return {**record, **sources.hierarchy_fields(entry)}


class ArrayRecordWriter(fileio.ShardedWriter):
    """Records into `PREFIX-00000-of-0000N.array_record` shards (group_size:1), each
    `encode_record` of the record without its "image_ext"."""

    suffix = SUFFIX

    def _open(self, path):
        return _module().ArrayRecordWriter(path, WRITER_OPTIONS)

    def _write(self, handle, record, index):
        handle.write(encode_record({k: v for k, v in record.items() if k != "image_ext"}))

    def _close(self, handle):
        handle.close()
