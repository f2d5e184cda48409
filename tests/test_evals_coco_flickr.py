"""COCO and Flickr30k retrieval protocols on tiny on-disk copies of their real layouts.

COCO: captions_val2017.json (images in ascending id order, first 5 captions in file order) and
the Karpathy json. Flickr30k: results_20130124.token (whole file, or restricted to the Karpathy
test images) and the Karpathy json.
"""

import json
import os

import numpy as np
import pytest
from test_evals_datasets import expected_recall
from test_evals_fakes import IdFake, id_image, save_png

from beta_clip_jax.evals import readers
from beta_clip_jax.evals.retrieval import RetrievalEvaluator

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")

# COCO image id -> the IdFake id its pixels and captions carry. File order is not id order.
COCO_IMAGES = {42: 5, 7: 6, 19: 9}
COCO_CAPTIONS = {42: 5, 7: 5, 19: 7}  # 19 has more than 5: only its first 5 are kept


def coco_name(image_id):
    return f"{image_id:012d}.jpg"


def coco_caption(image_id, m):
    return f"{ORDINALS[m]} view of thing {COCO_IMAGES[image_id]}"


def make_coco_val2017(root, extra=None):
    """root/annotations/captions_val2017.json + root/val2017/*.jpg; annotations interleaved."""
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "val2017"))
    fake_ids = {**COCO_IMAGES, **(extra or {})}
    images = []
    for image_id, fake_id in fake_ids.items():
        save_png(id_image(fake_id), os.path.join(root, "val2017", coco_name(image_id)))
        images.append({"id": image_id, "file_name": coco_name(image_id), "height": 10})
    counts = {**COCO_CAPTIONS, **{i: 4 for i in extra or {}}}
    annotations = []
    for m in range(max(counts.values())):  # round-robin, so an image's captions are not adjacent
        for image_id in counts:
            if m < counts[image_id]:
                text = f"{ORDINALS[m]} view of thing {fake_ids[image_id]}"
                # annotation ids descend, so only file order gives the expected caption order
                annotations.append({"id": 1000 - len(annotations), "image_id": image_id})
                annotations[-1]["caption"] = text + (" \n" if m == 0 else "")
    annotations.append({"id": 1, "image_id": 999, "caption": "an orphan caption 0"})
    path = os.path.join(root, "annotations", "captions_val2017.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return path


def test_coco_val2017_order_captions_and_map(tmp_path):
    root = str(tmp_path / "coco")
    make_coco_val2017(root)
    data = RetrievalEvaluator("coco", {"kind": "coco", "root": root}).data
    assert data.image_paths == [os.path.join(root, "val2017", coco_name(i)) for i in (7, 19, 42)]
    want = [coco_caption(i, m) for i in (7, 19, 42) for m in range(5)]
    assert data.captions == want  # first 5 in file order, stripped; 19's 6th and 7th dropped
    assert data.text_to_image.tolist() == [i for i in range(3) for _ in range(5)]
    # The same through explicit paths, without root.
    explicit = {"kind": "coco", "protocol": "val2017", "image_root": root}
    explicit["annotation_json"] = os.path.join(root, "annotations", "captions_val2017.json")
    assert RetrievalEvaluator("c", explicit).data.captions == want


def test_coco_val2017_end_to_end(tmp_path):
    root = str(tmp_path / "coco")
    make_coco_val2017(root)
    with pytest.raises(ValueError, match=r"000000000007.jpg has 5 captions.*captions_per_image=6"):
        RetrievalEvaluator("c", {"kind": "coco", "root": root, "captions_per_image": 6})
    ev = RetrievalEvaluator("coco", {"kind": "coco", "root": root, "batch_size": 2})
    assert not ev.tci
    fake = IdFake()
    out = ev.run(fake)
    image_ids = np.array([6, 9, 5])  # COCO ids 7, 19, 42
    want = expected_recall(fake, image_ids, np.repeat(image_ids, 5))
    assert {k: out[k] for k in want} == pytest.approx(want)
    assert out["num_images"] == 3 and out["num_texts"] == 15
    # Per item (evaluate --per_item): each caption's rank of its image, each image's best rank
    # of its own captions, counted here from the similarity matrix directly.
    items = []
    assert ev.run(fake, items=items) == out
    sim = fake.image_table[image_ids] @ fake.text_table[np.repeat(image_ids, 5)].T
    t2i = [r for r in items if r["direction"] == "t2i"]
    i2t = [r for r in items if r["direction"] == "i2t"]
    assert [r["index"] for r in t2i] == list(range(15)) and len(i2t) == 3
    for r in t2i:
        col, gt = sim[:, r["index"]], r["image"]
        assert gt == r["index"] // 5 and r["rank"] == int((col > col[gt]).sum())
    for r in i2t:
        row = sim[r["index"]]
        own = row[5 * r["index"] : 5 * r["index"] + 5].max()
        assert r["rank"] == int((row > own).sum())
    assert 100 * np.mean([r["rank"] < 1 for r in t2i]) == pytest.approx(out["t2i_r1"])


def test_coco_val2017_refuses_short_images_and_missing_files(tmp_path):
    root = str(tmp_path / "coco")
    path = make_coco_val2017(root, extra={3: 7})  # image 3 has only 4 captions
    with pytest.raises(ValueError, match=r"captions_val2017.json: image 000000000003.jpg has 4"):
        readers.read_coco_captions(path, root)
    with pytest.raises(ValueError, match=r"image 000000000003.jpg has 4 .*captions_per_image=5"):
        RetrievalEvaluator("c", {"kind": "coco", "root": root})
    assert len(readers.read_coco_captions(path, root, captions_per_image=4).captions) == 16
    missing = str(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError,
        match=r"captions_val2017.json\).*nowhere.annotations.captions_val2017.json.*cocodataset",
    ):
        RetrievalEvaluator("c", {"kind": "coco", "root": missing})
    os.makedirs(tmp_path / "noimages" / "annotations")
    os.rename(path, tmp_path / "noimages" / "annotations" / "captions_val2017.json")
    with pytest.raises(FileNotFoundError, match=r"COCO image folder.*val2017.*cocodataset.org"):
        RetrievalEvaluator("c", {"kind": "coco", "root": str(tmp_path / "noimages")})


def make_coco_karpathy(root):
    os.makedirs(os.path.join(root, "val2014"))
    entries = []
    for k, split in ((1, "test"), (2, "val"), (3, "test")):
        save_png(id_image(k), os.path.join(root, "val2014", f"im{k}.jpg"))
        sentences = [{"raw": f"sentence {m} about item {k} "} for m in range(6)]
        entries.append({"filepath": "val2014", "filename": f"im{k}.jpg", "split": split})
        entries[-1]["sentences"] = sentences
    with open(os.path.join(root, "dataset_coco.json"), "w") as f:
        json.dump({"images": entries}, f)


def test_coco_karpathy_protocol_and_old_configs(tmp_path):
    root = str(tmp_path)
    make_coco_karpathy(root)
    data = RetrievalEvaluator("c", {"kind": "coco", "protocol": "karpathy", "root": root}).data
    assert data.image_paths == [os.path.join(root, "val2014", f"im{k}.jpg") for k in (1, 3)]
    assert data.captions[:2] == ["sentence 0 about item 1", "sentence 1 about item 1"]
    assert data.text_to_image.tolist() == [0] * 5 + [1] * 5
    # An older config naming the Karpathy json (or a split) still reads it, without a protocol.
    json_path = os.path.join(root, "dataset_coco.json")
    old = RetrievalEvaluator("c", {"kind": "coco", "json_path": json_path, "image_root": root})
    assert old.data.image_paths == data.image_paths
    val = RetrievalEvaluator("c", {"kind": "coco", "root": root, "split": "val"})
    assert val.data.image_paths == [os.path.join(root, "val2014", "im2.jpg")]
    with pytest.raises(ValueError, match=r"protocol 'val2017' does not read \['split'\]"):
        RetrievalEvaluator("c", {"kind": "coco", "protocol": "val2017", "root": root, "split": "x"})
    with pytest.raises(ValueError, match=r"protocol 'karpathy5k' not in \['val2017', 'karpathy'\]"):
        RetrievalEvaluator("c", {"kind": "coco", "protocol": "karpathy5k", "root": root})


# Flickr30k: file name -> IdFake id. The token file lists them 300, 100, 200; 100's first two
# lines are swapped (#1 before #0), and file order is what is kept.
FLICKR_IMAGES = {"300.jpg": 3, "100.jpg": 1, "200.jpg": 2}


def flickr_lines(name, k_order=range(5)):
    return [
        f"{name}#{k}\tA person doing thing {k} in photo {FLICKR_IMAGES[name]} .\n" for k in k_order
    ]


def make_flickr(root, short=None):
    """root/results_20130124.token, root/flickr30k-images/, root/dataset_flickr30k.json."""
    os.makedirs(os.path.join(root, "flickr30k-images"))
    lines = []
    for name, fake_id in FLICKR_IMAGES.items():
        save_png(id_image(fake_id), os.path.join(root, "flickr30k-images", name))
        lines += flickr_lines(name, (1, 0, 2, 3, 4) if name == "100.jpg" else range(5))
    if short:  # an extra image with only 4 captions
        lines += [f"{short}#{k}\tshort caption {k}\n" for k in range(4)]
    with open(os.path.join(root, "results_20130124.token"), "w") as f:
        f.writelines(lines)
    splits = {"100.jpg": "train", "200.jpg": "test", "300.jpg": "test"}
    entries = [
        {
            "filename": name,
            "split": splits[name],
            "sentences": [{"raw": line.split("\t")[1].strip()} for line in flickr_lines(name)],
        }
        for name in ("100.jpg", "200.jpg", "300.jpg")
    ]
    with open(os.path.join(root, "dataset_flickr30k.json"), "w") as f:
        json.dump({"images": entries}, f)
    return root


def flickr_captions(name, k_order=range(5)):
    return [line.split("\t")[1].strip() for line in flickr_lines(name, k_order)]


def test_flickr_full_token_file(tmp_path):
    root = make_flickr(str(tmp_path))
    ev = RetrievalEvaluator("f", {"kind": "flickr30k", "protocol": "full", "root": root})
    folder = os.path.join(root, "flickr30k-images")
    assert ev.data.image_paths == [
        os.path.join(folder, n) for n in ("300.jpg", "100.jpg", "200.jpg")
    ]
    want = flickr_captions("300.jpg") + flickr_captions("100.jpg", (1, 0, 2, 3, 4))
    assert ev.data.captions == want + flickr_captions("200.jpg")
    assert ev.data.text_to_image.tolist() == [i for i in range(3) for _ in range(5)]
    fake = IdFake()
    out = ev.run(fake)
    image_ids = np.array([3, 1, 2])
    expected = expected_recall(fake, image_ids, np.repeat(image_ids, 5))
    assert {k: out[k] for k in expected} == pytest.approx(expected)
    assert out["num_images"] == 3 and out["num_texts"] == 15


def test_flickr_karpathy_1k_from_json_or_token_file(tmp_path):
    root = make_flickr(str(tmp_path))
    folder = os.path.join(root, "flickr30k-images")
    default = RetrievalEvaluator("f", {"kind": "flickr30k", "root": root}).data  # Karpathy json
    assert default.image_paths == [os.path.join(folder, n) for n in ("200.jpg", "300.jpg")]
    assert default.captions == flickr_captions("200.jpg") + flickr_captions("300.jpg")
    assert default.text_to_image.tolist() == [0] * 5 + [1] * 5
    # The token file restricted to a test list (text file: list order, ".jpg" optional) ...
    (tmp_path / "test_list.txt").write_text("300.jpg\n200\n")
    cfg = {"kind": "flickr30k", "root": root, "test_list": str(tmp_path / "test_list.txt")}
    listed = RetrievalEvaluator("f", cfg).data
    assert listed.image_paths == [os.path.join(folder, n) for n in ("300.jpg", "200.jpg")]
    assert listed.captions == flickr_captions("300.jpg") + flickr_captions("200.jpg")
    # ... or to the Karpathy json's test entries, captions still from the token file.
    cfg["test_list"] = os.path.join(root, "dataset_flickr30k.json")
    from_json = RetrievalEvaluator("f", {**cfg, "protocol": "karpathy_1k"}).data
    assert from_json.image_paths == default.image_paths
    assert from_json.captions == default.captions
    ev = RetrievalEvaluator("f", {"kind": "flickr30k", "root": root, "batch_size": 3})
    fake = IdFake()
    expected = expected_recall(fake, np.array([2, 3]), np.repeat([2, 3], 5))
    out = ev.run(fake)
    assert {k: out[k] for k in expected} == pytest.approx(expected)


def test_flickr_errors_name_what_was_expected(tmp_path):
    root = make_flickr(str(tmp_path / "f"), short="400.jpg")
    token = os.path.join(root, "results_20130124.token")
    folder = os.path.join(root, "flickr30k-images")
    with pytest.raises(ValueError, match=r"results_20130124.token: image 400.jpg has 4 captions"):
        readers.read_flickr_token(token, folder)
    with pytest.raises(ValueError, match=r"1 listed images have no captions there.*'500.jpg'"):
        readers.read_flickr_token(token, folder, image_list=["300.jpg", "500.jpg"])
    assert len(readers.read_flickr_token(token, folder, 4).image_paths) == 4
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(
        FileNotFoundError, match=r"results_20130124.token\).*empty.*Flickr30k dataset"
    ):
        RetrievalEvaluator("f", {"kind": "flickr30k", "protocol": "full", "root": empty})
    with pytest.raises(
        FileNotFoundError,
        match=r"karpathy_1k.*dataset_flickr30k.json.*caption_datasets.zip.*token_path \+ test_list",
    ):
        RetrievalEvaluator("f", {"kind": "flickr30k", "root": empty})
    with pytest.raises(ValueError, match=r"'karpathy_1k' with token_path needs test_list"):
        RetrievalEvaluator("f", {"kind": "flickr30k", "token_path": token, "image_root": folder})
    with pytest.raises(ValueError, match=r"protocol 'full' does not read \['split'\]"):
        RetrievalEvaluator(
            "f", {"kind": "flickr30k", "protocol": "full", "root": root, "split": "test"}
        )
    with pytest.raises(ValueError, match=r"json_path .* or test_list .*, not both"):
        cfg = {"kind": "flickr30k", "root": root, "test_list": token, "json_path": token}
        RetrievalEvaluator("f", cfg)
    bad = tmp_path / "bad.token"
    bad.write_text("100.jpg#0\tfine\n100.jpg no tab here\n")
    with pytest.raises(ValueError, match=r"bad.token:2: expected '<image>.jpg#<k><TAB><caption>'"):
        readers.read_flickr_token(str(bad), folder)
