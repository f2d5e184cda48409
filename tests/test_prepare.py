"""prepare: every image decoded, every drop reported by its input line (JSONL) or entry index
(ShareGPT4V json), --check writes nothing."""

import json
import logging
import os
import subprocess
import sys

from test_data_sources import make_jsonl, make_sharegpt4v

from beta_clip_jax.data import prepare

# Records 0..5 on lines 1..6, a blank line 7 (make_jsonl's), then an unparseable line 8.
BAD = {2: "corrupt_image", 4: "empty_caption"}


def _input(root):
    path, entries = make_jsonl(str(root), n=6, bad=BAD)
    with open(path, "ab") as f:
        f.write(b'{"image": "images/000.jpg", "caption": \n')
    return path, entries


def _check_drops(stats):
    assert stats["kept"] == 4
    assert stats["dropped_corrupt_image"] == 1 and stats["dropped_bad_caption"] == 1
    assert stats["dropped_bad_record"] == 1 and stats["dropped_missing_image"] == 0
    listed = [(d["line"], d["image"], d["reason"]) for d in stats["dropped"]]
    assert listed == [
        (3, "images/002.jpg", "corrupt_image"),
        (5, "images/004.jpg", "empty_caption"),
        (8, None, "bad_record"),
    ]
    assert "cannot decode" in stats["dropped"][0]["detail"]
    assert stats["dropped_not_listed"] == 0 and stats["images_checked"]


def test_prepare_reports_and_drops_bad_lines(tmp_path, caplog):
    path, entries = _input(tmp_path)
    out = str(tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING):
        stats = prepare.prepare(path, "jsonl", out, spacy_model=None)
    _check_drops(stats)
    assert stats["written"] == 4 and stats["check_only"] is False
    assert stats["image_root"] == str(tmp_path)  # the input's folder, as training resolves it
    warnings = caplog.text
    assert "data.jsonl:3 (corrupt_image)" in warnings
    assert "data.jsonl:5 (empty_caption)" in warnings and "data.jsonl:8 (bad_record)" in warnings
    with open(out, encoding="utf-8") as f:
        written = [json.loads(line)["image"] for line in f]
    assert written == [entries[i][0] for i in (0, 1, 3, 5)]


def test_prepare_parallel_decode_gives_the_same_summary(tmp_path):
    path, _ = _input(tmp_path)
    one = prepare.prepare(path, "jsonl", str(tmp_path / "a.jsonl"), spacy_model=None)
    two = prepare.prepare(path, "jsonl", str(tmp_path / "b.jsonl"), spacy_model=None, processes=2)
    assert one == two
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_check_writes_nothing(tmp_path):
    path, _ = _input(tmp_path)
    out = tmp_path / "out" / "train.jsonl"
    stats = prepare.prepare(path, "jsonl", str(out), spacy_model=None, check=True)
    _check_drops(stats)
    assert stats["written"] == 0 and stats["check_only"] is True
    assert not out.exists() and not out.parent.exists()
    # The command: --check needs no --out and writes no file anywhere.
    before = sorted(os.listdir(tmp_path))
    cmd = [sys.executable, "-m", "beta_clip_jax.data.prepare", f"--input={path}"]
    cmd += ["--format=jsonl", "--check", "--spacy_model="]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path)
    summary = json.loads(done.stdout)
    _check_drops(summary)
    assert "data.jsonl:3 (corrupt_image)" in done.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_sharegpt4v_drops_name_the_entry_index(tmp_path):
    bad = {3: "corrupt_image", 5: "missing_image", 6: "empty_caption"}
    path, _ = make_sharegpt4v(str(tmp_path), n=8, bad=bad)
    stats = prepare.prepare(
        path, "sharegpt4v", None, image_root=str(tmp_path), skip_first=2, check=True
    )
    assert [(d["entry"], d["reason"]) for d in stats["dropped"]] == [
        (3, "corrupt_image"),
        (5, "missing_image"),
        (6, "empty_caption"),
    ]
    assert stats["kept"] == 3 and stats["dropped_missing_image"] == 1


def test_drop_list_is_capped_with_a_count(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_LISTED_DROPS", 2)
    path, _ = make_jsonl(str(tmp_path), n=5, bad={i: "missing_image" for i in range(4)})
    stats = prepare.prepare(path, "jsonl", None, check=True)
    assert stats["dropped_missing_image"] == 4 and stats["kept"] == 1
    assert [d["line"] for d in stats["dropped"]] == [1, 2] and stats["dropped_not_listed"] == 2


def test_prepare_drops_too_large_and_escaping_images_unopened(tmp_path):
    """The training pipeline's image_too_large and unsafe_path records are dropped by prepare
    too (as corrupt image / bad record), and a path leaving image_root is never opened."""
    from PIL import Image

    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "images" / "ok.jpg")
    Image.new("L", (300, 300)).save(root / "images" / "big.png")  # 90,000 pixels
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (32, 32)).save(outside)
    lines = [
        {"image": "images/ok.jpg", "caption": "A red cube. A blue ball."},
        {"image": "images/big.png", "caption": "A huge picture."},
        {"image": "../outside.jpg", "caption": "An escape."},
        {"image": str(outside), "caption": "An absolute path."},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    opened = []
    real = prepare.sources.image_problem

    def spy(image_path):  # training's check with a limit the 300 x 300 image exceeds
        opened.append(os.path.abspath(image_path))
        return real(image_path, max_pixels=50_000)

    try:
        prepare.sources.image_problem = spy
        stats = prepare.prepare(
            str(path), "jsonl", str(tmp_path / "out.jsonl"), image_root=str(root)
        )
    finally:
        prepare.sources.image_problem = real
    reasons = [(d["line"], d["reason"]) for d in stats["dropped"]]
    assert reasons == [(2, "image_too_large"), (3, "unsafe_path"), (4, "unsafe_path")]
    assert stats["kept"] == 1 and stats["dropped_corrupt_image"] == 1
    assert stats["dropped_bad_record"] == 2
    assert str(outside) not in opened
