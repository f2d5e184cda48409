"""python -m beta_clip_jax.evaluate: FG-OVD scored exactly as the reference evaluator, per item.

The reference is computed here from the HF weights in torch (value-only last block), a NumPy
ROI-align written from torchvision's rules (test_evals_metrics), PIL's default resize and
transformers' text tower: independent of our JAX towers, our ROI-align and our evaluator.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers_tiny import TINY, hf_text_features, make_hf_model, save_hf_dir
from helpers_tiny import value_only_patch_tokens as torch_patch_tokens
from PIL import Image
from test_evals_metrics import _reference_roi_align

from beta_clip_jax import evaluate
from beta_clip_jax.data.transforms import normalize as normalize_images
from beta_clip_jax.tokenizer import Tokenizer

# (image file, (width, height), box x y w h, positive, negatives)
ITEMS = {
    "hard": [
        ("val2017/a.jpg", (48, 40), (3.0, 4.5, 20.0, 17.0), "a red cube", ["a blue cube", "cube"]),
        ("val2017/a.jpg", (48, 40), (40.0, 30.0, 7.5, 9.5), "a tiny dot", ["a big dot"] * 3),
        ("train2017/b.png", (40, 64), (0.0, 0.0, 40.0, 64.0), "all", ["none", "all"]),
        ("train2017/b.png", (40, 64), (10.2, 50.1, 2.3, 1.1), "thin", ["wide", "x", "y"]),
    ],
    "trivial": [
        ("val2017/c.jpg", (32, 32), (8.0, 8.0, 16.0, 16.0), "centre", ["corner", "edge"]),
        ("val2017/a.jpg", (48, 40), (24.0, 0.0, 24.0, 40.0), "right half", ["left half"]),
    ],
}
FILES = {"hard": "h_attributes_llava.jsonl", "trivial": "shuffle_negatives_llava.jsonl"}
SPLITS = 'difficulties=["hard", "trivial"]'  # the set has two of the four files


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    hf = make_hf_model(TINY, seed=21)
    model_dir = save_hf_dir(hf, str(root / "hf"))
    rng = np.random.default_rng(0)
    for split, items in ITEMS.items():
        lines = []
        for path, (w, h), box, pos, negs in items:
            full = root / "coco" / path
            if not full.exists():
                full.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(full, quality=95)
            rec = {"img_path": path, "bbox": box, "pos_expression": [pos], "neg_expression": negs}
            lines.append(json.dumps({**rec, "width": w, "height": h, "test_type": split}))
        (root / "fgovd").mkdir(exist_ok=True)
        (root / "fgovd" / FILES[split]).write_text("\n".join(lines) + "\n")
    return hf, model_dir, str(root / "fgovd"), str(root / "coco")


def _reference_scores(hf, image_root, item, normalize_patches=False):
    path, _, (x, y, w, h), pos, negs = item
    with Image.open(os.path.join(image_root, path)) as img:
        img = img.convert("RGB")
        width, height = img.size
        pixels = np.asarray(img.resize((32, 32)))  # PIL's default filter, as the reference
    tokens = torch_patch_tokens(hf, normalize_images(pixels[None]))[0].astype(np.float64)
    if normalize_patches:
        tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    grid = tokens.reshape(4, 4, -1)
    box = (x / width * 4, y / height * 4, (x + w) / width * 4, (y + h) / height * 4)
    vec = _reference_roi_align(grid, box, 1, 1, 1.0, -1, True)[0, 0]
    vec /= np.linalg.norm(vec)
    # Each distinct text embedded once: a batched torch product may round a repeated row
    # differently, which would break the tie the reference's rule makes a hit.
    distinct, where = np.unique([pos, *negs], return_inverse=True)
    text = hf_text_features(hf, Tokenizer().encode(list(distinct), 77)).astype(np.float64)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    return (text @ vec)[where]


def test_fgovd_per_item_equals_reference(setup):
    hf, model_dir, fgovd_root, image_root = setup
    configs = evaluate.eval_configs(["fgovd"], [fgovd_root], [image_root], [SPLITS], 3, None)
    evaluators, encoder = evaluate.prepare(f"hf:{model_dir}", configs, batch_size=3)
    results, items = evaluate.run(evaluators, encoder, per_item=True)
    order = [(s, i) for s in ITEMS for i in range(len(ITEMS[s]))]
    assert [(r["split"], r["index"]) for r in items] == order
    moved = 0.0
    for split, split_items in ITEMS.items():
        ours = [r["scores"] for r in items if r["split"] == split]
        assert len(ours) == len(split_items)
        hits = []
        for got, item in zip(ours, split_items, strict=True):
            ref = _reference_scores(hf, image_root, item)
            np.testing.assert_allclose(got, ref, atol=2e-4)
            hits.append(ref[0] >= ref.max())
            moved = max(moved, np.abs(_reference_scores(hf, image_root, item, True) - ref).max())
        assert results["fgovd"][split] == pytest.approx(100.0 * np.mean(hits))
    # The test tells the protocols apart: normalising patches first moves some score.
    assert moved > 1e-3
    # A positive repeated among its negatives ties with the row maximum: a hit.
    # Its two copies score bit-identically (one product per distinct text), so the tie rule
    # decides, not the rounding a matrix product gives each row.
    tie = [r for r in items if r["split"] == "hard" and r["index"] == 2][0]["scores"]
    assert tie[0] == tie[2]


def test_flags_align_with_each_eval():
    configs = evaluate.eval_configs(
        ["urban1k", "fgovd", "sharegpt4v_1k", "fgovd"],
        ["/u", "/f", "/sv.json", "/f2"],
        ["", "/coco", "/sv", "/coco"],
        ["tci=false", "caption_mode=longclip"],
        8,
        5,
    )
    assert list(configs) == ["urban1k", "fgovd", "sharegpt4v_1k", "fgovd_2"]
    assert configs["urban1k"] == {
        "kind": "urban1k",
        "batch_size": 8,
        "tci": False,
        "caption_mode": "longclip",
        "root": "/u",
        "max_examples": 5,
    }
    assert configs["sharegpt4v_1k"]["json_path"] == "/sv.json"
    assert configs["fgovd_2"]["root"] == "/f2" and configs["fgovd"]["image_root"] == "/coco"
    with pytest.raises(ValueError, match="--root given 2 times for 3"):
        evaluate.eval_configs(["a", "b", "c"], ["/1", "/2"], [], [], 8, None)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        evaluate.eval_configs(["urban1k"], ["/u"], [], ["tci"], 8, None)


def _command(*args):
    return subprocess.run(
        [sys.executable, "-m", "beta_clip_jax.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_command_writes_json_and_per_item(setup, tmp_path):
    _, model_dir, fgovd_root, image_root = setup
    out, per_item = tmp_path / "r.json", tmp_path / "items.jsonl"
    common = [f"--model=hf:{model_dir}", "--eval=fgovd", f"--image_root={image_root}"]
    common.append(f"--set={SPLITS}")
    done = _command(*common, f"--root={fgovd_root}", f"--json={out}", f"--per_item={per_item}")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results["fgovd"]) == {"hard", "trivial"}
    lines = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["eval"] == "fgovd" and len(lines[0]["scores"]) == 3
    assert "model: hf:" in done.stdout and "fgovd" in done.stdout
    # A missing dataset stops before loading the model, with the path and no traceback.
    bad = _command(*common, f"--root={tmp_path / 'nope'}")
    assert bad.returncode != 0
    assert "h_attributes_llava.jsonl" in bad.stderr and "Traceback" not in bad.stderr
