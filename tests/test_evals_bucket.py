"""Evaluation datasets on a bucket: the readers go through etils epath, so an Urban1K folder,
a zero-shot class tree and a JSONL read from a (fake, in-memory) s3:// bucket give the manifests
and pixels the local copies give."""

import numpy as np
from PIL import Image
from test_data_sources import make_jsonl, make_urban1k
from test_sources_formats import _upload, bucket  # noqa: F401 (bucket: the fixture)

from beta_clip_jax.evals import readers
from beta_clip_jax.evals.base import load_image
from beta_clip_jax.evals.registry import build_evaluator


def _remote(path, root):
    return str(path).replace(str(root), "s3://bucket")


def test_urban1k_from_a_bucket_equals_the_local_copy(tmp_path, bucket):  # noqa: F811
    make_urban1k(str(tmp_path / "urban"), n=6)
    _upload(tmp_path, "urban")
    local = readers.read_urban1k(str(tmp_path / "urban"))
    remote = readers.read_urban1k("s3://bucket/urban")
    assert remote.image_paths == [_remote(p, tmp_path) for p in local.image_paths]
    assert remote.captions == local.captions
    np.testing.assert_array_equal(
        np.asarray(load_image(remote.image_paths[0])), np.asarray(load_image(local.image_paths[0]))
    )


def test_zero_shot_tree_and_jsonl_eval_from_a_bucket(tmp_path, bucket):  # noqa: F811
    for i, synset in enumerate(("n01440764", "n01443537")):
        folder = tmp_path / "imagenet" / synset
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.jpg")
    _upload(tmp_path, "imagenet")
    local = readers.read_image_folder(str(tmp_path / "imagenet"))
    remote = readers.read_image_folder("s3://bucket/imagenet")
    assert remote.classnames == local.classnames == ["tench", "goldfish"]
    assert remote.image_paths == [_remote(p, tmp_path) for p in local.image_paths]
    assert len(remote.templates) == 80

    make_jsonl(str(tmp_path / "own"), n=6, bad={2: "missing_image"})
    _upload(tmp_path, "own")
    cfg = {"kind": "jsonl", "path": "s3://bucket/own/data.jsonl"}
    evaluator = build_evaluator("held", cfg)
    local_ev = build_evaluator("held", {**cfg, "path": str(tmp_path / "own" / "data.jsonl")})
    assert evaluator.data.image_paths == [_remote(p, tmp_path) for p in local_ev.data.image_paths]
    assert len(evaluator.data.skipped) == len(local_ev.data.skipped) == 1
