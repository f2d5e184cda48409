"""WebDataset tar shards (`data.name=webdataset`) read at random, and their writer.

`data.path` names the shards: a brace pattern (`shards/{000000..000127}.tar`), a glob, a
folder of .tar files or one file; `data.shards` a list of them (fileio.expand_shards). A
sample is the tar members sharing a key, the member name up to the first dot of its base name
(`dir/000123.jpg` + `dir/000123.json`): the image is its jpg / jpeg / png / webp / bmp member,
the caption its txt member, else the "caption" of its json member, whose optional
"sentences", "phrases" and "sentence_phrases" are the precomputed caption hierarchy.

For the global data order every sample must be readable on its own: each shard is scanned
once (tarfile, sequentially, so a bucket is read front to back once) for its members' data
offsets and sizes, 56 bytes a sample plus its key, cached by data/index_cache.py. A sample is
then a ranged read of its members. A sample without an image or a caption member is a counted
bad record; a shard cut short keeps the samples before the cut. Shards must be uncompressed
tars (a .tar.gz has no byte offsets to seek to).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile

import numpy as np
from etils import epath

from beta_clip_jax.data import fileio, index_cache, sources

IMAGE_EXTS = tuple(e.lstrip(".") for e in sources.IMAGE_EXTENSIONS)
_MEMBERS = ("image", "txt", "json")  # the (offset, size) pairs kept per sample
_log = logging.getLogger(__name__)


def split_member(name: str) -> tuple[str, str]:
    """(sample key, lower-case extension) of a tar member name: `a/b.c.jpg` -> (`a/b`, `c.jpg`)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _member_kind(ext: str) -> str | None:
    if ext in IMAGE_EXTS:
        return "image"
    return ext if ext in ("txt", "json") else None


def index_shard(path: str) -> dict[str, list]:
    """Keys (in first-seen order) and per-member (offset, size) lists (-1: no such member)."""
    samples: dict[str, list[int]] = {}
    with fileio.open_binary(path) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
        except tarfile.TarError as e:
            raise ValueError(
                f"{path}: not an uncompressed tar file ({e}); WebDataset shards are read at "
                "random, so they cannot be compressed"
            ) from None
        try:
            for member in tar:
                key, ext = split_member(member.name)
                kind = _member_kind(ext)
                if not member.isfile() or kind is None or posixpath.basename(key).startswith("."):
                    continue
                slot = samples.setdefault(key, [-1] * (2 * len(_MEMBERS)))
                at = 2 * _MEMBERS.index(kind)
                if slot[at] < 0:  # the first image member of a sample wins
                    slot[at : at + 2] = [member.offset_data, member.size]
        except tarfile.TarError as e:
            _log.warning(
                "%s is cut short (%s): indexed the %d samples before", path, e, len(samples)
            )
    return {"keys": list(samples), "members": list(samples.values())}


def build_index(shards: list[str]) -> dict:
    per_shard = fileio.thread_map(index_shard, shards)
    keys = [k for s in per_shard for k in s["keys"]]
    members = [m for s in per_shard for m in s["members"]]
    return {
        "shard": np.repeat(
            np.arange(len(shards), dtype=np.int32), [len(s["keys"]) for s in per_shard]
        ),
        "keys": np.asarray(keys, dtype=str) if keys else np.zeros(0, "U1"),
        "members": np.asarray(members, np.int64).reshape(-1, 2 * len(_MEMBERS)),
    }


class WebDatasetSource:
    """Samples of WebDataset tar shards as records (module doc)."""

    how = (
        "set data.path to the shards, e.g. 'shards/{000000..000127}.tar' (a brace pattern, a "
        "glob, a folder of .tar files), or data.shards to a list of them"
    )

    def __init__(self, spec, index_cache_dir: str | None = None):
        self.shards = fileio.expand_shards(spec, ".tar", "WebDataset")
        index = index_cache.cached_index(
            "webdataset", self.shards, {}, lambda: build_index(self.shards), index_cache_dir
        )
        self._shard, self._keys, self._members = index["shard"], index["keys"], index["members"]
        if not len(self._keys):
            raise ValueError(f"no samples in the WebDataset shards {self.shards[:3]}...")
        self._names = [os.path.basename(s) for s in self.shards]

    def __len__(self) -> int:
        return len(self._keys)

    def record_id(self, index: int) -> str:
        return f"{self._names[self._shard[index]]}/{self._keys[index]}"

    def _member(self, index: int, kind: str) -> bytes | None:
        at = 2 * _MEMBERS.index(kind)
        offset, size = (int(v) for v in self._members[index, at : at + 2])
        if offset < 0:
            return None
        return fileio.read_range(self.shards[self._shard[index]], offset, size)

    def __getitem__(self, index: int) -> dict:
        meta = self._member(index, "json")
        entry = sources.json_object(meta) if meta is not None else {}
        text = self._member(index, "txt")
        if text is not None:
            entry["caption"] = text.decode("utf-8").strip()
        if "caption" not in entry:
            raise ValueError("no caption: the sample has no .txt member and no json 'caption'")
        image = self._member(index, "image")
        if image is None:
            raise ValueError(f"no image member ({', '.join(IMAGE_EXTS)})")
        return {
            "id": self.record_id(index),
            "image": image,
            "caption": entry["caption"],
            **sources.hierarchy_fields(entry),
        }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def write_sample(tar: tarfile.TarFile, key: str, image: bytes, image_ext: str, meta: dict):
    """One sample: `key.<image_ext>` (the encoded image), `key.txt` (the caption, for other
    WebDataset readers) and `key.json` (the caption and its hierarchy)."""
    _add_member(tar, f"{key}.{image_ext.lower().lstrip('.')}", image)
    _add_member(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
    _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


class WebDatasetWriter(fileio.ShardedWriter):
    """Records {"image": encoded bytes, "image_ext", "caption", hierarchy fields, "id"?} into
    `PREFIX-00000-of-0000N.tar` shards; sample keys are the records' 9-digit positions."""

    suffix = ".tar"

    def _open(self, path):
        f = epath.Path(path).open("wb")
        return f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)

    def _write(self, handle, record, index):
        meta = {k: v for k, v in record.items() if k not in ("image", "image_ext")}
        write_sample(handle[1], f"{index:09d}", record["image"], record["image_ext"], meta)

    def _close(self, handle):
        handle[1].close()
        handle[0].close()
