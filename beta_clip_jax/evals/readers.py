"""Readers for the benchmarks' own on-disk layouts (docs/evals.md says which protocol each is).

Each reader returns a manifest (paths and texts, no pixels), so a bad path fails fast, before any
compile, with a message naming what was expected where. Images are read later, per batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import string

import numpy as np
from etils import epath

from beta_clip_jax.evals import imagenet_classes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

FGOVD_FILES = {
    "hard": "h_attributes_llava.jsonl",
    "medium": "m_attributes_llava.jsonl",
    "easy": "e_attributes_llava.jsonl",
    "trivial": "shuffle_negatives_llava.jsonl",
}

# Prompt-template sets by name (the zero-shot evaluator's `templates` field): "openai80" is the
# CLIP paper's ImageNet ensemble, "openai7" the 7 of them the CLIP authors' notebook selected
# (beta-CLIP's early evaluator also used 7). DEFAULT_TEMPLATES stays the 7-template set.
TEMPLATE_SETS = {
    "openai80": imagenet_classes.OPENAI_IMAGENET_TEMPLATES,
    "openai7": imagenet_classes.OPENAI_7_TEMPLATES,
}
DEFAULT_TEMPLATES = imagenet_classes.OPENAI_7_TEMPLATES
TEMPLATES_FILE_HINT = "one template per line, each with one {} where the class name goes"
CLASSNAMES_FILE_HINT = "one class name per line, in sorted folder order"
# Where read_image_folder says its class names came from when it used the ImageNet-1k table.
IMAGENET_TABLE = "the ImageNet-1k table (WordNet-id folders)"
_IMAGENET_NAMES = dict(
    zip(imagenet_classes.IMAGENET_WNIDS, imagenet_classes.IMAGENET_CLASSNAMES, strict=True)
)
# Folder names that are ids, not words: a WordNet synset id or a bare number.
_ID_FOLDER = re.compile(r"n\d{8}|\d+")


@dataclasses.dataclass
class RetrievalSet:
    """Image-caption pairs; text_to_image[j] is the image index of captions[j]. `skipped`: the
    records a reader left out ("id: reason: detail"), None for readers that refuse bad data."""

    image_paths: list[str]
    captions: list[str]
    text_to_image: np.ndarray
    skipped: list[str] | None = None

    def first_caption_per_image(self) -> list[str]:
        """One ground-truth caption per image (the first), used by text-conditioned scoring."""
        first: dict[int, str] = {}
        for caption, image in zip(self.captions, self.text_to_image.tolist(), strict=True):
            first.setdefault(image, caption)
        return [first[i] for i in range(len(self.image_paths))]

    def truncated(self, max_images: int | None) -> RetrievalSet:
        """The first max_images images and their captions (for quick runs)."""
        if not max_images or max_images >= len(self.image_paths):
            return self
        keep = self.text_to_image < max_images
        return RetrievalSet(
            self.image_paths[:max_images],
            [c for c, k in zip(self.captions, keep, strict=True) if k],
            self.text_to_image[keep],
            self.skipped,
        )


@dataclasses.dataclass
class BoxItem:
    """One FG-OVD box: texts[0] is the positive, the rest its negatives; box is (x, y, w, h) px."""

    image_path: str
    box: tuple[float, float, float, float]
    texts: list[str]


@dataclasses.dataclass
class ClassificationSet:
    """Zero-shot classification: image paths, integer labels, class names and prompt templates."""

    image_paths: list[str]
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]
    classnames_from: str = ""  # a file path, IMAGENET_TABLE or "folder names"
    templates_from: str = ""  # a file path or a TEMPLATE_SETS name


# Every file access goes through etils epath, so datasets may sit on a bucket (gs://, s3://).
def _exists(path: str) -> bool:
    return epath.Path(path).exists()


def is_dir(path: str) -> bool:
    return epath.Path(path).is_dir()


def _isfile(path: str) -> bool:
    return epath.Path(path).is_file()


def list_dir(path: str) -> list[str]:
    return [p.name for p in epath.Path(path).iterdir()]


def _open_text(path: str):
    return epath.Path(path).open("r", encoding="utf-8")


def _require(path: str, what: str, hint: str = "") -> str:
    if not path or not _exists(path):
        raise FileNotFoundError(
            f"{what}: expected at {path!r}, which does not exist. {hint}".strip()
        )
    return path


def _find_image(folder: str, stem: str, names: set[str] | None = None) -> str | None:
    """folder/stem.<image extension>; `names` (the folder's listing, read once by the caller)
    saves a lookup per extension, which on a bucket is a request each."""
    names = set(list_dir(folder)) if names is None else names
    for ext in IMAGE_EXTENSIONS:
        for cand in (stem + ext, stem + ext.upper()):
            if cand in names:
                return os.path.join(folder, cand)
    return None


def one_to_one(image_paths: list[str], captions: list[str]) -> RetrievalSet:
    """A RetrievalSet where caption j belongs to image j."""
    return RetrievalSet(list(image_paths), list(captions), np.arange(len(captions)))


def read_urban1k(root: str) -> RetrievalSet:
    """Urban1k/image/<k>.jpg + Urban1k/caption/<k>.txt, paired by stem; the caption is line 1."""
    hint = "Get it from the Hugging Face dataset BeichenZhang/Urban1k."
    image_dir = _require(os.path.join(root, "image"), "Urban1k image folder", hint)
    caption_dir = _require(os.path.join(root, "caption"), "Urban1k caption folder", hint)
    images, captions = [], []
    image_names = set(list_dir(image_dir))
    for name in sorted(list_dir(caption_dir)):
        if not name.endswith(".txt"):
            continue
        stem = name[: -len(".txt")]
        image = _find_image(image_dir, stem, image_names)
        if image is None:
            raise FileNotFoundError(f"Urban1k: no image for caption {name} in {image_dir}")
        with _open_text(os.path.join(caption_dir, name)) as f:
            lines = f.read().splitlines()
        captions.append(lines[0].strip() if lines else "")
        images.append(image)
    if not captions:
        raise FileNotFoundError(f"Urban1k: no caption .txt files in {caption_dir}")
    empty = [os.path.basename(p) for p, c in zip(images, captions, strict=True) if not c]
    if empty:  # one known pair may have a blank first line; it caps R@1 below 100
        logging.warning("Urban1k: %d empty first-line captions, e.g. for %s", len(empty), empty[:3])
    return one_to_one(images, captions)


def _sharegpt4v_clean(text: str) -> str:
    """beta-CLIP's SV-1k caption: newlines to spaces, then the training-time caption dedup."""
    from beta_clip_jax.data.hierarchy import dedupe_caption

    return dedupe_caption(text.replace("\n", " "))


def read_sharegpt4v_1k(
    json_path: str, image_root: str, num: int = 1000, caption_mode: str = "beta_clip"
) -> RetrievalSet:
    """The first `num` entries of the ShareGPT4V annotation json; caption = conversations[1].value.

    caption_mode: "beta_clip" (newlines -> spaces + caption dedup), "longclip" (newlines ->
    spaces) or "raw".
    """
    hint = (
        "Expected share-captioner_coco_lcs_sam_1246k_1107_filtered.json (the β-CLIP authors' "
        "filtered file, whose first 1000 entries the released numbers use) or "
        "share-captioner_coco_lcs_sam_1246k_1107.json (HF Lin-Chen/ShareGPT4V)."
    )
    _require(json_path, "ShareGPT4V annotation json", hint)
    _require(image_root, "ShareGPT4V image root (holding sam/images/...)")
    with _open_text(json_path) as f:
        entries = json.load(f)[:num]
    clean = {
        "beta_clip": _sharegpt4v_clean,
        "longclip": lambda t: t.replace("\n", " "),
        "raw": lambda t: t,
    }
    if caption_mode not in clean:
        raise ValueError(f"caption_mode {caption_mode!r} not in {sorted(clean)}")
    images = [os.path.join(image_root, e["image"]) for e in entries]
    captions = [clean[caption_mode](e["conversations"][1]["value"]) for e in entries]
    return one_to_one(images, captions)


def _dci_caption(annotation: dict, caption_mode: str) -> str:
    if caption_mode == "extra":  # FG-CLIP's protocol
        text = annotation["extra_caption"]
    elif caption_mode == "short+extra":  # LoTLIP / FLAIR: pieces re-joined with ". "
        text = annotation.get("short_caption", "") + "\n" + annotation["extra_caption"]
        pieces = [p.strip().rstrip(".").strip() for p in re.split(r"\n|\.\s", text)]
        return ". ".join(p for p in pieces if p)
    else:
        raise ValueError(f"DCI caption_mode {caption_mode!r} not in ['extra', 'short+extra']")
    return " ".join(text.split())


def read_dci(
    root: str, image_root: str | None = None, caption_mode: str = "short+extra"
) -> RetrievalSet:
    """DCI: root/annotations/*.json (all 7,805, every split), photos in image_root (root/photos)."""
    hint = "Expected the densely_captioned_images folder from facebookresearch/DCI (dci.tar.gz)."
    ann_dir = _require(os.path.join(root, "annotations"), "DCI annotations folder", hint)
    image_root = image_root or os.path.join(root, "photos")
    _require(image_root, "DCI photo folder (SA-1B shard sa_000138)")
    images, captions = [], []
    for name in sorted(list_dir(ann_dir)):
        if not name.endswith(".json"):
            continue
        with _open_text(os.path.join(ann_dir, name)) as f:
            annotation = json.load(f)
        images.append(os.path.join(image_root, annotation["image"]))
        captions.append(_dci_caption(annotation, caption_mode))
    if not images:
        raise FileNotFoundError(f"DCI: no annotation .json files in {ann_dir}")
    return one_to_one(images, captions)


COCO_HINT = (
    "Get the 2017 Val images (val2017.zip) and the 2017 Train/Val annotations "
    "(annotations_trainval2017.zip) from cocodataset.org."
)
FLICKR_TOKEN_FILE = "results_20130124.token"
FLICKR_TOKEN_HINT = (
    "results_20130124.token ships with the Flickr30k dataset (in its caption archive; the "
    "photos are the flickr30k-images/ folder)."
)
KARPATHY_HINT = (
    "Expected the Karpathy split file (dataset_coco.json / dataset_flickr30k.json), from "
    "Karpathy's split archive caption_datasets.zip."
)


def read_karpathy(
    json_path: str, image_root: str, split: str = "test", captions_per_image: int = 5
) -> RetrievalSet:
    """COCO / Flickr30k Karpathy json (dataset_coco.json, dataset_flickr30k.json), one split.

    Protocol: the entries whose "split" is `split`, in file order; each image keeps its first
    `captions_per_image` sentences ("raw" text, stripped), fewer if it has fewer (only an image
    with none is refused; text_to_image keeps the pairing right either way). COCO entries carry a
    "filepath" (val2014/...) under image_root, Flickr entries only a filename. The COCO test split
    is the "Karpathy 5k" (5,000 val2014 images), the Flickr30k one the standard 1k test.
    """
    _require(json_path, "Karpathy split json", KARPATHY_HINT)
    _require(image_root, "image root for the Karpathy split")
    with _open_text(json_path) as f:
        entries = [e for e in json.load(f)["images"] if e.get("split") == split]
    if not entries:
        raise ValueError(f"{json_path}: no images with split == {split!r}")
    images, captions, owner = [], [], []
    for i, entry in enumerate(entries):
        images.append(os.path.join(image_root, entry.get("filepath", ""), entry["filename"]))
        sentences = entry["sentences"][:captions_per_image]
        if not sentences:
            raise ValueError(f"{json_path}: image {entry['filename']} has no sentences")
        for s in sentences:
            captions.append(s["raw"].strip())
            owner.append(i)
    return RetrievalSet(images, captions, np.asarray(owner, np.int64))


def _first_n(source: str, image: str, texts: list[str], n: int) -> list[str]:
    """The first n captions of one image, or a ValueError naming the file and the image."""
    if len(texts) < n:
        raise ValueError(
            f"{source}: image {image} has {len(texts)} captions, but this protocol keeps the "
            f"first captions_per_image={n} of every image and refuses images with fewer "
            "(Long-CLIP / FineLIP score with exactly that many captions per image, in order)"
        )
    return [t.strip() for t in texts[:n]]


def _grouped(images: list[str], texts: list[list[str]]) -> RetrievalSet:
    owner = [i for i, group in enumerate(texts) for _ in group]
    return RetrievalSet(images, [t for g in texts for t in g], np.asarray(owner, np.int64))


def read_coco_captions(
    annotation_json: str, image_root: str, captions_per_image: int = 5, subdir: str = "val2017"
) -> RetrievalSet:
    """COCO 2017 captions (annotations/captions_val2017.json), Long-CLIP / FineLIP / FG-CLIP v1.

    Protocol ("COCO 5k" in the long-caption CLIP papers): the file is read the way torchvision's
    CocoCaptions reads it. The images are taken in ascending image-id order (not file order);
    each image's captions are its annotations in file order, of which the first
    `captions_per_image` (5) are kept. Val2017 has 5,000 images with at least 5 captions each,
    so 25,000 captions. An image with fewer is refused, since the reference scorer counts on
    exactly 5 per image. Images are at image_root/<subdir>/<file_name>. Annotations whose
    image_id is not among the images are dropped, as CocoCaptions never sees them. This is not
    the Karpathy 5k test (val2014 images); read_karpathy reads that.
    """
    _require(annotation_json, "COCO caption annotations (captions_val2017.json)", COCO_HINT)
    image_dir = _require(
        os.path.join(image_root, subdir),
        f"COCO image folder ({subdir}/ of the image root)",
        COCO_HINT,
    )
    with _open_text(annotation_json) as f:
        data = json.load(f)
    files = {img["id"]: img["file_name"] for img in data["images"]}
    if not files:
        raise ValueError(f"{annotation_json}: no images")
    texts: dict[int, list[str]] = {i: [] for i in files}
    orphans = 0
    for ann in data["annotations"]:
        if ann["image_id"] in texts:
            texts[ann["image_id"]].append(ann["caption"])
        else:
            orphans += 1
    if orphans:
        logging.warning("%s: %d captions of unknown images dropped", annotation_json, orphans)
    ids = sorted(files)
    return _grouped(
        [os.path.join(image_dir, files[i]) for i in ids],
        [_first_n(annotation_json, files[i], texts[i], captions_per_image) for i in ids],
    )


def _read_flickr_token(token_path: str) -> dict[str, list[str]]:
    """results_20130124.token: image name -> its captions, both in file order."""
    _require(token_path, "Flickr30k caption file (results_20130124.token)", FLICKR_TOKEN_HINT)
    groups: dict[str, list[str]] = {}
    with _open_text(token_path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, tab, caption = line.rstrip("\n").partition("\t")
            image, hash_, _ = key.rpartition("#")
            if not tab or not hash_ or not image:
                raise ValueError(
                    f"{token_path}:{number}: expected '<image>.jpg#<k><TAB><caption>', "
                    f"got {line.strip()[:80]!r}"
                )
            groups.setdefault(image, []).append(caption)
    if not groups:
        raise ValueError(f"{token_path}: no captions")
    return groups


def read_image_list(path: str, split: str = "test") -> list[str]:
    """Image file names: one per line of a text file ("<id>.jpg" or "<id>"), or, for a .json, the
    filenames of a Karpathy split json's `split` entries, in file order."""
    _require(path, "image list (the Karpathy test images)", KARPATHY_HINT)
    if path.endswith(".json"):
        with _open_text(path) as f:
            names = [e["filename"] for e in json.load(f)["images"] if e.get("split") == split]
    else:
        names = [n if os.path.splitext(n)[1] else n + ".jpg" for n in _read_lines(path)]
    if not names:
        raise ValueError(f"{path}: no image names (a .json is read for split == {split!r})")
    return names


def read_flickr_token(
    token_path: str,
    image_root: str,
    captions_per_image: int = 5,
    image_list: list[str] | None = None,
) -> RetrievalSet:
    """Flickr30k from its own caption file, lines "<image>.jpg#<k><TAB><caption>".

    Protocol without image_list (Long-CLIP / FineLIP "Flickr30k"): every image of the file, in
    the order of first appearance, 31,783 images and 158,915 captions, each image with its first
    `captions_per_image` (5) captions in file order. On the real file (5 consecutive lines per
    image) this is what Long-CLIP's every-fifth-line reading gives. That gallery is about 32
    times the standard 1k test, so its recalls are far lower and not comparable with 1k
    numbers. With image_list (e.g. the Karpathy test images): only those images, in the list's
    order, which is the standard 1k protocol. An image with fewer captions than
    captions_per_image is refused (every image has 5 in the real file), as is a listed image
    absent from the file. Images are at image_root/<image> (normally the flickr30k-images/
    folder).
    """
    groups = _read_flickr_token(token_path)
    _require(image_root, "Flickr30k image folder (flickr30k-images/)", FLICKR_TOKEN_HINT)
    names = list(groups) if image_list is None else list(image_list)
    missing = [n for n in names if n not in groups]
    if missing:
        raise ValueError(
            f"{token_path}: {len(missing)} listed images have no captions there, e.g. {missing[:3]}"
        )
    return _grouped(
        [os.path.join(image_root, n) for n in names],
        [_first_n(token_path, n, groups[n], captions_per_image) for n in names],
    )


def read_fgovd(
    root: str, image_root: str, difficulty: str, max_items: int | None = None
) -> list[BoxItem]:
    """One FG-OVD difficulty from FG-CLIP's flattened jsonl files (one annotated box per line).

    Lines have img_path (val2017/... or train2017/... under image_root), bbox [x, y, w, h] in
    original pixels, pos_expression [str] and neg_expression [str, ...].
    """
    if difficulty not in FGOVD_FILES:
        raise ValueError(f"FG-OVD difficulty {difficulty!r} not in {sorted(FGOVD_FILES)}")
    path = os.path.join(root, FGOVD_FILES[difficulty])
    _require(path, f"FG-OVD {difficulty} file", "FG-CLIP ships these under data/fgovd/.")
    _require(image_root, "COCO 2017 image root for FG-OVD (holding val2017/ and train2017/)")
    items = []
    with _open_text(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            texts = [rec["pos_expression"][0]] + list(rec["neg_expression"])
            box = tuple(float(v) for v in rec["bbox"])
            items.append(BoxItem(os.path.join(image_root, rec["img_path"]), box, texts))
            if max_items and len(items) >= max_items:
                break
    return items


def _read_lines(path: str) -> list[str]:
    with _open_text(path) as f:
        return [line.strip() for line in f if line.strip()]


def _placeholders(template: str) -> list[str] | None:
    """The replacement fields of a format string ("" for each {}), None if it does not parse."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return None


def check_templates(templates: list[str], source: str) -> list[str]:
    """`templates` when each has exactly one {} and no other field, else a ValueError naming
    `source` and the template."""
    if not templates:
        raise ValueError(f"{source}: no prompt templates ({TEMPLATES_FILE_HINT})")
    for number, template in enumerate(templates, 1):
        if _placeholders(template) != [""]:
            raise ValueError(
                f"{source}: template {number} {template!r} is not usable: expected exactly one "
                "{} (where the class name goes) and no other braces"
            )
    return list(templates)


def resolve_templates(templates) -> list[str]:
    """Prompt templates from a TEMPLATE_SETS name, a templates file path or a list of strings."""
    if not isinstance(templates, str):
        return check_templates([str(t) for t in templates], "templates")
    if templates in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[templates])
    if _isfile(templates):
        return check_templates(_read_lines(templates), templates)
    if os.sep in templates or templates.endswith(".txt"):
        _require(templates, "templates file", f"({TEMPLATES_FILE_HINT})")
    raise ValueError(
        f"templates {templates!r} is neither a template set ({', '.join(TEMPLATE_SETS)}) nor "
        f"an existing templates file ({TEMPLATES_FILE_HINT})"
    )


def _folder_classnames(
    root: str, dirs: list[str], classnames_file: str | None
) -> tuple[list[str], str]:
    """(class names, where they came from): a names file wins, then the ImageNet-1k table for
    WordNet-id folders, then the folder names; id-like folders with no names file are refused,
    as their prompts ("a photo of a n01440764.") would score near chance without a warning."""
    if classnames_file:
        _require(classnames_file, "zero-shot classnames_file", f"({CLASSNAMES_FILE_HINT})")
    path = classnames_file or os.path.join(root, "classnames.txt")
    if _exists(path):
        names = _read_lines(path)
        if len(names) != len(dirs):
            raise ValueError(
                f"{path}: {len(names)} names for {len(dirs)} class folders ({CLASSNAMES_FILE_HINT})"
            )
        return names, path
    if all(d in _IMAGENET_NAMES for d in dirs):
        return [_IMAGENET_NAMES[d] for d in dirs], IMAGENET_TABLE
    ids = [d for d in dirs if _ID_FOLDER.fullmatch(d)]
    if ids:
        unknown = [d for d in ids if d not in _IMAGENET_NAMES]
        why = "not ImageNet-1k WordNet ids" if unknown else "mixed with other folder names"
        examples = unknown or ids
        raise ValueError(
            f"zero-shot: {len(ids)} of the {len(dirs)} class folders of {root} are named by ids, "
            f"not class names (e.g. {', '.join(examples[:3])}: {why}), so the prompts would "
            f"read 'a photo of a {examples[0]}.'. Put a classnames.txt in {root} "
            f"({CLASSNAMES_FILE_HINT}) or set the evaluator's classnames_file field."
        )
    return [d.replace("_", " ") for d in dirs], "folder names"


def _folder_templates(
    root: str, templates_file: str | None, templates: str | None, imagenet: bool
) -> tuple[list[str], str]:
    """(templates, where they came from): templates (a set name or file) or templates_file, else
    root/templates.txt, else "openai80" for ImageNet-table names and "openai7" otherwise."""
    if templates and templates_file:
        raise ValueError(
            f"zero-shot: both templates={templates!r} and templates_file={templates_file!r} "
            "are set; keep one"
        )
    if templates_file:
        _require(templates_file, "zero-shot templates_file", f"({TEMPLATES_FILE_HINT})")
    choice = templates or templates_file
    if not choice:
        beside = os.path.join(root, "templates.txt")
        choice = beside if _exists(beside) else ("openai80" if imagenet else "openai7")
    return resolve_templates(choice), choice


def read_image_folder(
    root: str,
    classnames_file: str | None = None,
    templates_file: str | None = None,
    templates: str | None = None,
) -> ClassificationSet:
    """Zero-shot layout: root/<class_dir>/*.jpg, class index = sorted order of class_dir.

    Class names: classnames_file (one per line, in sorted-folder order; default
    root/classnames.txt if present); else, when every folder is an ImageNet-1k WordNet id
    (n01440764, ...), the CLIP names of imagenet_classes.py; else the folder names with "_" ->
    " ". Id-like folders (n + 8 digits, or a number) with no names file are a ValueError.
    Templates: `templates` (a TEMPLATE_SETS name or a file path) or templates_file (one per line,
    each with "{}"); default root/templates.txt, else "openai80" when the names came from the
    ImageNet table and "openai7" (DEFAULT_TEMPLATES) otherwise.
    """
    _require(root, "zero-shot image folder (one subfolder per class)")
    dirs = sorted(d for d in list_dir(root) if is_dir(os.path.join(root, d)))
    if not dirs:
        raise FileNotFoundError(
            f"zero-shot: no class subfolders in {root} (expected root/<class>/*.jpg; an ImageNet "
            "val/ must first be sorted into its synset folders, root/n01440764/*.JPEG, ...)"
        )
    classnames, names_from = _folder_classnames(root, dirs, classnames_file)
    prompts, templates_from = _folder_templates(
        root, templates_file, templates, imagenet=names_from == IMAGENET_TABLE
    )
    paths, labels = [], []
    for label, d in enumerate(dirs):
        for name in sorted(list_dir(os.path.join(root, d))):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, d, name))
                labels.append(label)
    if not paths:
        raise FileNotFoundError(f"zero-shot: no images under {root}/<class>/")
    labels = np.asarray(labels, np.int64)
    return ClassificationSet(paths, labels, classnames, prompts, names_from, templates_from)
