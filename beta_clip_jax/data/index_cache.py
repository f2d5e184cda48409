"""Start-up indexes of the data sources: computed once per dataset, then shared and cached.

A source's index (the byte range of every CSV row, the member offsets of every tar shard, the
record count of every ArrayRecord shard) is a dict of NumPy arrays, keyed by the source kind,
its parameters and the identity (path, size, modification time) of every data file. It is kept
in this process, so config_check's step count and the training pipeline build it once, and,
unless `data.index_cache` is "", in an .npz file under `data.index_cache` (default
$XDG_CACHE_HOME/beta_clip_jax, else ~/.cache/beta_clip_jax), so later runs start without
reading the data again. The folder may be on a bucket that every host of a pod shares. A
changed data file changes the key, so a stale index is never used; an unreadable cache file
is rebuilt.

On a pod whose cache folder is a bucket (a path with a scheme, `gs://...`, which every host
sees), process 0 builds each index and writes it, and the other processes wait for that file
(polling, no collective, so a process that asks for an index alone cannot hang the others) and
read it; if it does not appear within BETA_CLIP_INDEX_WAIT seconds (default 600) they build it
themselves. With a local cache folder every process builds its own.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid

import numpy as np
from etils import epath

from beta_clip_jax.data import fileio

VERSION = 1  # bump when an index layout changes: old cache files are then never matched
_MEMO: collections.OrderedDict[str, dict] = collections.OrderedDict()
_MEMO_SIZE = 8
_LOCK = threading.Lock()
_log = logging.getLogger(__name__)


def cache_root(index_cache: str | None) -> str | None:
    """The cache folder `data.index_cache` names: None when it is "" (no files written)."""
    if index_cache == "":
        return None
    if index_cache:
        return index_cache
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "beta_clip_jax")


def cached_index(kind: str, files, params: dict, build, index_cache: str | None) -> dict:
    """`build()`'s dict of arrays for these data files, from this process's memory, the cache
    folder, or `build()` itself (then stored in both)."""
    files = [os.fspath(f) for f in files]
    ids = fileio.thread_map(fileio.identity, files)
    text = json.dumps([kind, VERSION, params, [[f, *i] for f, i in zip(files, ids, strict=True)]])
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    with _LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    root = cache_root(index_cache)
    path = None if root is None else os.path.join(root, "index", f"{kind}-{key}.npz")
    index = _load(path) if path else None
    if index is None and path and _reads_process_0s(root):
        index = _wait_for(path, float(os.environ.get("BETA_CLIP_INDEX_WAIT", "600")))
    if index is None:
        index = build()
        if path:
            _save(path, index)
    with _LOCK:
        _MEMO[key] = index
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return index


def _reads_process_0s(root: str) -> bool:
    """True on processes other than 0 of a multi-process run whose cache folder is shared."""
    if "://" not in root:
        return False
    import jax  # the data workers never get here: sources reach them with their index built

    return jax.process_count() > 1 and jax.process_index() != 0


def _wait_for(path: str, timeout: float, poll: float = 1.0) -> dict | None:
    """The index process 0 writes at `path`, or None after `timeout` seconds."""
    _log.info("waiting up to %.0f s for process 0's index %s", timeout, path)
    deadline = time.monotonic() + timeout
    while True:
        index = _load(path)
        if index is not None or time.monotonic() >= deadline:
            return index
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))


def _load(path: str) -> dict | None:
    try:
        raw = fileio.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except Exception as e:  # a cut or foreign file: rebuild rather than fail the run
        _log.warning(
            "index cache %s is unreadable (%s: %s); rebuilding it", path, type(e).__name__, e
        )
        return None


def _save(path: str, index: dict) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file; a
    folder that cannot be written costs a warning and a rebuild next run, not the run."""
    buf = io.BytesIO()
    np.savez(buf, **index)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(tmp).write_bytes(buf.getvalue())
        epath.Path(tmp).replace(path)
    except OSError as e:
        _log.warning(
            "cannot write the index cache %s (%s); set data.index_cache to a writable folder, "
            "or '' to keep indexes in memory only", path, e,
        )  # fmt: skip


def clear_memory() -> None:
    """Forget this process's indexes (tests that rewrite a file in place)."""
    with _LOCK:
        _MEMO.clear()
