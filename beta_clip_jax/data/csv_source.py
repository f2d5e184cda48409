"""CSV / TSV captions (`data.name=csv`), open_clip's convention: a header row, one image a row.

    filepath,title[,sentences,phrases,sentence_phrases]
    images/000.jpg,"A red car parked on a street. It stands next to a tree."

`data.image_key` (default "filepath") and `data.caption_key` (default "title") name the
columns; `data.separator` defaults to "\\t" for .tsv / .tab files and "," otherwise. Optional
`sentences`, `phrases` and `sentence_phrases` columns hold JSON lists (what data/prepare.py
computes); an empty cell is an absent one. Image paths are relative to `data.image_root`, else
to the file's folder (sources.resolve_image_path: a path leaving it is an unsafe_path skip).

Random access: the whole file is parsed once with the csv module (quoted newlines included)
and only each row's byte range and line number are kept, 20 bytes a row (20 MB for 1M rows),
cached by data/index_cache.py. Each read parses its row again; a row that does not parse, has
the wrong number of fields or is not UTF-8 is a counted bad record.
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from beta_clip_jax.data import fileio, index_cache, sources

FIELD_LIMIT = 1 << 26  # characters in one cell (the csv module's default, 128k, cuts captions)
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def default_separator(path: str) -> str:
    return "\t" if os.fspath(path).lower().endswith((".tsv", ".tab")) else ","


class _CountedLines:
    """A binary file's lines as text (undecodable bytes kept as surrogates, so one bad row
    cannot stop the scan), counting the bytes and lines handed out so far."""

    def __init__(self, f):
        self.f, self.offset, self.lines = f, 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.f.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        self.lines += 1
        return line.decode("utf-8", "surrogateescape")


def build_index(path: str, separator: str) -> dict:
    """Header and the [start, end) bytes and 1-based first line of every non-blank row."""
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
    header, starts, ends, lines = None, [], [], []
    with fileio.open_binary(path) as f:
        counted = _CountedLines(f)
        reader = csv.reader(counted, delimiter=separator)
        while True:
            start, line = counted.offset, counted.lines + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:  # the csv module refuses the row: reading it again counts it
                row = None
            if row == []:
                continue  # a blank line is no record
            if header is None:
                if row is None:
                    raise ValueError(f"{path}: the header row (line {line}) does not parse")
                header = [row[0].removeprefix("\ufeff"), *row[1:]]
                continue
            starts.append(start)
            ends.append(counted.offset)
            lines.append(line)
    if header is None:
        raise ValueError(f"{path}: empty file, no header row")
    return {
        "header": np.array(json.dumps(header)),
        "starts": np.asarray(starts, np.int64),
        "ends": np.asarray(ends, np.int64),
        "lines": np.asarray(lines, np.int64),
    }


def parse_row(text: str, separator: str, header: list[str]) -> dict[str, str]:
    """One row's text -> {column: cell}; ValueError when it is not exactly one row of the
    header's width."""
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=separator))
    if len(rows) != 1:
        raise ValueError(f"expected one CSV row, parsed {len(rows)}")
    if len(rows[0]) != len(header):
        raise ValueError(f"{len(rows[0])} fields where the header has {len(header)}")
    return dict(zip(header, rows[0], strict=True))


def _json_cell(row: dict, column: str):
    """A JSON list column's value; None for a missing column or an empty cell."""
    cell = row.get(column)
    if not cell:
        return None
    try:
        return json.loads(cell)
    except json.JSONDecodeError as e:
        raise ValueError(f"column {column!r} is not JSON ({e})") from None


class CsvSource:
    """Rows of a CSV / TSV file as records (module doc)."""

    how = (
        "set data.path to a CSV / TSV file with a header row; data.image_key and "
        "data.caption_key name its image path and caption columns"
    )

    def __init__(
        self,
        path: str,
        image_root: str | None = None,
        *,
        image_key: str = "filepath",
        caption_key: str = "title",
        separator: str | None = None,
        index_cache_dir: str | None = None,
    ):
        sources.require_path(path, "CSV file", self.how)
        if os.fspath(path).lower().endswith(_COMPRESSED):
            raise ValueError(f"{path}: a compressed CSV cannot be read at random; decompress it")
        self.path, self.separator = path, separator or default_separator(path)
        self.image_key, self.caption_key = image_key, caption_key
        self.allow_absolute = not image_root  # as JsonlSource: the file's own layout
        self.image_root = sources.jsonl_image_root(path, image_root)
        index = index_cache.cached_index(
            "csv", [path], {"separator": self.separator},
            lambda: build_index(path, self.separator), index_cache_dir,
        )  # fmt: skip
        self.header = json.loads(str(index["header"]))
        for key, field in ((image_key, "data.image_key"), (caption_key, "data.caption_key")):
            if key not in self.header:
                raise ValueError(
                    f"{path}: no column {key!r} ({field}); the header has {self.header} "
                    f"(separator {self.separator!r}, data.separator)"
                )
        self._starts, self._ends, self._lines = index["starts"], index["ends"], index["lines"]
        self._name = os.path.basename(os.fspath(path))

    def __len__(self) -> int:
        return len(self._starts)

    def line_number(self, index: int) -> int:
        """The 1-based line of the file the row starts on."""
        return int(self._lines[index])

    def record_id(self, index: int) -> str:
        return f"{self._name}:{self.line_number(index)}"

    def row(self, index: int) -> dict[str, str]:
        """The row's cells by column (UnicodeDecodeError for bytes that are not UTF-8)."""
        start, end = int(self._starts[index]), int(self._ends[index])
        text = fileio.read_range(self.path, start, end - start).decode("utf-8")
        return parse_row(text, self.separator, self.header)

    def __getitem__(self, index: int) -> dict:
        row = self.row(index)
        entry = {key: _json_cell(row, key) for key in sources.HIERARCHY_FIELDS}
        return {
            "id": self.record_id(index),
            "image_path": sources.resolve_image_path(
                self.image_root, row[self.image_key], allow_absolute=self.allow_absolute
            ),
            "caption": row[self.caption_key],
            **sources.hierarchy_fields(entry),
        }
