"""Random-access record sources for grain: ShareGPT4V JSON, our JSONL, Urban1K folders, TFDS,
synthetic scenes; CSV/TSV, WebDataset tars, ArrayRecord shards and caption folders
(data/formats.py).

Every source is a module-level class with `__len__`/`__getitem__` that pickles small (file
offsets, not contents), so spawned grain workers can rebuild it. A record is a dict with "id",
"image_path" (str) or "image" (encoded bytes or uint8 HWC), "caption" and, optionally,
"sentences"/"phrases"/"sentence_phrases". A malformed entry raises from `__getitem__` (invalid
UTF-8 as UnicodeDecodeError, an image path leaving the image root as UnsafePathError, anything
else as ValueError naming the field) and the pipeline counts it as a skip. Sources check the
shape of a record, not its contents: captions are checked by the pipeline, images when decoded
(`open_image`, which also refuses images over a pixel limit before decoding them). Missing
dataset files raise at construction, before anything compiles, saying what was expected where.
Paths may be on any filesystem etils.epath knows (gs://...): such files are read through
data/fileio.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat

import numpy as np
from PIL import Image

from beta_clip_jax.data import fileio
from beta_clip_jax.data.synthetic import SyntheticScenes

SHAREGPT4V_HELD_OUT = 1000  # json[:1000] is the SV-1k evaluation set (docs/data.md)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_UTF8_BOM = "\xef\xbb\xbf"  # as latin-1 characters


# Images whose header declares more pixels are refused before decoding (data.max_image_pixels):
# 64 MP (8000 x 8000, ~190 MB as RGB) passes full-frame camera and 50 MP phone photos.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded."""


class ImageTooLargeError(CorruptImageError):
    """An image declares more pixels than the limit (or is a PIL decompression bomb)."""


class UnsafePathError(ValueError):
    """A record's image path that would leave the image root."""


def pixel_limit(max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> int | None:
    """The pixel limit in force: `max_pixels`, but never above PIL's own Image.MAX_IMAGE_PIXELS.

    Above PIL's limit Image.open warns (DecompressionBombWarning) and above twice it refuses;
    capping here makes every image PIL would warn about a refused one, whatever the warning
    filters are. None: PIL's limit only. Raises ValueError for a limit that is not positive.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) < 1):
        raise ValueError(f"data.max_image_pixels must be a positive number, got {max_pixels!r}")
    limits = [int(n) for n in (max_pixels, Image.MAX_IMAGE_PIXELS) if n]
    return min(limits) if limits else None


def _check_pixels(width: int, height: int, limit: int | None, name) -> None:
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"image {name} is {width} x {height} = {width * height} pixels, over the limit of "
            f"{limit} (data.max_image_pixels, at most PIL's Image.MAX_IMAGE_PIXELS); not decoded"
        )


def _check_regular_file(path) -> None:
    """A path must name a regular file: a directory, FIFO or device is no image (and a FIFO
    would block the reader). FileNotFoundError for a missing one, as open() raises."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CorruptImageError(f"cannot decode image {path}: not a regular file")


def _image_input(src):
    """What PIL opens for `src`: a local path as is (checked to be a regular file), a bucket
    path's bytes (FileNotFoundError when missing), bytes-like data or a binary file object
    wrapped or passed on."""
    if isinstance(src, str | os.PathLike):
        if fileio.is_remote(src):
            return io.BytesIO(fileio.read_bytes(src))
        _check_regular_file(src)
        return src
    if isinstance(src, bytes | bytearray | memoryview):
        return io.BytesIO(src)
    if hasattr(src, "read"):
        return src
    raise CorruptImageError(f"cannot decode image: a {type(src).__name__}, not an image")


def open_image(
    src, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode a path (local or on a bucket), encoded bytes (or a binary file object such as
    io.BytesIO) or a uint8 array to a fully loaded RGB PIL image.

    `draft_size`: let the JPEG decoder downscale by 1/2..1/8 while both sides stay >= it (much
    faster on large photos, no visible loss when the result is resized below it anyway).
    `max_pixels` (`pixel_limit`): an image whose header declares more pixels raises
    ImageTooLargeError before any pixel is decoded, as does a PIL decompression bomb.
    Raises FileNotFoundError for a missing file and CorruptImageError for undecodable data.
    """
    limit = pixel_limit(max_pixels)
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3):
            raise CorruptImageError(
                f"expected a uint8 HW or HWC array, got {src.dtype} {src.shape}"
            )
        _check_pixels(src.shape[1], src.shape[0], limit, "<array>")
        return Image.fromarray(
            src[..., 0] if src.ndim == 3 and src.shape[-1] == 1 else src
        ).convert("RGB")
    name = src if isinstance(src, str | os.PathLike) else "<bytes>"
    try:
        with Image.open(_image_input(src)) as img:
            _check_pixels(img.width, img.height, limit, name)  # header only so far
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return img.convert("RGB")
    except (FileNotFoundError, CorruptImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # The warning arrives here only when warning filters turn it into an error; otherwise
        # the pixel check above refuses the image, since the limit never exceeds PIL's.
        raise ImageTooLargeError(f"image {name} is too large: {e}") from e
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError...
        raise CorruptImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def image_problem(
    path: str, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[str, str] | None:
    """(reason, detail) when `path` cannot be trained on ("missing_image" / "image_too_large" /
    "corrupt_image", the training pipeline's skip reasons), else None. Decodes with
    `open_image`, as training does, so a file that passes here is one the pipeline can read."""
    try:
        open_image(path, draft_size=draft_size, max_pixels=max_pixels)
    except FileNotFoundError:
        return "missing_image", f"no file {path}"
    except ImageTooLargeError as e:
        return "image_too_large", str(e)
    except CorruptImageError as e:
        return "corrupt_image", str(e)
    return None


def resolve_image_path(root: str, image, *, allow_absolute: bool = False) -> str:
    """`root` joined with a record's `image` path, refusing one that would leave `root`.

    UnsafePathError for a path whose ".." components climb out of `root` (checked on the text,
    so symbolic links under the root still work), an absolute path unless `allow_absolute`
    (when no image root was configured and the file's folder stands in for it), or a NUL byte;
    ValueError for a value that is not a non-empty string.
    """
    if not isinstance(image, str) or not image:
        raise ValueError(f"field 'image' must be a non-empty path string, got {image!r:.80}")
    if "\x00" in image:
        raise UnsafePathError(f"image path {image!r:.200} contains a NUL byte")
    if os.path.isabs(image):
        if not allow_absolute:
            raise UnsafePathError(
                f"absolute image path {image!r:.200} while data.image_root is set to {root}: "
                "image paths must be relative to it"
            )
        return image
    normal = os.path.normpath(image)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise UnsafePathError(f"image path {image!r:.200} leaves the image root {root}")
    return os.path.join(root, image)


def load_image(src) -> np.ndarray:
    """uint8 HWC RGB array of an image path, encoded bytes or array (errors as `open_image`)."""
    return np.asarray(open_image(src), dtype=np.uint8)


def require_path(path: str | None, what: str, how: str) -> str:
    if not path:
        raise ValueError(f"no path given for {what}; {how}")
    if not fileio.exists(path):
        raise FileNotFoundError(f"{what} not found at {path!r}; {how}")
    return path


class _OffsetFile:
    """Byte ranges of one file, read with pread (thread-safe, no shared seek position)."""

    def __init__(self, path: str, starts: np.ndarray, ends: np.ndarray):
        self.path, self.starts, self.ends = path, starts, ends
        self._fd = None

    def __getstate__(self):
        return {"path": self.path, "starts": self.starts, "ends": self.ends}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = None

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, index: int) -> bytes:
        start, end = int(self.starts[index]), int(self.ends[index])
        if fileio.is_remote(self.path):
            return fileio.read_range(self.path, start, end - start)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, end - start, start)

    def __del__(self, _close=os.close):  # bound early: `os` may be gone at interpreter exit
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)


def _json_array_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets of each top-level element of a JSON array file (parsed once, then dropped).

    The file is decoded as latin-1 so character offsets equal byte offsets; JSON structure is
    ASCII, so the element boundaries are exact whatever the UTF-8 inside strings.
    """
    text = fileio.read_bytes(path).decode("latin-1")
    # strict=False: a raw control character inside a string still ends where the string ends;
    # reading that element later (strict) makes it one counted bad record, not a failed run.
    decoder = json.JSONDecoder(strict=False)
    ws = re.compile(r"\s*")
    pos = ws.match(text, len(_UTF8_BOM) if text.startswith(_UTF8_BOM) else 0).end()
    if text[pos : pos + 1] != "[":
        raise ValueError(f"{path}: expected a JSON array (ShareGPT4V format)")
    pos += 1
    starts, ends = [], []
    while True:
        pos = ws.match(text, pos).end()
        if text[pos : pos + 1] == "]":
            break
        try:
            _, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:  # element boundaries are lost past here
            raise ValueError(
                f"{path}: not a valid JSON array from byte {pos} (entry {len(starts)}): "
                f"{type(e).__name__}: {e}; fix or drop that entry"
            ) from None
        starts.append(pos)
        ends.append(end)
        pos = ws.match(text, end).end()
        if text[pos : pos + 1] == ",":
            pos += 1
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64)


def json_object(raw: bytes) -> dict:
    """One entry's JSON object. Its bytes must be UTF-8 (UnicodeDecodeError otherwise: the
    "bad_utf8" skip); ValueError for invalid JSON (raw control characters in strings included)
    or a value that is not an object."""
    entry = json.loads(raw.decode("utf-8-sig"))
    if not isinstance(entry, dict):
        raise ValueError(f"a JSON {type(entry).__name__}, not an object")
    return entry


def _field(entry: dict, key: str):
    if key not in entry:
        raise ValueError(f"no {key!r} field")
    return entry[key]


def _text_list(entry: dict, key: str) -> list | None:
    """A precomputed list field ("sentences", "phrases", ...), or None when absent or null."""
    value = entry.get(key)
    if value is not None and not isinstance(value, list):
        raise ValueError(f"field {key!r} must be a list, got {type(value).__name__}")
    return value


HIERARCHY_FIELDS = ("sentences", "phrases", "sentence_phrases")


def hierarchy_fields(entry: dict) -> dict:
    """The precomputed caption hierarchy an entry carries ("sentences", "phrases",
    "sentence_phrases"; each a list when present). Absent ones are derived by the pipeline."""
    out = {}
    for key in HIERARCHY_FIELDS:
        value = _text_list(entry, key)
        if value is not None:
            out[key] = value
    return out


class ShareGPT4VSource:
    """ShareGPT4V caption JSON: a list of {"image": rel path, "conversations": [..]}.

    Caption = conversations[1].value with newlines as spaces (Long-CLIP / beta-CLIP). The first
    1000 entries are the SV-1k evaluation set; the training pipeline skips them
    (`data.skip_first`), this source does not.
    """

    how = (
        "the released recipe trains on share-captioner_coco_lcs_sam_1246k_1107_filtered.json, "
        "the β-CLIP authors' filtered file (their repository's DATA.md links it); the unfiltered "
        "share-captioner_coco_lcs_sam_1246k_1107.json is in the Hugging Face dataset "
        "Lin-Chen/ShareGPT4V. Set data.path to it and data.image_root to the image folder "
        "(containing coco/, llava/, sam/ ...)"
    )

    def __init__(self, path: str, image_root: str, index_cache_dir: str | None = None):
        require_path(path, "ShareGPT4V json", self.how)
        self.image_root = require_path(image_root, "ShareGPT4V image root", self.how)
        # The 1.2M-entry file is parsed once per run (the epoch count and the pipeline share
        # it) and, with a cache folder, not again on a restart (data/index_cache.py).
        from beta_clip_jax.data import index_cache

        def build():
            return dict(zip(("starts", "ends"), _json_array_offsets(path), strict=True))

        index = index_cache.cached_index("sharegpt4v", [path], {}, build, index_cache_dir)
        self._file = _OffsetFile(path, index["starts"], index["ends"])
        self._name = os.path.basename(path)

    def __len__(self) -> int:
        return len(self._file)

    def record_id(self, index: int) -> str:
        return f"{self._name}[{index}]"

    def __getitem__(self, index: int) -> dict:
        entry = json_object(self._file.read(index))
        turns = _field(entry, "conversations")
        if not (isinstance(turns, list) and len(turns) > 1 and isinstance(turns[1], dict)):
            raise ValueError("field 'conversations' must be a list of at least two turns")
        caption = _field(turns[1], "value")
        if isinstance(caption, str):
            caption = caption.replace("\n", " ")
        return {
            "id": self.record_id(index),
            "image_path": resolve_image_path(self.image_root, _field(entry, "image")),
            "caption": caption,
        }


def _jsonl_line_index(path: str) -> dict[str, np.ndarray]:
    """Byte range and 1-based line number of every non-empty line."""
    buf = np.frombuffer(fileio.read_bytes(path), np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    ends = np.append(newlines, len(buf)).astype(np.int64)
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    keep = ends > starts  # skip empty lines (including after the final newline)
    lines = (np.flatnonzero(keep) + 1).astype(np.int32)
    return {"starts": starts[keep], "ends": ends[keep], "lines": lines}


class JsonlSource:
    """Our JSONL (data/prepare.py): one {"image", "caption", "sentences"?, "phrases"?,
    "sentence_phrases"?} a line (docs/data.md)."""

    how = (
        "write it with `python -m beta_clip_jax.data.prepare --input=... --format=sharegpt4v|jsonl "
        "--image_root=... --out=FILE.jsonl` and set data.path to it"
    )

    def __init__(
        self, path: str, image_root: str | None = None, index_cache_dir: str | None = None
    ):
        require_path(path, "JSONL file", self.how)
        # Without a configured root the file's folder stands in, and absolute paths are the
        # file's own layout; with one, every path must stay under it.
        self.allow_absolute = not image_root
        self.image_root = jsonl_image_root(path, image_root)
        require_path(self.image_root, "image root of the JSONL file", "set data.image_root")
        from beta_clip_jax.data import index_cache

        index = index_cache.cached_index(
            "jsonl", [path], {}, lambda: _jsonl_line_index(path), index_cache_dir
        )
        self._file = _OffsetFile(path, index["starts"], index["ends"])
        # The file's own 1-based line numbers, so a reported record can be found in an editor
        # even when blank lines sit between records.
        self._lines = index["lines"]
        self._name = os.path.basename(path)

    def __len__(self) -> int:
        return len(self._file)

    def line_number(self, index: int) -> int:
        return int(self._lines[index])

    def record_id(self, index: int) -> str:
        return f"{self._name}:{self.line_number(index)}"

    def __getitem__(self, index: int) -> dict:
        entry = json_object(self._file.read(index))
        image = _field(entry, "image")
        record = {
            "id": self.record_id(index),
            "image_path": resolve_image_path(
                self.image_root, image, allow_absolute=self.allow_absolute
            ),
            "caption": _field(entry, "caption"),
        }
        record.update(hierarchy_fields(entry))
        return record


def jsonl_image_root(path: str, image_root: str | None) -> str:
    """The folder a data file's relative image paths are joined to: image_root, else the
    file's own folder."""
    return image_root or fileio.parent(path)


class Urban1KSource:
    """Urban1K folders: `root/image/<k>.jpg` with `root/caption/<k>.txt` (first line = caption)."""

    how = (
        "download the Hugging Face dataset BeichenZhang/Urban1k and set the path to the folder "
        "holding image/ and caption/"
    )

    def __init__(self, root: str):
        require_path(root, "Urban1K folder", self.how)
        cap_dir = require_path(os.path.join(root, "caption"), "Urban1K caption/ folder", self.how)
        img_dir = require_path(os.path.join(root, "image"), "Urban1K image/ folder", self.how)
        images = {}
        for name in os.listdir(img_dir):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                images[stem] = os.path.join(img_dir, name)
        stems = [os.path.splitext(n)[0] for n in os.listdir(cap_dir) if n.endswith(".txt")]
        # Numeric order for 1..1000 (only the pairing matters, but a fixed order is reproducible).
        stems.sort(key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        self.cap_dir = cap_dir
        self.stems = stems
        # A caption without its image points at the expected path: counted as a missing image.
        self.image_paths = [images.get(s, os.path.join(img_dir, s + ".jpg")) for s in stems]

    def __len__(self) -> int:
        return len(self.stems)

    def record_id(self, index: int) -> str:
        return f"urban1k/{self.stems[index]}"

    def __getitem__(self, index: int) -> dict:
        stem = self.stems[index]
        with open(os.path.join(self.cap_dir, stem + ".txt"), "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
        return {
            "id": self.record_id(index),
            "image_path": self.image_paths[index],
            "caption": lines[0].strip() if lines else "",
        }


def _feature(record: dict, key: str):
    """A TFDS feature by flat key ("image/id") or "/"-separated nested path."""
    if key in record:
        return record[key]
    value = record
    for part in key.split("/"):
        value = value[part]
    return value


def _as_text(value):
    """TFDS text feature -> str: bytes are UTF-8 decoded; a sequence gives its first entry."""
    if isinstance(value, np.ndarray) and value.ndim > 0 or isinstance(value, list | tuple):
        value = value[0] if len(value) else ""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


class TfdsSource:
    """A TFDS dataset through `tfds.data_source` (ArrayRecord, random access, no TensorFlow)."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        id_key: str | None = None,
    ):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.caption_key, self.id_key = image_key, caption_key, id_key
        self._source = self._open()
        self._len = len(self._source)

    def _open(self):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("TFDS sources need `pip install tensorflow-datasets`") from e
        if not self.name:
            raise ValueError("data.tfds.name is empty; set it to a TFDS dataset name")
        try:
            return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        except Exception as e:
            raise FileNotFoundError(
                f"TFDS dataset {self.name!r} split {self.split!r} not readable from data_dir "
                f"{self.data_dir!r} ({type(e).__name__}: {e}); build it in ArrayRecord format "
                "(`tfds build NAME --file_format=array_record --data_dir=DIR`) and set "
                "data.tfds.data_dir"
            ) from e

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._source = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        if self._source is None:
            self._source = self._open()
        record = self._source[index]
        rid = _as_text(_feature(record, self.id_key)) if self.id_key else index
        return {
            "id": f"tfds:{self.name}/{self.split}[{index}]:{rid}",
            "image": _feature(record, self.image_key),
            "caption": _as_text(_feature(record, self.caption_key)),
        }


class SyntheticSource:
    """Synthetic scenes (data/synthetic.py) as records; images are drawn at the output size.

    `random_crop = False`: a crop could cut away an object the caption names.
    """

    random_crop = False

    def __init__(self, scenes: SyntheticScenes):
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        rec = self.scenes[index]
        return {
            "id": f"synthetic/{self.scenes.split}[{index}]",
            "image": rec["image"],
            "caption": rec["caption"],
            "sentences": rec["sentences"],
            "phrases": rec["phrases"],
        }


# The file formats of data/formats.py: each reads data.path (webdataset / array_record: or
# data.shards).
FILE_FORMATS = ("csv", "webdataset", "array_record", "folder")
SOURCE_NAMES = ("synthetic", "sharegpt4v", "jsonl", "urban1k", "tfds", *FILE_FORMATS)


def make_source(data_cfg, image_size: int):
    """The record source `data_cfg.name` names; raises before any compile if it cannot exist.

    The file formats' start-up index is built once per process (and cached on disk,
    data/index_cache.py), so config_check's step count and the pipeline share it.
    """
    name = data_cfg.name
    if name in FILE_FORMATS:
        from beta_clip_jax.data import formats  # imports this module

        return formats.make_format_source(data_cfg)
    if name == "synthetic":
        syn = data_cfg.synthetic
        scenes = SyntheticScenes(
            syn.num_train if data_cfg.split == "train" else syn.num_eval,
            image_size=image_size,
            seed=syn.seed,
            min_objects=syn.min_objects,
            max_objects=syn.max_objects,
            split=data_cfg.split,
        )
        return SyntheticSource(scenes)
    if name == "sharegpt4v":
        return ShareGPT4VSource(data_cfg.path, data_cfg.image_root, data_cfg.get("index_cache"))
    if name == "jsonl":
        return JsonlSource(data_cfg.path, data_cfg.image_root, data_cfg.get("index_cache"))
    if name == "urban1k":
        return Urban1KSource(data_cfg.path)
    if name == "tfds":
        t = data_cfg.tfds
        return TfdsSource(t.name, data_cfg.split, t.data_dir, t.image_key, t.caption_key, t.id_key)
    raise ValueError(f"unknown dataset name data.name={name!r}; expected one of {SOURCE_NAMES}")


def default_skip_first(name: str) -> int:
    """Records skipped at the start when data.skip_first is None: SV-1k for ShareGPT4V."""
    return SHAREGPT4V_HELD_OUT if name == "sharegpt4v" else 0


def held_out_range(num_records: int, fraction: float, skip_first: int = 0) -> tuple[int, int]:
    """[start, stop) of the records `data.eval_fraction` keeps out of training: the last
    `fraction` of those after `skip_first`, rounded half up, at least one when fraction > 0.

    The one rule for the split: training stops at `start` (pipeline.train_range, config_check's
    step count) and the `jsonl` evaluator reads exactly [start, stop), so no record is in both.
    """
    fraction = float(fraction or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    first = min(int(skip_first), num_records)
    usable = num_records - first
    held = int(math.floor(fraction * usable + 0.5))
    if fraction > 0:
        held = max(held, 1)  # a requested hold-out is never silently empty
    return num_records - min(held, usable), num_records
