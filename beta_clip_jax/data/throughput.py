"""Data-pipeline throughput: images/s and images per CPU-second for real JPEGs in each file
format, and for synthetic scenes.

    python -m beta_clip_jax.data.throughput [--path=train.jsonl --image_root=DIR] \
        [--formats=jsonl,csv,webdataset,array_record,folder] [--num_workers=0] \
        [--num_threads=2] [--batch_size=32] [--batches=20] [--image_size=224]

Without --path it writes `--num_images` JPEGs of `--image_hw` (random smooth texture + noise, so
file sizes are photo-like) and long multi-sentence captions to a temp dir, as a JSONL and then
as each of `--formats` holding the same records (CSV, `--shards` WebDataset tars and ArrayRecord
shards with the images inside, a caption folder). The real path is read + decode +
RandomResizedCrop + caption hierarchy (fallback phrases unless the records have them) +
tokenising 1 + 5 + 30 texts. Prints one JSON object: "real" is the JSONL, "formats" each format
side by side. Per-core numbers divide by the CPU seconds of this process and its workers, so
they do not depend on how many cores the machine has.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time

import numpy as np
import psutil
from absl import app, flags
from PIL import Image

from beta_clip_jax.data import hierarchy, pipeline
from beta_clip_jax.data.arrayrecord_source import ArrayRecordWriter
from beta_clip_jax.data.webdataset_source import WebDatasetWriter

FORMATS = ("jsonl", "csv", "webdataset", "array_record", "folder")


def _define_flags() -> None:
    """Flags are defined only when run as a command, so importing this module defines none."""
    flags.DEFINE_string("path", None, "JSONL to read (default: generate JPEGs in a temp dir).")
    flags.DEFINE_string("image_root", None, "Image root for --path.")
    flags.DEFINE_integer("num_images", 128, "Generated images.")
    flags.DEFINE_list("image_hw", ["480", "640"], "Generated image height,width.")
    flags.DEFINE_integer("image_size", 224, "Output crop size.")
    flags.DEFINE_integer("batch_size", 32, "Batch size.")
    flags.DEFINE_integer("batches", 20, "Timed batches (after warm-up batches).")
    flags.DEFINE_integer("num_workers", 0, "grain worker processes.")
    flags.DEFINE_integer("num_threads", 2, "Batches built concurrently per process.")
    flags.DEFINE_bool("jpeg_draft", True, "JPEG DCT-domain downscale before cropping.")
    flags.DEFINE_bool("synthetic", True, "Also time the synthetic scenes.")
    flags.DEFINE_list("formats", list(FORMATS), "File formats to time on the generated JPEGs.")
    flags.DEFINE_integer("shards", 4, "WebDataset / ArrayRecord shards of the generated data.")
    flags.DEFINE_bool(
        "prepared",
        False,
        "Generated JSONL carries sentences + phrases (as data/prepare.py writes).",
    )


_WORDS = {
    "adj": "red blue green small large wooden metal bright dark old modern tall narrow busy quiet "
    "shiny striped white black yellow rusty colorful distant".split(),
    "noun": "car tree building street woman man dog bench lamp window sky cloud bicycle sign "
    "table chair boat river bridge mountain flower cup book shop".split(),
    "prep": "next to|in front of|behind|on the left of|near|above|beside|under".split("|"),
    "verb": "is parked|stands|is placed|rests|is visible|appears".split("|"),
}


def _sentence(rng) -> str:
    w = {k: v[int(rng.integers(len(v)))] for k, v in _WORDS.items()}
    adj2 = _WORDS["adj"][int(rng.integers(len(_WORDS["adj"])))]
    noun2 = _WORDS["noun"][int(rng.integers(len(_WORDS["noun"])))]
    return f"A {w['adj']} {w['noun']} {w['verb']} {w['prep']} the {adj2} {noun2}"


def write_dataset(root: str, n: int, hw: tuple[int, int], seed: int = 0, prepared=False) -> str:
    """n JPEGs + a JSONL of 8-sentence captions (~100 words); `prepared`: with sentences and
    fallback phrases precomputed. Returns the JSONL path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    path = os.path.join(root, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            coarse = rng.integers(0, 255, (hw[0] // 32 + 1, hw[1] // 32 + 1, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(coarse).resize(hw[::-1], Image.BICUBIC), np.int16)
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"images/{i}.jpg"), quality=90)
            caption = ". ".join(_sentence(rng) for _ in range(8)) + "."
            rec = {"image": f"images/{i}.jpg", "caption": caption}
            if prepared:
                rec["sentences"] = hierarchy.split_sentences(hierarchy.dedupe_caption(caption))
                rec["phrases"] = hierarchy.extract_phrases_fallback(caption)
            f.write(json.dumps(rec) + "\n")
    return path


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_formats(root: str, jsonl_path: str, shards: int = 4) -> dict[str, dict]:
    """The JSONL's records (images under `root`) also as a CSV, WebDataset and ArrayRecord
    shards (images inside) and caption files beside the images. Returns each format's
    data.* fields."""
    records = _read_jsonl(jsonl_path)
    hierarchy_keys = [k for k in ("sentences", "phrases") if k in records[0]]
    with open(os.path.join(root, "data.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", *hierarchy_keys])
        for r in records:
            writer.writerow([r["image"], r["caption"], *(json.dumps(r[k]) for k in hierarchy_keys)])
    outputs = {"webdataset": WebDatasetWriter, "array_record": ArrayRecordWriter}
    for name, cls in outputs.items():
        with cls(os.path.join(root, name, "train"), shards, len(records)) as out:
            for r in records:
                with open(os.path.join(root, r["image"]), "rb") as f:
                    out.write({**r, "image": f.read(), "image_ext": "jpg"})
    for r in records:  # caption files beside the images: the `folder` format
        meta = {k: v for k, v in r.items() if k != "image"}
        with open(os.path.join(root, os.path.splitext(r["image"])[0] + ".json"), "w") as f:
            json.dump(meta, f)
    return {
        "jsonl": {"path": jsonl_path},
        "csv": {"path": os.path.join(root, "data.csv")},
        "webdataset": {"path": os.path.join(root, "webdataset")},
        "array_record": {"path": os.path.join(root, "array_record", "train")},
        "folder": {"path": os.path.join(root, "images")},
    }


def _cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(cfg, batch_size: int, batches: int, image_size: int) -> dict:
    """Time `batches` batches after warm-up ones (worker start-up, tokenizer cache)."""
    it = pipeline.build_train_iterator(
        cfg, batch_size_per_process=batch_size, seed=0, image_size=image_size
    )
    proc = psutil.Process()
    try:
        for _ in range(2 * max(1, cfg.num_workers)):  # every worker started and warm
            next(it)
        cpu0, t0 = _cpu_seconds(proc), time.perf_counter()
        for _ in range(batches):
            next(it)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds(proc) - cpu0
    finally:
        it.close()
    images = batches * batch_size
    return {
        "images_per_sec": round(images / wall, 1),
        "images_per_cpu_sec": round(images / max(cpu, 1e-9), 1),
        "cpu_cores_busy": round(cpu / wall, 2),
        "skipped": sum(v for k, v in it.metrics().items() if k.startswith("data/skipped")),
    }


def _measure_formats(base, fields_by_format: dict, timed: tuple) -> dict:
    """`measure(cfg, *timed)` of each of --formats on the same records."""
    unknown = set(flags.FLAGS.formats) - set(FORMATS)
    if unknown:
        raise app.UsageError(f"--formats: unknown {sorted(unknown)}; known: {FORMATS}")
    results = {}
    for name in flags.FLAGS.formats:
        cfg = base.copy_and_resolve_references()
        cfg.name = name
        for key, value in fields_by_format[name].items():
            cfg[key] = value
        results[name] = measure(cfg, *timed)
    return results


def main(argv):
    del argv
    cfg = pipeline.default_data_config()
    cfg.num_workers, cfg.num_threads, cfg.jpeg_draft = (
        flags.FLAGS.num_workers,
        flags.FLAGS.num_threads,
        flags.FLAGS.jpeg_draft,
    )
    cfg.max_skip_fraction = 1.0
    out = {
        "cpu_count": len(os.sched_getaffinity(0)),
        "num_workers": cfg.num_workers,
        "num_threads": cfg.num_threads,
        "batch_size": flags.FLAGS.batch_size,
        "image_size": flags.FLAGS.image_size,
        "texts_per_image": 1 + cfg.max_sentences + cfg.max_phrases,
    }
    timed = (flags.FLAGS.batch_size, flags.FLAGS.batches, flags.FLAGS.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        real = cfg.copy_and_resolve_references()
        real.name, real.index_cache = "jsonl", ""
        if flags.FLAGS.path:
            real.path, real.image_root = flags.FLAGS.path, flags.FLAGS.image_root
            out["real_source"] = flags.FLAGS.path
            out["real"] = measure(real, *timed)
        else:
            hw = tuple(int(x) for x in flags.FLAGS.image_hw)
            path = write_dataset(tmp, flags.FLAGS.num_images, hw, prepared=flags.FLAGS.prepared)
            out["real_source"] = f"{flags.FLAGS.num_images} generated {hw[0]}x{hw[1]} JPEGs" + (
                ", precomputed sentences + phrases" if flags.FLAGS.prepared else ""
            )
            fields = write_formats(tmp, path, flags.FLAGS.shards)
            out["formats"] = _measure_formats(real, fields, timed)
            if "jsonl" in out["formats"]:
                out["real"] = out["formats"]["jsonl"]
    if flags.FLAGS.synthetic:
        out["synthetic"] = measure(cfg, *timed)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
