"""Readers on tiny on-disk copies of each benchmark layout, and evaluators run on them with fake
encoders whose right answers are known."""

import json
import os

import numpy as np
import pytest
from test_evals_fakes import ColourFake, IdFake, id_image, quadrant_image, save_png

from beta_clip_jax.evals import readers
from beta_clip_jax.evals.fgovd import FgovdEvaluator
from beta_clip_jax.evals.metrics import retrieval_recall
from beta_clip_jax.evals.retrieval import RetrievalEvaluator
from beta_clip_jax.evals.zeroshot import ZeroShotEvaluator


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_urban1k(root, ids):
    os.makedirs(os.path.join(root, "image"))
    os.makedirs(os.path.join(root, "caption"))
    for k in ids:
        ext = ".png" if k % 2 else ".jpg"  # pairing is by stem, whatever the extension
        save_png(id_image(k), os.path.join(root, "image", f"{k}{ext}"))
        with open(os.path.join(root, "caption", f"{k}.txt"), "w") as f:
            f.write(f"a long caption of item {k}\nsecond line 99\n")
    return root


def expected_recall(fake, image_ids, text_ids, tci=False):
    owners = np.array([list(image_ids).index(t) for t in text_ids])
    gallery = fake.image_table[image_ids]
    if tci:  # each image pooled with its first own caption
        first = {}
        for j, owner in enumerate(owners):
            first.setdefault(owner, text_ids[j])
        own = fake.text_table[[first[i] for i in range(len(image_ids))]]
        gallery = _unit(gallery + 0.5 * own)
    return retrieval_recall(gallery @ fake.text_table[text_ids].T, owners)


def test_urban1k_reader_and_evaluator(tmp_path):
    ids = [1, 2, 3, 10, 11, 12, 20]
    root = make_urban1k(str(tmp_path / "Urban1k"), ids)
    data = readers.read_urban1k(root)
    order = sorted(str(k) for k in ids)  # lexicographic stems: 1, 10, 11, 12, 2, 20, 3
    assert [os.path.basename(p).split(".")[0] for p in data.image_paths] == order
    assert data.captions[0] == "a long caption of item 1"
    fake = IdFake()
    ev = RetrievalEvaluator("urban1k", {"kind": "urban1k", "root": root, "batch_size": 3})
    out = ev.run(fake)
    sorted_ids = np.array([int(s) for s in order])
    want = expected_recall(fake, sorted_ids, sorted_ids)
    assert {k: out[k] for k in want} == pytest.approx(want)
    tci = expected_recall(fake, sorted_ids, sorted_ids, tci=True)
    assert {k: out["tci_" + k] for k in tci} == pytest.approx(tci)
    assert out["num_images"] == 7 and out["num_texts"] == 7
    assert 0 < out["t2i_r1"] < 100  # the fake is imperfect, so the check is not vacuous
    # Every encoder call had batch_size rows (the last batch was padded).
    assert {n for _, n in fake.calls} == {3}
    small = RetrievalEvaluator("u", {"kind": "urban1k", "root": root, "max_examples": 4})
    assert len(small.data.image_paths) == 4


def test_sharegpt4v_first_entries_and_caption_cleaning(tmp_path):
    os.makedirs(tmp_path / "imgs" / "sam" / "images")
    entries = []
    for k in range(5):
        rel = f"sam/images/sa_{k}.jpg"
        save_png(id_image(k), tmp_path / "imgs" / rel)
        value = f"The picture shows shows\nitem {k}"
        entries.append({"image": rel, "conversations": [{"value": "<image>"}, {"value": value}]})
    with open(tmp_path / "sv.json", "w") as f:
        json.dump(entries, f)
    data = readers.read_sharegpt4v_1k(str(tmp_path / "sv.json"), str(tmp_path / "imgs"), num=3)
    assert data.captions == [f"The picture shows item {k}" for k in range(3)]
    raw = readers.read_sharegpt4v_1k(
        str(tmp_path / "sv.json"), str(tmp_path / "imgs"), num=3, caption_mode="longclip"
    )
    assert raw.captions[0] == "The picture shows shows item 0"
    cfg = {"kind": "sharegpt4v_1k", "json_path": str(tmp_path / "sv.json")}
    cfg.update(image_root=str(tmp_path / "imgs"), num=3, tci=False, batch_size=2)
    out = RetrievalEvaluator("sv1k", cfg).run(IdFake())
    assert "tci_t2i_r1" not in out and out["num_images"] == 3


def test_dci_reader(tmp_path):
    os.makedirs(tmp_path / "annotations")
    os.makedirs(tmp_path / "photos")
    for k in range(3):
        save_png(id_image(k), tmp_path / "photos" / f"sa_{k}.jpg")
        ann = {"image": f"sa_{k}.jpg", "short_caption": f"Short {k}.", "extra_caption": "A b.\nC d"}
        with open(tmp_path / "annotations" / f"sa_{k}.json", "w") as f:
            json.dump(ann, f)
    data = readers.read_dci(str(tmp_path))
    assert data.captions[1] == "Short 1. A b. C d"
    assert data.image_paths[2].endswith(os.path.join("photos", "sa_2.jpg"))
    assert readers.read_dci(str(tmp_path), caption_mode="extra").captions[0] == "A b. C d"


def make_karpathy(tmp_path, name, with_filepath):
    images = []
    for k in range(4):
        sub = "val2014" if with_filepath else ""
        os.makedirs(tmp_path / sub, exist_ok=True)
        save_png(id_image(k), tmp_path / sub / f"im{k}.jpg")
        entry = {
            "filename": f"im{k}.jpg",
            "split": "train" if k == 0 else "test",
            "sentences": [{"raw": f"sentence {m} about item {k}"} for m in range(6)],
        }
        if with_filepath:
            entry["filepath"] = sub
        images.append(entry)
    with open(tmp_path / name, "w") as f:
        json.dump({"images": images}, f)


@pytest.mark.parametrize("kind", ["coco", "flickr30k"])
def test_karpathy_five_captions_per_image(tmp_path, kind):
    name = "dataset_coco.json" if kind == "coco" else "dataset_flickr30k.json"
    make_karpathy(tmp_path, name, with_filepath=kind == "coco")
    protocol = "karpathy" if kind == "coco" else "karpathy_1k"  # coco defaults to val2017
    cfg = {"kind": kind, "protocol": protocol, "root": str(tmp_path), "batch_size": 4}
    ev = RetrievalEvaluator(kind, cfg)
    assert len(ev.data.image_paths) == 3 and len(ev.data.captions) == 15  # split test, first 5
    assert ev.data.text_to_image.tolist() == [i for i in range(3) for _ in range(5)]
    assert not ev.tci
    fake = IdFake()
    out = ev.run(fake)
    text_ids = np.repeat([1, 2, 3], 5)
    want = expected_recall(fake, np.array([1, 2, 3]), text_ids)
    assert {k: out[k] for k in want} == pytest.approx(want)


def test_fgovd_hand_scored(tmp_path):
    # Quadrants of a 40x20 image: TL red, TR blue, BL green, BR red. Boxes in original pixels.
    image_root = tmp_path / "coco"
    for sub in ("val2017", "train2017"):
        os.makedirs(image_root / sub)
    save_png(quadrant_image("red", "blue", "green", "red"), image_root / "val2017" / "a.png")
    save_png(quadrant_image("red", "blue", "green", "red"), image_root / "train2017" / "b.png")
    rows = [
        ("val2017/a.png", [0, 0, 20, 10], "red", ["blue", "green"]),  # hit
        ("val2017/a.png", [20, 0, 20, 10], "red", ["blue"]),  # miss
        ("train2017/b.png", [0, 10, 20, 10], "green", ["red", "blue"]),  # hit (needs y scaling)
        ("train2017/b.png", [20, 10, 20, 10], "green", ["green"]),  # tie -> hit
        ("val2017/a.png", [0, 10, 20, 10], "red", ["green"]),  # miss
    ]
    os.makedirs(tmp_path / "fgovd")
    for fname in readers.FGOVD_FILES.values():
        with open(tmp_path / "fgovd" / fname, "w") as f:
            for path, box, pos, negs in rows:
                rec = {"img_path": path, "bbox": box, "pos_expression": [pos]}
                rec.update(neg_expression=negs, width=40, height=20)
                f.write(json.dumps(rec) + "\n")
    cfg = {"kind": "fgovd", "root": str(tmp_path / "fgovd"), "image_root": str(image_root)}
    cfg["batch_size"] = 2
    out = FgovdEvaluator("fgovd", cfg).run(ColourFake())
    assert out == pytest.approx({"hard": 60.0, "medium": 60.0, "easy": 60.0, "trivial": 60.0})
    cfg.update(difficulties=["hard"], max_examples=2)
    assert FgovdEvaluator("f", cfg).run(ColourFake()) == pytest.approx({"hard": 50.0})


def test_zeroshot_image_folder(tmp_path):
    labels = {"a_dir": [3, 5], "b_dir": [7], "c_dir": [9, 9]}  # image ids per class folder
    for d, ids in labels.items():
        os.makedirs(tmp_path / d)
        for n, k in enumerate(ids):
            save_png(id_image(k), tmp_path / d / f"{n}.png")
    (tmp_path / "classnames.txt").write_text("thing 3\nthing 7\nthing 9\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n{} again\n")
    data = readers.read_image_folder(str(tmp_path))
    assert data.labels.tolist() == [0, 0, 1, 2, 2] and data.templates[1] == "{} again"
    fake = IdFake(noise=0.3)
    out = ZeroShotEvaluator("zs", {"kind": "zeroshot", "root": str(tmp_path)}).run(fake)
    classes = _unit(fake.text_table[[3, 7, 9]])
    logits = fake.image_table[[3, 5, 7, 9, 9]] @ classes.T
    top1 = 100 * np.mean(np.argmax(logits, 1) == data.labels)
    assert out == pytest.approx({"top1": top1, "top5": 100.0})


def test_missing_paths_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="Urban1k image folder.*nowhere"):
        readers.read_urban1k(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ShareGPT4V annotation json"):
        readers.read_sharegpt4v_1k(str(tmp_path / "x.json"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DCI annotations folder"):
        readers.read_dci(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Karpathy split json"):
        readers.read_karpathy(str(tmp_path / "dataset_coco.json"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="FG-OVD hard file.*h_attributes_llava.jsonl"):
        readers.read_fgovd(str(tmp_path), str(tmp_path), "hard")
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        readers.read_image_folder(str(tmp_path))
    with pytest.raises(ValueError, match="needs config field 'root'"):
        RetrievalEvaluator("u", {"kind": "urban1k"})
