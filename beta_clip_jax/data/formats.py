"""Your own data in the common formats: `data.name` = csv, webdataset, array_record, folder.

Each is a random-access source over its files (the global data order reads any record by
index), yields the record dicts of data/sources.py (the image as a path or encoded bytes, the
caption, and the precomputed caption hierarchy when the data carries it; the pipeline derives
it otherwise), counts bad records as skips rather than failing, reads any filesystem
etils.epath knows, and builds its start-up index once (data/index_cache.py):

    data.name     module                          data.path
    csv           data/csv_source.py              a CSV / TSV file
    webdataset    data/webdataset_source.py       tar shards: a brace pattern, glob or folder
    array_record  data/arrayrecord_source.py      ArrayRecord shards, or their PREFIX
    folder        data/folder_source.py           a folder of images with caption files
"""

from __future__ import annotations

from beta_clip_jax.data.arrayrecord_source import ArrayRecordSource
from beta_clip_jax.data.csv_source import CsvSource
from beta_clip_jax.data.folder_source import FolderSource
from beta_clip_jax.data.webdataset_source import WebDatasetSource


def _shard_spec(data_cfg):
    """data.shards (a list) when set, else data.path (a pattern, folder, file or prefix)."""
    shards = data_cfg.get("shards")
    return list(shards) if shards else data_cfg.path


def make_format_source(data_cfg):
    """The source of `data_cfg.name` (one of sources.FILE_FORMATS)."""
    name, cache = data_cfg.name, data_cfg.get("index_cache")
    if name == "csv":
        return CsvSource(
            data_cfg.path,
            data_cfg.image_root,
            image_key=data_cfg.get("image_key") or "filepath",
            caption_key=data_cfg.get("caption_key") or "title",
            separator=data_cfg.get("separator"),
            index_cache_dir=cache,
        )
    if name == "webdataset":
        return WebDatasetSource(_shard_spec(data_cfg), cache)
    if name == "array_record":
        return ArrayRecordSource(_shard_spec(data_cfg), data_cfg.image_root, cache)
    if name == "folder":
        return FolderSource(data_cfg.path)
    raise ValueError(f"data.name={name!r} is not a file format")
