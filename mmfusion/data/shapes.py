"""The built-in "shapes" data set: solid circles, squares and triangles on white, with captions.

Deterministic: image i of a split is drawn from its own random generator seeded by (seed, split, i),
so any image can be re-rendered alone and a larger set starts with the images of a smaller one.
"""

from __future__ import annotations

import json
import os
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
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # upright triangle: apex at the top centre, base along the bottom
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _object(
    rng: np.random.Generator, size: int, lo: float, hi: float, colours: tuple[str, ...]
) -> tuple[str, str, int]:
    colour = str(rng.choice(list(colours)))
    shape = str(rng.choice(SHAPES))
    side = int(rng.integers(round(lo * size), round(hi * size) + 1))
    return colour, shape, side


def random_scene(
    rng: np.random.Generator, size: int = 32, pair_fraction: float = 0.5, colours: tuple[str, ...] = tuple(COLOURS)
) -> Scene:
    """One or two objects at random; a pair is placed so that its relation is unambiguous."""
    if rng.random() >= pair_fraction:
        colour, shape, side = _object(rng, size, 0.34, 0.56, colours)
        cx = rng.uniform(side / 2 + 1, size - side / 2 - 1)
        cy = rng.uniform(side / 2 + 1, size - side / 2 - 1)
        return Scene((ShapeObject(colour, shape, cx, cy, side),))
    (ca, sa, da), (cb, sb, db) = _object(rng, size, 0.25, 0.38, colours), _object(rng, size, 0.25, 0.38, colours)
    while (cb, sb) == (ca, sa):  # two identical objects would make the caption ambiguous
        cb, sb, db = _object(rng, size, 0.25, 0.38, colours)
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
    """Class index colour x shape (0..11) of a one-object scene, -1 for pairs."""
    if len(scene.objects) != 1 or scene.objects[0].colour not in COLOURS:
        return -1
    obj = scene.objects[0]
    return list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def render_example(
    seed: int,
    split: str,
    index: int,
    size: int = 32,
    pair_fraction: float = 0.5,
    colours: tuple[str, ...] = tuple(COLOURS),
) -> dict:
    """Example `index` of `split`: image, captions and the scene that produced them."""
    unknown = [c for c in colours if c not in ALL_COLOURS]
    if unknown:
        raise ValueError(f"unknown colour {unknown[0]!r}; known: {', '.join(ALL_COLOURS)}")
    rng = np.random.default_rng([seed, SPLIT_OFFSET[split], index])
    scene = random_scene(rng, size, pair_fraction, tuple(colours))
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
):  # noqa: ANN201
    """A `datasets.DatasetDict` with train / validation / test splits of rendered scenes
    (`colours`: the palette drawn from, e.g. ("purple",) for a shifted set)."""
    import datasets

    if size not in (32, 64):
        raise ValueError(f"shapes are rendered at 32 or 64 pixels, got size={size}")
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
        rows = [render_example(seed, split, i, size, pair_fraction, colours) for i in range(count)]
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
