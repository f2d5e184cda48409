"""File access for the data sources on any filesystem etils.epath knows (local, gs://, s3://...).

A local path keeps the fast calls (os.pread, os.stat); any other path goes through
`epath.Path`, so a bucket, or a fake filesystem in the tests, is read the same way. Also here:
shard lists from brace patterns (`shards/{000000..000127}.tar`), globs, folders or name
prefixes, and a thread pool for the many small metadata calls a bucket needs.
"""

from __future__ import annotations

import abc
import concurrent.futures
import os
import posixpath
import re

from etils import epath

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = ("*", "?", "[")
IO_THREADS = 16  # concurrent metadata / index calls against a bucket


def is_remote(path) -> bool:
    """A path with a scheme (gs://, s3://...): read through epath, not the os module."""
    return "://" in os.fspath(path)


def exists(path) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def identity(path) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file: what index caches are keyed by.
    Filesystems that report no modification time give 0 (the size still tells most changes)."""
    if not is_remote(path):
        st = os.stat(path)
        return int(st.st_size), int(st.st_mtime_ns)
    st = epath.Path(path).stat()
    return int(st.length or 0), int(st.mtime or 0) * 10**9


def open_binary(path):
    return epath.Path(path).open("rb") if is_remote(path) else open(path, "rb")


def read_bytes(path) -> bytes:
    with open_binary(path) as f:
        return f.read()


def read_range(path, start: int, size: int) -> bytes:
    """`size` bytes of a file from byte `start` (a ranged read on a bucket; pread locally, so
    concurrent threads share no seek position). ValueError when the file is shorter than that:
    it changed since it was indexed."""
    if is_remote(path):
        with epath.Path(path).open("rb") as f:
            f.seek(start)
            data = f.read(size)
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, start)
        finally:
            os.close(fd)
    if len(data) != size:
        raise ValueError(
            f"{path}: {len(data)} bytes at offset {start}, expected {size}: the file changed "
            "since it was indexed"
        )
    return data


def parent(path) -> str:
    """The folder holding `path` (absolute for a local path)."""
    if is_remote(path):
        return posixpath.dirname(os.fspath(path).rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def strip_scheme(path) -> str:
    """`path` without its "scheme://" (epath's walk on a bucket yields folders without it)."""
    return os.fspath(path).split("://", 1)[-1].rstrip("/")


def thread_map(fn, items) -> list:
    """`[fn(x) for x in items]` over paths, concurrently when they are remote (one bucket
    request each)."""
    items = list(items)
    if len(items) < 2 or not is_remote(items[0]):
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def walk_files(root) -> list[str]:
    """Every file under folder `root` (recursive), as sorted "/"-joined paths relative to it."""
    if not is_remote(root):
        found, visited = [], set()
        for folder, dirs, files in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in visited:  # a symbolic link back up the tree: listed once
                dirs[:] = []
                continue
            visited.add(real)
            rel = os.path.relpath(folder, root)
            found += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in files]
        return sorted(found)
    top = strip_scheme(root)
    found = []
    for folder, _, files in epath.Path(root).walk():
        rel = posixpath.relpath(strip_scheme(folder), top)
        found += [n if rel == "." else f"{rel}/{n}" for n in files]
    return sorted(found)


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion: `{000..127}` (zero-padded as written), `{a,b}`; nested left to right."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        lo, hi = numbers.groups()
        width = len(lo) if lo.lstrip("-").startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [f"{n:0{width}d}" for n in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def _glob(pattern: str) -> list[str]:
    """Files matching a glob pattern (wildcards in the file name or in folders under a fixed
    folder), sorted."""
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
    base = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else ".")
    if is_remote(pattern) and fixed < 3:
        raise ValueError(f"{pattern}: a wildcard in the bucket name cannot be listed")
    return sorted(str(p) for p in epath.Path(base).glob("/".join(parts[fixed:])))


def _files_of(pattern: str, suffix: str) -> list[str]:
    """The files one pattern (no braces left) names; [] when none."""
    if any(c in pattern for c in _GLOB_CHARS):
        return _glob(pattern)
    if isdir(pattern):
        return sorted(str(p) for p in epath.Path(pattern).glob(f"*{suffix}"))
    if exists(pattern):
        return [pattern]
    if suffix and pattern.endswith(suffix):
        return []  # a file name, not a prefix
    return _glob(f"{pattern}-*-of-*{suffix}")


def expand_shards(spec, suffix: str, what: str) -> list[str]:
    """The shard files `spec` names, in order: a list of paths or patterns, a brace pattern, a
    glob, a folder (its files ending in `suffix`, sorted), one file, or a name prefix
    (`PREFIX-*-of-*` + suffix, as `data.prepare` writes; suffix "" takes any). FileNotFoundError
    naming what is missing; ValueError for an empty spec."""
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec or ())
    if not specs or not all(specs):
        raise ValueError(f"no {what} shards given: set data.path (or data.shards)")
    patterns = [p for s in specs for p in expand_braces(os.fspath(s))]
    found = thread_map(lambda p: _files_of(p, suffix), patterns)  # a bucket: in parallel
    shards = [f for files in found for f in files]
    missing = [p for p, files in zip(patterns, found, strict=True) if not files]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise FileNotFoundError(f"{what} shards not found: {shown}")
    return shards


def shard_paths(prefix: str, count: int, suffix: str) -> list[str]:
    """`PREFIX-00000-of-0000N` + suffix for each of `count` shards (what data.prepare writes)."""
    return [f"{prefix}-{i:05d}-of-{count:05d}{suffix}" for i in range(count)]


def shard_pattern(prefix: str, count: int, suffix: str) -> str:
    """The brace pattern of `shard_paths` (the one path when count is 1), a data.path."""
    if count == 1:
        return shard_paths(prefix, 1, suffix)[0]
    return f"{prefix}-{{00000..{count - 1:05d}}}-of-{count:05d}{suffix}"


class ShardedWriter(abc.ABC):
    """Writes `total` records into `count` shards of consecutive records (record i goes to
    shard i * count // total), so the shards in order keep the input order; every shard file
    exists at the end, empty ones included. Subclasses open, write to and close one shard."""

    suffix = ""

    def __init__(self, prefix: str, count: int, total: int):
        if int(count) < 1:
            raise ValueError(f"the number of shards must be at least 1, got {count}")
        self.paths = shard_paths(prefix, int(count), self.suffix)
        self.pattern = shard_pattern(prefix, int(count), self.suffix)
        self.total, self.written = max(int(total), 1), 0
        self._shard, self._handle = -1, None

    @abc.abstractmethod
    def _open(self, path: str):
        """A new shard file's handle."""

    @abc.abstractmethod
    def _write(self, handle, record: dict, index: int) -> None:
        """Record number `index` (from 0 over all shards) into the open shard."""

    @abc.abstractmethod
    def _close(self, handle) -> None:
        """Finish a shard."""

    def _next_shard(self) -> None:
        if self._handle is not None:
            self._close(self._handle)
        self._shard += 1
        path = self.paths[self._shard]
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._handle = self._open(path)

    def write(self, record: dict) -> None:
        shard = min(self.written * len(self.paths) // self.total, len(self.paths) - 1)
        while self._shard < shard:
            self._next_shard()
        self._write(self._handle, record, self.written)
        self.written += 1

    def close(self) -> list[str]:
        """Finishes every shard; returns their paths."""
        while self._shard < len(self.paths) - 1:
            self._next_shard()
        if self._handle is not None:
            self._close(self._handle)
            self._handle = None
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
