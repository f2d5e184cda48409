"""An image folder with a caption file beside each image (`data.name=folder`).

    data.path/                  any depth; sorted by relative path
        street/000.jpg          the image (.jpg .jpeg .png .webp .bmp)
        street/000.txt          its caption (UTF-8; newlines become spaces), or
        street/000.json         {"caption", optional "sentences", "phrases", "sentence_phrases"}

A .json caption file wins over a .txt one. An image without a caption file is in the dataset
(it counts in its length) and is a counted bad record when read. The folder is listed once
per process (config_check and the pipeline share the listing); a bucket folder is listed by
prefix, one request per thousand files.
"""

from __future__ import annotations

import os
import posixpath

import numpy as np

from beta_clip_jax.data import fileio, index_cache, sources

NO_CAPTION, TXT, JSON = 0, 1, 2
_CAPTION_EXTS = {TXT: ".txt", JSON: ".json"}


def build_index(root: str) -> dict:
    """Relative image paths in sorted order and each one's caption file kind."""
    files = fileio.walk_files(root)
    present = set(files)
    images = [f for f in files if posixpath.splitext(f)[1].lower() in sources.IMAGE_EXTENSIONS]
    kinds = []
    for image in images:
        stem = posixpath.splitext(image)[0]
        kinds.append(next((k for k in (JSON, TXT) if stem + _CAPTION_EXTS[k] in present), 0))
    return {
        "images": np.asarray(images, dtype=str) if images else np.zeros(0, "U1"),
        "captions": np.asarray(kinds, np.int8),
    }


class FolderSource:
    """Images of a folder tree with their caption files as records (module doc)."""

    how = "set data.path to a folder of images, each with a .txt or .json caption beside it"

    def __init__(self, root: str):
        sources.require_path(root, "image folder", self.how)
        if not fileio.isdir(root):
            raise NotADirectoryError(f"data.path={root!r} is not a folder; {self.how}")
        self.root = os.fspath(root).rstrip("/") or "/"
        # Listed once per process: a folder's own identity does not tell whether a file under
        # it changed, so the listing is not cached on disk.
        mtime = 0 if fileio.is_remote(root) else os.stat(root).st_mtime_ns
        index = index_cache.cached_index(
            "folder", [], {"root": self.root, "mtime": mtime}, lambda: build_index(self.root), ""
        )
        self._images, self._captions = index["images"], index["captions"]
        if not len(self._images):
            raise ValueError(f"no images ({', '.join(sources.IMAGE_EXTENSIONS)}) under {root}")

    def __len__(self) -> int:
        return len(self._images)

    def record_id(self, index: int) -> str:
        return f"{posixpath.basename(self.root)}/{self._images[index]}"

    def _caption_entry(self, index: int) -> dict:
        image, kind = str(self._images[index]), int(self._captions[index])
        stem = posixpath.splitext(image)[0]
        if kind == NO_CAPTION:
            raise ValueError(f"no caption file {stem}.txt or {stem}.json beside the image")
        raw = fileio.read_bytes(f"{self.root}/{stem}{_CAPTION_EXTS[kind]}")
        if kind == JSON:
            return sources.json_object(raw)
        return {"caption": " ".join(raw.decode("utf-8-sig").splitlines()).strip()}

    def __getitem__(self, index: int) -> dict:
        entry = self._caption_entry(index)
        if "caption" not in entry:
            raise ValueError("the caption file has no 'caption' field")
        return {
            "id": self.record_id(index),
            "image_path": f"{self.root}/{self._images[index]}",
            "caption": entry["caption"],
            **sources.hierarchy_fields(entry),
        }
