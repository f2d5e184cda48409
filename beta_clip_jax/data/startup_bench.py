"""Start-up time of a training run on a ShareGPT4V-sized caption JSON.

    python -m beta_clip_jax.data.startup_bench [--records=1200000] [--json=/tmp/x.json] [--keep]

Writes a ShareGPT4V-shaped JSON array of `--records` entries (an "id", an "image" such as
coco/train2017/000000000009.jpg and two "conversations" turns, the second a 5-sentence caption
of about 120 words: the layout sources.ShareGPT4VSource reads), about 1 GB at 1.2 M entries,
plus the few JPEGs it names, unless `--json` already exists. Then it times what a training run
does before its first batch: config_check.train_set_size (the step count of data.num_epochs)
and pipeline.build_train_iterator, then the first next(). Prints one JSON object with the
seconds of each and how many times the JSON file was parsed (calls of the offset indexer).
The generated files are deleted afterwards unless --keep.

Only names that every version of the package has are used, so the same script times an older
checkout: PYTHONPATH=/path/to/checkout python /this/file.py --json=... --keep.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from absl import app, flags
from ml_collections import config_dict
from PIL import Image

FLAGS = flags.FLAGS
WORDS = (
    "a small red car is parked beside an old stone wall under a cloudy grey sky while two people "
    "walk past a bakery window full of bread and a dog sleeps near the door of the shop"
).split()
NUM_IMAGES = 16  # distinct image files the entries cycle through (the first batch reads them)


def _define_flags() -> None:
    flags.DEFINE_integer("records", 1_200_000, "Entries of the generated JSON.")
    flags.DEFINE_string("json", "/tmp/sharegpt4v_startup.json", "The JSON (generated if absent).")
    flags.DEFINE_bool("keep", False, "Keep the generated JSON and images afterwards.")
    flags.DEFINE_integer("batch_size", 32, "Batch size of the first batch.")
    flags.DEFINE_integer("image_size", 224, "Crop size.")


def _caption(i: int) -> str:
    """5 sentences of 24 words, varied by i (about 120 words, as ShareGPT4V's)."""
    n = len(WORDS)
    return " ".join(
        " ".join(WORDS[(i + 7 * s + k) % n] for k in range(24)).capitalize() + "." for s in range(5)
    )


def _image_name(i: int) -> str:
    return f"coco/train2017/{i % NUM_IMAGES:012d}.jpg"


def write_sharegpt4v_json(path: str, records: int) -> None:
    """A JSON array of `records` ShareGPT4V entries, one a line, written in chunks."""
    chunk = 10_000
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for first in range(0, records, chunk):
            entries = (
                json.dumps(
                    {
                        "id": f"{i:012d}",
                        "image": _image_name(i),
                        "conversations": [
                            {"from": "human", "value": "<image>\nDescribe this image in detail."},
                            {"from": "gpt", "value": _caption(i)},
                        ],
                    }
                )  # fmt: skip
                for i in range(first, min(first + chunk, records))
            )
            f.write((",\n" if first else "") + ",\n".join(entries))
        f.write("\n]\n")


def write_images(image_root: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        path = os.path.join(image_root, _image_name(i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((640, 480), Image.BILINEAR).save(path, quality=90)


def _config(path: str, image_root: str, image_size: int):
    """A run's config as train_set_size reads it: data (this version's defaults) and model."""
    from beta_clip_jax.data import pipeline

    data = pipeline.default_data_config()
    data.name, data.path, data.image_root = "sharegpt4v", path, image_root
    if "index_cache" in data:  # versions with the on-disk index cache: time a cold start
        data.index_cache = ""
    return config_dict.ConfigDict({"data": data, "model": {"image_size": image_size}})


def _count_parses(sources) -> list:
    """Counts calls of the JSON offset indexer (one full parse of the file each)."""
    calls, parse = [], sources._json_array_offsets

    def counted(path):
        calls.append(path)
        return parse(path)

    sources._json_array_offsets = counted
    return calls


def time_startup(path: str, image_root: str, batch_size: int, image_size: int) -> dict:
    from beta_clip_jax import config_check
    from beta_clip_jax.data import pipeline, sources
    from beta_clip_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer()  # loaded before the clock: not part of the data start-up
    parses = _count_parses(sources)
    config = _config(path, image_root, image_size)
    t0 = time.perf_counter()
    size = config_check.train_set_size(config)
    t1 = time.perf_counter()
    it = pipeline.build_train_iterator(
        config.data, batch_size_per_process=batch_size, seed=0,
        image_size=image_size, tokenizer=tokenizer,
    )  # fmt: skip
    t2 = time.perf_counter()
    batch = next(it)
    t3 = time.perf_counter()
    if hasattr(it, "close"):
        it.close()
    return {
        "package": os.path.dirname(os.path.dirname(sources.__file__)),
        "train_set_size": size,
        "json_parses": len(parses),
        "seconds": {
            "train_set_size": round(t1 - t0, 2),
            "build_train_iterator": round(t2 - t1, 2),
            "until_iterator": round(t2 - t0, 2),
            "first_batch": round(t3 - t2, 2),
            "total": round(t3 - t0, 2),
        },
        "first_batch_images": int(len(batch["image"])),
    }


def main(argv) -> None:
    del argv
    path, image_root = FLAGS.json, FLAGS.json + ".images"
    generated = not os.path.exists(path)
    if generated:
        t0 = time.perf_counter()
        write_sharegpt4v_json(path, FLAGS.records)
        print(f"wrote {path}: {FLAGS.records} entries, {os.path.getsize(path) / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    if not os.path.isdir(image_root):
        write_images(image_root)
    try:
        result = time_startup(path, image_root, FLAGS.batch_size, FLAGS.image_size)
        result["json_bytes"] = os.path.getsize(path)
        print(json.dumps(result, indent=1))
    finally:
        if not FLAGS.keep:
            os.remove(path)
            shutil.rmtree(image_root, ignore_errors=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
