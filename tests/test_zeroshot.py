"""Zero-shot on ImageNet-style synset folders: the shipped ImageNet-1k tables, class names and
templates chosen per folder, id-like folders refused, and the api classifier against the
evaluator and a NumPy reference: with a fake encoder, and once with test_api's tiny model."""

import os
import re
import zlib

import numpy as np
import pytest
from test_evals_fakes import IdFake, id_image, save_png

from beta_clip_jax import api
from beta_clip_jax.evals import imagenet_classes, readers
from beta_clip_jax.evals.base import image_batches
from beta_clip_jax.evals.zeroshot import ZeroShotEvaluator

SYNSETS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
# Image ids per class folder (IdFake reads an image's id from its red channel).
IMAGE_IDS = {"n01440764": [3, 5], "n01443537": [7], "n01484850": [9, 11]}
TEXT_IDS = [3, 7, 9]  # class k's prompts embed near image id TEXT_IDS[k]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class NameFake(IdFake):
    """IdFake whose prompts embed by the class name they contain, plus a fixed offset per
    template (so the template mean matters); records every text it embeds."""

    batch_size = 4

    def __init__(self, class_names, text_ids=TEXT_IDS, **kwargs):
        super().__init__(noise=0.6, **kwargs)
        self.class_names, self.text_ids_of_class = list(class_names), list(text_ids)
        self.texts = []

    def class_of(self, text):
        found = [k for k, name in enumerate(self.class_names) if name in text]
        assert len(found) == 1, text
        return found[0]

    def template_of(self, text):
        return text.replace(self.class_names[self.class_of(text)], "{}")

    def embed_texts(self, texts):
        self.texts.extend(texts)
        return _unit(
            np.stack([self.reference(self.class_of(t), self.template_of(t)) for t in texts])
        )

    def reference(self, k, template):
        offset = np.random.default_rng(zlib.crc32(template.encode())).normal(size=16)
        return self.text_table[self.text_ids_of_class[k]] + 0.3 * offset


def make_folder(root, folders=IMAGE_IDS):
    for folder, ids in folders.items():
        os.makedirs(os.path.join(root, folder))
        for n, k in enumerate(ids):
            save_png(id_image(k), os.path.join(root, folder, f"ILSVRC2012_val_{n:08d}.png"))
    return str(root)


def reference_predictions(fake, templates):
    """Top-1 class per image, from the tables alone: class = mean of its unit prompt vectors."""
    classes = np.stack(
        [_unit(np.mean([_unit(fake.reference(k, t)) for t in templates], axis=0)) for k in range(3)]
    )
    images = fake.image_table[[i for ids in IMAGE_IDS.values() for i in ids]]
    return np.argmax(images @ classes.T, axis=1)


def test_imagenet_tables():
    wnids, names = imagenet_classes.IMAGENET_WNIDS, imagenet_classes.IMAGENET_CLASSNAMES
    assert len(names) == 1000 and len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert (wnids[0], wnids[-1]) == ("n01440764", "n15075141")
    # Well-known class indices of the standard order.
    known = {0: "tench", 1: "goldfish", 207: "Golden Retriever", 281: "tabby cat"}
    known.update({409: "analog clock", 999: "toilet paper"})
    assert {i: names[i] for i in known} == known
    assert wnids[207] == "n02099601" and wnids[409] == "n02708093"
    eighty, seven = imagenet_classes.OPENAI_IMAGENET_TEMPLATES, imagenet_classes.OPENAI_7_TEMPLATES
    assert len(eighty) == 80 == len(set(eighty)) and len(seven) == 7
    assert all(t.count("{}") == 1 for t in eighty) and set(seven) <= set(eighty)
    assert eighty[0] == "a bad photo of a {}." and seven[0] == "itap of a {}."
    assert tuple(readers.DEFAULT_TEMPLATES) == seven


def test_synset_folders_get_imagenet_names_and_80_templates(tmp_path):
    root = make_folder(tmp_path / "val")
    ev = ZeroShotEvaluator("imagenet", {"kind": "zeroshot", "root": root, "batch_size": 4})
    assert ev.data.classnames == list(SYNSETS.values())
    assert ev.data.classnames_from == readers.IMAGENET_TABLE
    assert ev.data.templates_from == "openai80"
    fake = NameFake(SYNSETS.values())
    out = ev.run(fake)
    assert len(fake.texts) == 3 * 80 and "itap of a tench." in fake.texts
    for k in range(3):  # every class got each of the 80 templates exactly once
        used = sorted(fake.template_of(t) for t in fake.texts if fake.class_of(t) == k)
        assert used == sorted(imagenet_classes.OPENAI_IMAGENET_TEMPLATES)
    assert not any("n014" in t for t in fake.texts)
    want = reference_predictions(fake, imagenet_classes.OPENAI_IMAGENET_TEMPLATES)
    assert 0 < np.mean(want == ev.data.labels) < 1  # imperfect, so a wrong run can differ
    top1 = 100 * np.mean(want == ev.data.labels)
    assert out == pytest.approx({"top1": top1, "top5": 100.0})


def test_api_classifier_matches_evaluator_and_reference(tmp_path):
    root = make_folder(tmp_path / "val")
    ev = ZeroShotEvaluator("imagenet", {"kind": "zeroshot", "root": root, "batch_size": 4})
    fake = NameFake(SYNSETS.values())
    evaluator_top1 = ev.run(fake)["top1"]
    names = list(SYNSETS.values())
    # Encoder.zero_shot_classifier only builds a ZeroShotClassifier: called here on the fake,
    # which has the Encoder methods it uses, so no model needs compiling.
    classifier = api.Encoder.zero_shot_classifier(fake, names)
    assert classifier.templates == list(imagenet_classes.OPENAI_IMAGENET_TEMPLATES)
    images = image_batches(ev.data.image_paths, fake.image_size)(np.arange(5))
    texts_before = len(fake.texts)
    first, second = classifier.classify(images, top_k=2), classifier.classify(images[:2])
    assert len(fake.texts) == texts_before  # the class embeddings are reused, not rebuilt
    want = reference_predictions(fake, imagenet_classes.OPENAI_IMAGENET_TEMPLATES)
    np.testing.assert_array_equal(first.top[:, 0], want)
    assert 100 * np.mean(first.top[:, 0] == ev.data.labels) == pytest.approx(evaluator_top1)
    assert first.top.shape == (5, 2) and first.names[0] == [names[c] for c in first.top[0]]
    np.testing.assert_allclose(first.probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.argmax(first.probs, axis=1), want)
    scores = classifier.scores(images)
    logits = 100.0 * scores
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(first.probs, softmax / softmax.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(second.probs, first.probs[:2], rtol=1e-6)
    seven = api.ZeroShotClassifier(fake, names, "openai7")
    assert len(seven.templates) == 7 and seven.weights.shape == (3, 16)
    with pytest.raises(ValueError, match="neither a template set"):
        api.ZeroShotClassifier(fake, names, "openai81")


@pytest.mark.parametrize(
    "folders, example",
    [
        ({"n01440764": [3], "n99999999": [5]}, "n99999999"),  # an unknown WordNet id
        ({"0": [3], "1": [5], "12": [7]}, "0"),  # numeric ids
        ({"n01440764": [3], "tench_photos": [5]}, "n01440764"),  # ids mixed with names
    ],
)
def test_id_folders_without_names_are_refused(tmp_path, folders, example):
    root = make_folder(tmp_path / "ids", folders)
    pattern = rf"class folders of {re.escape(root)} are named by ids.*{example}.*classnames.txt"
    with pytest.raises(ValueError, match=pattern):
        ZeroShotEvaluator("zs", {"kind": "zeroshot", "root": root})
    (tmp_path / "ids" / "classnames.txt").write_text("".join(f"thing {k}\n" for k in folders))
    data = readers.read_image_folder(root)
    assert data.classnames == [f"thing {k}" for k in sorted(folders)]


def test_names_file_wins_and_templates_are_chosen(tmp_path):
    root = make_folder(tmp_path / "val")
    names = tmp_path / "names.txt"
    names.write_text("fish a\nfish b\nfish c\n")
    data = readers.read_image_folder(root, classnames_file=str(names))
    assert data.classnames == ["fish a", "fish b", "fish c"] and data.templates_from == "openai7"
    (tmp_path / "val" / "classnames.txt").write_text("x\ny\nz\n")
    data = readers.read_image_folder(root)
    assert data.classnames == ["x", "y", "z"] and len(data.templates) == 7
    assert len(readers.read_image_folder(root, templates="openai80").templates) == 80
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of {}.\n")
    assert readers.read_image_folder(root, templates=str(templates)).templates == ["a photo of {}."]
    plain = make_folder(tmp_path / "plain", {"red_car": [1], "blue_car": [2]})
    data = readers.read_image_folder(plain)
    assert data.classnames == ["blue car", "red car"] and data.templates_from == "openai7"


def test_bad_names_and_templates_are_clear_errors(tmp_path):
    root = make_folder(tmp_path / "val")
    with pytest.raises(FileNotFoundError, match="classnames_file.*missing.txt"):
        readers.read_image_folder(root, classnames_file=str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="templates_file.*gone.txt"):
        readers.read_image_folder(root, templates_file=str(tmp_path / "gone.txt"))
    with pytest.raises(ValueError, match="'openai81' is neither a template set.*openai80"):
        ZeroShotEvaluator("zs", {"kind": "zeroshot", "root": root, "templates": "openai81"})
    with pytest.raises(FileNotFoundError, match="templates file.*nope.txt"):
        readers.read_image_folder(root, templates=str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}.\na photo without a slot\n")
    with pytest.raises(ValueError, match=r"bad.txt: template 2 .*exactly one \{\}"):
        readers.read_image_folder(root, templates_file=str(bad))
    with pytest.raises(ValueError, match="both templates="):
        readers.read_image_folder(root, templates_file=str(bad), templates="openai7")
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 names for 3 class folders"):
        readers.read_image_folder(root, classnames_file=str(short))
    flat = tmp_path / "flat"
    os.makedirs(flat)
    save_png(id_image(1), flat / "ILSVRC2012_val_00000001.png")
    with pytest.raises(FileNotFoundError, match="no class subfolders.*synset folders"):
        readers.read_image_folder(str(flat))


def test_real_encoder_classifier(tmp_path):
    """The same tiny HF model as test_api (so a shared compile cache serves it): the classifier's
    scores are the cosine to the mean of each class's unit prompt embeddings."""
    from helpers_tiny import TINY, make_hf_model, save_hf_dir

    encoder = api.load(save_hf_dir(make_hf_model(TINY, seed=11), str(tmp_path)), batch_size=4)
    names = ["red car", "tabby cat", "toilet paper"]
    classifier = encoder.zero_shot_classifier(names, templates="openai7")
    images = np.random.default_rng(3).integers(0, 256, size=(3, 40, 36, 3), dtype=np.uint8)
    prompts = _unit(encoder.embed_texts([t.format(c) for c in names for t in classifier.templates]))
    classes = _unit(prompts.reshape(3, 7, -1).mean(axis=1))
    want = _unit(encoder.embed_images(images)) @ classes.T
    np.testing.assert_allclose(classifier.scores(images), want, atol=1e-5)
    got = classifier.classify(images, top_k=3)
    np.testing.assert_array_equal(got.top, np.argsort(-want, axis=1, kind="stable"))
