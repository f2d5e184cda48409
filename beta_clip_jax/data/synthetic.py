"""Synthetic scenes: coloured shapes with a true caption hierarchy, made on the fly from (seed, i).

The default data of the demo and the tests, needing no files. Each image holds 2-4 objects in
distinct cells of a 3x3 grid (so they never overlap), on a grey, mildly textured background. Every
object has a size (small/large), a colour, a shape and a position; within one scene the colours
are all different and the shapes are all different, so each object has a unique description.

Texts: one sentence per object ("a large red circle in the top left"), the caption = sentences
joined with ". " (as the training texts are, docs/data.md), and phrases like spaCy noun chunks /
spatial spans ("a large red circle", "red circle", "circle in the top left", "large circle"),
grouped by kind so truncation to the first K phrases still covers every object.

Evaluation negatives (FG-OVD style, per box; the positive is the box text "a {size} {colour}
{shape}"; position is left out because the box fixes it). Each difficulty gives exactly
`num_negatives` texts per box:
* hard: 1 attribute changed; a new colour/shape is one absent from the whole scene (size flips).
* medium: 2 attributes changed, same rule.  * easy: all 3 changed.
* binding: 1 attribute (colour, shape or size) replaced by the value of ANOTHER object in the
  scene, e.g. scene {red circle, blue square} -> "a large blue circle". Every word of the negative
  is true of the image, only the binding is wrong: bag-of-words CLIP features fail here.
A pool smaller than `num_negatives` is cycled; repeated negatives do not change the FG-OVD hit rule.
No negative is a true description of its box (some attribute always differs).

Caption negatives (long-caption retrieval): the true caption with one edit each, in the order of
CAPTION_NEGATIVE_KINDS: one object's colour / shape to a value absent from the scene, its size
flipped, its position moved to an empty cell, the colours of two objects swapped, their shapes
swapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = ("small", "large")
# Row-major 3x3 grid cells and how a sentence names them.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
DIFFICULTIES = ("hard", "medium", "easy", "binding")
CAPTION_NEGATIVE_KINDS = ("color", "shape", "size", "position", "swap_colors", "swap_shapes")
SPLITS = {"train": 0, "eval": 1, "test": 2}
_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "there is a {size} {color} {shape} {where}",
    "{where} there is a {size} {color} {shape}",
)
# Radius as a fraction of a grid cell; large is about twice small so size reads at 32 px.
_RADIUS = {"small": 0.22, "large": 0.42}
_ATTRS = ("size", "color", "shape")


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its attributes, centre and radius in pixels, sentence template index."""

    size: str
    color: str
    shape: str
    position: str
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0
    template: int = 0

    def box_text(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    def sentence(self) -> str:
        where = POSITION_PHRASES[self.position]
        return _TEMPLATES[self.template].format(
            size=self.size, color=self.color, shape=self.shape, where=where
        )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with half-extent r (circle: none)."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        a = 0.34 * r
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def object_box(obj: SceneObject) -> tuple[float, float, float, float]:
    """Tight (x, y, w, h) box of the object's geometry, in pixels."""
    if obj.shape == "circle":
        r = obj.radius
        return (obj.cx - r, obj.cy - r, 2 * r, 2 * r)
    xs, ys = zip(*_polygon(obj.shape, obj.cx, obj.cy, obj.radius), strict=True)
    return (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))


def _draw(objects: list[SceneObject], size: int, rng: np.random.Generator) -> np.ndarray:
    """Render the scene: tinted grey background, optional mild texture, flat-coloured shapes."""
    base = rng.integers(95, 166) + rng.integers(-10, 11, size=3)
    yy, xx = np.mgrid[0:size, 0:size]
    texture = int(rng.integers(0, 3))
    if texture == 1:  # low-amplitude noise
        bg = base + rng.normal(0.0, 5.0, size=(size, size, 1))
    elif texture == 2:  # soft diagonal stripes
        period = rng.uniform(6.0, 16.0) * size / 64.0
        bg = base + (8.0 * np.sin(2 * np.pi * (xx + yy) / period))[..., None]
    else:
        bg = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    pil = Image.fromarray(np.clip(bg, 60, 200).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for o in objects:
        fill = COLORS[o.color]
        if o.shape == "circle":
            r = o.radius
            draw.ellipse((o.cx - r, o.cy - r, o.cx + r, o.cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, o.cx, o.cy, o.radius), fill=fill)
    return np.asarray(pil, dtype=np.uint8)


def _pick(rng: np.random.Generator, options, k: int) -> list:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _take(pool: list, k: int, rng: np.random.Generator) -> list:
    """k items of pool in random order without replacement, cycling when the pool is short."""
    if not pool:
        return []
    order = rng.permutation(len(pool))
    return [pool[order[j % len(pool)]] for j in range(k)]


def _with(obj: SceneObject, **changes) -> SceneObject:
    return replace(obj, **changes)


def box_negatives(
    objects: list[SceneObject], index: int, num: int, rng: np.random.Generator
) -> dict[str, list[str]]:
    """Negatives of object `index` at every difficulty (see the module docstring)."""
    obj = objects[index]
    colors_in = {o.color for o in objects}
    shapes_in = {o.shape for o in objects}
    new = {
        "size": [s for s in SIZES if s != obj.size],
        "color": [c for c in COLORS if c not in colors_in],
        "shape": [s for s in SHAPES if s not in shapes_in],
    }
    pools: dict[str, list[SceneObject]] = {"hard": [], "medium": [], "easy": []}
    for mask in range(1, 8):
        changed = [a for bit, a in enumerate(_ATTRS) if mask >> bit & 1]
        level = ("hard", "medium", "easy")[len(changed) - 1]
        combos: list[dict] = [{}]
        for attr in changed:
            combos = [{**c, attr: v} for c in combos for v in new[attr]]
        pools[level].extend(_with(obj, **c) for c in combos)
    binding = []
    for attr in _ATTRS:
        values = sorted({getattr(o, attr) for o in objects} - {getattr(obj, attr)})
        binding.extend(_with(obj, **{attr: v}) for v in values)
    pools["binding"] = binding
    return {d: [o.box_text() for o in _take(pools[d], num, rng)] for d in DIFFICULTIES}


def caption_negatives(objects: list[SceneObject], rng: np.random.Generator) -> list[str]:
    """One edited caption per CAPTION_NEGATIVE_KINDS entry, each false for the scene."""
    colors_in = {o.color for o in objects}
    shapes_in = {o.shape for o in objects}
    free_cells = [p for p in POSITIONS if p not in {o.position for o in objects}]
    out = []
    for kind in CAPTION_NEGATIVE_KINDS:
        edited = list(objects)
        i, j = (int(v) for v in rng.choice(len(objects), size=2, replace=False))
        a, b = objects[i], objects[j]
        if kind == "color":
            edited[i] = _with(a, color=_pick(rng, [c for c in COLORS if c not in colors_in], 1)[0])
        elif kind == "shape":
            edited[i] = _with(a, shape=_pick(rng, [s for s in SHAPES if s not in shapes_in], 1)[0])
        elif kind == "size":
            edited[i] = _with(a, size="small" if a.size == "large" else "large")
        elif kind == "position":
            edited[i] = _with(a, position=_pick(rng, free_cells, 1)[0])
        elif kind == "swap_colors":
            edited[i], edited[j] = _with(a, color=b.color), _with(b, color=a.color)
        else:
            edited[i], edited[j] = _with(a, shape=b.shape), _with(b, shape=a.shape)
        out.append(". ".join(o.sentence() for o in edited))
    return out


class SyntheticScenes:
    """Random-access synthetic dataset; record i depends only on (seed, split, i).

    Module-level and holding only its settings, so it pickles into grain workers.
    """

    def __init__(
        self,
        num_examples: int,
        image_size: int = 64,
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 4,
        split: str = "train",
        num_negatives: int = 5,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        # <= 5 objects leaves at least one unused shape (and colour) for the negatives.
        if not 2 <= min_objects <= max_objects <= len(SHAPES) - 1:
            raise ValueError(
                f"need 2 <= min_objects <= max_objects <= 5, got {min_objects}, {max_objects}"
            )
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.num_examples = int(num_examples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.min_objects = int(min_objects)
        self.max_objects = int(max_objects)
        self.split = split
        self.num_negatives = int(num_negatives)

    def __len__(self) -> int:
        return self.num_examples

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index, stream])

    def scene(self, index: int) -> list[SceneObject]:
        """The objects of record `index` (attributes and geometry), without drawing."""
        rng = self._rng(index, 0)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        colors = _pick(rng, list(COLORS), n)
        shapes = _pick(rng, SHAPES, n)
        cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=n, replace=False))
        order = rng.permutation(n)  # sentence order is not always reading order
        cell = self.image_size / 3.0
        objects = []
        for k in order:
            size = SIZES[int(rng.integers(0, 2))]
            r = _RADIUS[size] * cell
            slack = max(0.0, 0.5 * cell - r - 1.0)  # keep the object inside its cell
            row, col = divmod(cells[k], 3)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            objects.append(
                SceneObject(
                    size=size,
                    color=colors[k],
                    shape=shapes[k],
                    position=POSITIONS[cells[k]],
                    cx=float(cx),
                    cy=float(cy),
                    radius=float(r),
                    template=int(rng.integers(0, len(_TEMPLATES))),
                )
            )
        return objects

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        objects = self.scene(index)
        image = _draw(objects, self.image_size, self._rng(index, 1))
        sentences = [o.sentence() for o in objects]
        phrases = [o.box_text() for o in objects]
        phrases += [f"{o.color} {o.shape}" for o in objects]
        phrases += [f"{o.shape} {POSITION_PHRASES[o.position]}" for o in objects]
        phrases += [f"{o.size} {o.shape}" for o in objects]
        neg_rng = self._rng(index, 2)
        per_box = [
            box_negatives(objects, i, self.num_negatives, neg_rng) for i in range(len(objects))
        ]
        return {
            "image": image,
            "caption": ". ".join(sentences),
            "sentences": sentences,
            "phrases": phrases,
            "boxes": np.asarray([object_box(o) for o in objects], np.float32).reshape(-1, 4),
            "box_texts": [o.box_text() for o in objects],
            "negatives": {d: [neg[d] for neg in per_box] for d in DIFFICULTIES},
            "caption_negatives": caption_negatives(objects, neg_rng),
        }
