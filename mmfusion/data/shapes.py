"""The built-in "shapes" data set: solid circles, squares and triangles on white, with captions.

Deterministic: image i of a split is drawn from its own random generator seeded by (seed, split, i),
so any image can be re-rendered alone and a larger set starts with the images of a smaller one.

Besides the three base shapes, `EXTRA_SHAPES` (cross, diamond, ring and the digits two, three, five,
seven) make downstream `DOMAINS`: data sets in the same scenes and caption language whose words the
base model has never seen, for fine-tuning benchmarks (LoRA on a new domain).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
# colours outside the default palette, for shifted data sets (e.g. LoRA on a new colour)
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (150, 40, 170), "orange": (245, 130, 20)}
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
SHAPES = ("circle", "square", "triangle")
Mask = Callable[[int, int], np.ndarray]  # (w, h) -> boolean (h, w) mask of the object in its w x h box
_EPS = 1e-9  # pixel centres exactly on an outline belong to the shape


def _centred(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres of a w x h box relative to its centre, in units of the half sides (-1 .. 1)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return (xs + 0.5 - w / 2) / (w / 2), (ys + 0.5 - h / 2) / (h / 2)


def cross_mask(w: int, h: int) -> np.ndarray:
    """A plus sign: a horizontal and a vertical bar through the centre, each a third of the side thick
    (symmetric about the centre, so its thickness is rounded to the side's parity)."""
    x, y = _centred(w, h)
    return (np.abs(x) <= 1 / 3 + _EPS) | (np.abs(y) <= 1 / 3 + _EPS)


def diamond_mask(w: int, h: int) -> np.ndarray:
    """A square turned 45 degrees: its corners at the midpoints of the box's edges."""
    x, y = _centred(w, h)
    return np.abs(x) + np.abs(y) <= 1 + _EPS


def ring_mask(w: int, h: int) -> np.ndarray:
    """An annulus filling the box, a quarter of the side thick: the inner radius is half the outer one,
    and the hole is left white."""
    x, y = _centred(w, h)
    r2 = x * x + y * y
    return (r2 <= 1 + _EPS) & (r2 > 0.25 + _EPS)


# 3 x 5 digit bitmaps, drawn as connected strokes (seven-segment style)
DIGIT_BITMAPS: dict[str, tuple[str, ...]] = {
    "two": ("###", "..#", "###", "#..", "###"),
    "three": ("###", "..#", "###", "..#", "###"),
    "five": ("###", "#..", "###", "..#", "###"),
    "seven": ("###", "..#", "..#", "..#", "..#"),
}
DIGIT_WIDTH = 0.6  # a digit is 0.6 x its object's side wide and the full side tall


def glyph(name: str, w: int, h: int) -> np.ndarray:
    """Digit `name`'s bitmap scaled with nearest neighbour to fill a w x h box exactly."""
    cells = np.array([[ch == "#" for ch in row] for row in DIGIT_BITMAPS[name]])
    rows = ((np.arange(h) + 0.5) * cells.shape[0] / h).astype(int)
    cols = ((np.arange(w) + 0.5) * cells.shape[1] / w).astype(int)
    return cells[rows][:, cols]


def digit_width(side: int) -> int:
    """Width in pixels of a digit drawn in a box `side` pixels wide (at least its 3 bitmap columns)."""
    return max(3, round(DIGIT_WIDTH * side))


def _digit(name: str) -> Mask:
    def mask(w: int, h: int) -> np.ndarray:
        out, gw = np.zeros((h, w), dtype=bool), digit_width(w)
        x0 = (w - gw) // 2
        out[:, x0 : x0 + gw] = glyph(name, gw, h)
        return out

    mask.__doc__ = f"The digit {name} centred in the box, {DIGIT_WIDTH} x its width wide and as tall as it."
    return mask


# object kinds beyond SHAPES, each drawn from its mask (name -> mask renderer)
EXTRA_SHAPES: dict[str, Mask] = {
    "cross": cross_mask,
    "diamond": diamond_mask,
    "ring": ring_mask,
    **{name: _digit(name) for name in DIGIT_BITMAPS},
}
ALL_SHAPES = SHAPES + tuple(EXTRA_SHAPES)
# extra shapes are at least this fraction of the image side (11 px at 32), so that digits stay legible
EXTRA_MIN_SIDE = 0.34
# downstream domains: palettes and object kinds the base shapes data never shows
DOMAINS: dict[str, dict[str, tuple[str, ...]]] = {
    "new_shapes": {"colours": ("red", "green", "blue", "yellow"), "shapes": ("cross", "diamond", "ring")},
    "digits": {"colours": ("purple", "orange"), "shapes": ("two", "three", "five", "seven")},
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
SPLIT_OFFSET = {"train": 0, "validation": 1, "test": 2}

SINGLE_TEMPLATES = (
    "a {a} on a white background",
    "a picture of a {a}",
    "there is a {a} in the image",
    "a single {a}",
    "an image of one {a}",
    "a simple drawing of a {a}",
    "one {a} on white",
    "a {a} drawn on a blank background",
)
PAIR_TEMPLATES = (
    "a {b} {inv} a {a}",
    "there is a {a} {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
    "a {a} and a {b}",
    "two shapes : a {a} {rel} a {b}",
    "a {a} placed {rel} a {b}",
    "a {a} is {rel} a {b}",
    "an image of a {a} {rel} a {b} on white",
)
N_CAPTIONS = 6


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    size: int  # bounding-box side, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def bbox(self) -> tuple[int, int, int, int]:
        x0, y0 = round(self.cx - self.size / 2), round(self.cy - self.size / 2)
        return x0, y0, x0 + self.size - 1, y0 + self.size - 1


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]

    def plain_caption(self) -> str:
        if self.relation is None:
            return f"a {self.objects[0].name}"
        return f"a {self.objects[0].name} {self.relation} a {self.objects[1].name}"

    def captions(self, rng: np.random.Generator) -> list[str]:
        """The plain caption first, then distinct captions from randomly chosen templates."""
        a = self.objects[0].name
        if self.relation is None:
            pool = [t.format(a=a) for t in SINGLE_TEMPLATES]
        else:
            b = self.objects[1].name
            pool = [t.format(a=a, b=b, rel=self.relation, inv=INVERSE[self.relation]) for t in PAIR_TEMPLATES]
        picks = rng.choice(len(pool), size=N_CAPTIONS - 1, replace=False)
        return [self.plain_caption()] + [pool[i] for i in sorted(picks)]


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """Render without anti-aliasing: every object pixel has exactly its palette colour."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox()
        fill = ALL_COLOURS[obj.colour]
        if obj.shape in EXTRA_SHAPES:
            mask = EXTRA_SHAPES[obj.shape](x1 - x0 + 1, y1 - y0 + 1)
            img.paste(fill, (x0, y0, x1 + 1, y1 + 1), Image.fromarray(mask.astype(np.uint8) * 255))
        elif obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # upright triangle: apex at the top centre, base along the bottom
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _object(
    rng: np.random.Generator, size: int, lo: float, hi: float, colours: tuple[str, ...], shapes: tuple[str, ...]
) -> tuple[str, str, int]:
    """A random colour, shape and side; an extra shape is raised to `EXTRA_MIN_SIDE` afterwards, so the
    generator draws the same numbers whatever the shapes are."""
    colour = str(rng.choice(list(colours)))
    shape = str(rng.choice(shapes))
    side = int(rng.integers(round(lo * size), round(hi * size) + 1))
    if shape in EXTRA_SHAPES:
        side = max(side, round(EXTRA_MIN_SIDE * size))
    return colour, shape, side


def random_scene(
    rng: np.random.Generator,
    size: int = 32,
    pair_fraction: float = 0.5,
    colours: tuple[str, ...] = tuple(COLOURS),
    shapes: tuple[str, ...] = SHAPES,
) -> Scene:
    """One or two objects at random; a pair is placed so that its relation is unambiguous."""
    if rng.random() >= pair_fraction:
        colour, shape, side = _object(rng, size, 0.34, 0.56, colours, shapes)
        cx = rng.uniform(side / 2 + 1, size - side / 2 - 1)
        cy = rng.uniform(side / 2 + 1, size - side / 2 - 1)
        return Scene((ShapeObject(colour, shape, cx, cy, side),))
    ca, sa, da = _object(rng, size, 0.25, 0.38, colours, shapes)
    cb, sb, db = _object(rng, size, 0.25, 0.38, colours, shapes)
    while (cb, sb) == (ca, sa):  # two identical objects would make the caption ambiguous
        cb, sb, db = _object(rng, size, 0.25, 0.38, colours, shapes)
    relation = str(rng.choice(RELATIONS))
    gap = max(2.0, 0.08 * size)
    # along the relation axis: a first, then b, at least `gap` apart; across it: nearly aligned
    span = da / 2 + gap + db / 2
    lo_a, hi_a = da / 2 + 1, size - 1 - span - db / 2
    pa = rng.uniform(lo_a, hi_a)
    pb = rng.uniform(pa + span, size - 1 - db / 2)
    across = rng.uniform(max(da, db) / 2 + 1, size - max(da, db) / 2 - 1)
    shift = rng.uniform(-0.08, 0.08) * size
    qa, qb = across, float(np.clip(across + shift, db / 2 + 1, size - db / 2 - 1))
    if relation in ("to the right of", "below"):  # a comes after b along the axis
        pa, pb = size - pa, size - pb
    if relation in ("to the left of", "to the right of"):
        a, b = ShapeObject(ca, sa, pa, qa, da), ShapeObject(cb, sb, pb, qb, db)
    else:
        a, b = ShapeObject(ca, sa, qa, pa, da), ShapeObject(cb, sb, qb, pb, db)
    return Scene((a, b), relation)


def class_label(scene: Scene) -> int:
    """Class index colour x shape (0..11) of a one-object scene, -1 for pairs and for objects outside the
    base colours and shapes."""
    if len(scene.objects) != 1 or scene.objects[0].colour not in COLOURS or scene.objects[0].shape not in SHAPES:
        return -1
    obj = scene.objects[0]
    return list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def check_names(colours: tuple[str, ...], shapes: tuple[str, ...]) -> None:
    """Refuse unknown colour or shape names (ValueError, one line naming the known ones)."""
    for kind, names, known in (("colour", colours, ALL_COLOURS), ("shape", shapes, ALL_SHAPES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown[0]!r}; known: {', '.join(known)}")
        if not names:
            raise ValueError(f"no {kind}s to draw from; known: {', '.join(known)}")


def render_example(
    seed: int,
    split: str,
    index: int,
    size: int = 32,
    pair_fraction: float = 0.5,
    colours: tuple[str, ...] = tuple(COLOURS),
    shapes: tuple[str, ...] = SHAPES,
) -> dict:
    """Example `index` of `split`: image, captions and the scene that produced them."""
    check_names(colours, shapes)
    rng = np.random.default_rng([seed, SPLIT_OFFSET[split], index])
    scene = random_scene(rng, size, pair_fraction, tuple(colours), tuple(shapes))
    return {
        "image": draw_scene(scene, size),
        "captions": scene.captions(rng),
        "text": scene.plain_caption(),
        "label": class_label(scene),
        "relation": scene.relation or "",
        "objects": [asdict(o) for o in scene.objects],
    }


def build_shapes(
    n: int = 10000,
    size: int = 32,
    seed: int = 0,
    n_val: int | None = None,
    n_test: int | None = None,
    pair_fraction: float = 0.5,
    colours: tuple[str, ...] = tuple(COLOURS),
    shapes: tuple[str, ...] = SHAPES,
):  # noqa: ANN201
    """A `datasets.DatasetDict` with train / validation / test splits of rendered scenes
    (`colours`: the palette drawn from, e.g. ("purple",) for a shifted set; `shapes`: the object kinds,
    e.g. `DOMAINS["digits"]["shapes"]` for a downstream domain)."""
    import datasets

    if size not in (32, 64):
        raise ValueError(f"shapes are rendered at 32 or 64 pixels, got size={size}")
    check_names(tuple(colours), tuple(shapes))
    held_out = min(1000, n // 20)  # held-out splits stop growing at 1,000 images
    sizes = {
        "train": n,
        "validation": n_val if n_val is not None else max(100, held_out),
        "test": n_test if n_test is not None else max(200, held_out),
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "text": datasets.Value("string"),
            "label": datasets.Value("int32"),
            "relation": datasets.Value("string"),
            "objects": [
                {
                    "colour": datasets.Value("string"),
                    "shape": datasets.Value("string"),
                    "cx": datasets.Value("float32"),
                    "cy": datasets.Value("float32"),
                    "size": datasets.Value("int32"),
                }
            ],
        }
    )
    splits = {}
    for split, count in sizes.items():
        rows = [render_example(seed, split, i, size, pair_fraction, colours, shapes) for i in range(count)]
        splits[split] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(splits)


def export_imagefolder(dataset, out: str | Path) -> Path:  # noqa: ANN001
    """Write each split as PNG files plus `metadata.jsonl` (the `imagefolder` layout)."""
    out = Path(out)
    for split, ds in dataset.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as meta:
            for i, row in enumerate(ds):
                name = f"{i:06d}.png"
                row["image"].save(folder / name)
                meta.write(json.dumps({"file_name": name, "text": row["text"], "captions": row["captions"]}) + "\n")
    return out


def export_coco(split, out_json: str | Path, image_dir: str | Path | None = None) -> Path:  # noqa: ANN001
    """COCO-format caption annotations for one split (images: id / file_name; annotations: one per
    caption). With `image_dir`, the images are written there and each file_name is its path relative
    to the JSON's folder (e.g. "test/000000.png"), so the JSON loads with no --image-root."""
    out_json = Path(out_json)
    images, annotations = [], []
    prefix = Path(os.path.relpath(image_dir, out_json.parent)) if image_dir is not None else Path()
    for i, row in enumerate(split):
        name = f"{i:06d}.png"
        entry = {"id": i, "file_name": (prefix / name).as_posix(), "height": row["image"].height}
        images.append({**entry, "width": row["image"].width})
        for cap in row["captions"]:
            annotations.append({"id": len(annotations), "image_id": i, "caption": cap})
        if image_dir is not None:
            Path(image_dir).mkdir(parents=True, exist_ok=True)
            row["image"].save(Path(image_dir) / name)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": "mmfusion shapes"},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }
    out_json.write_text(json.dumps(coco))
    return out_json
