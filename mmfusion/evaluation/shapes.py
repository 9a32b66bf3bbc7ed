"""An analytic checker for generated "shapes" images (GenEval-style, SPEC section 8).

Strict on purpose: it counts objects of plausible size exactly, rejects clutter (coloured pixels
away from the named objects), classifies each object's shape by which corners of its bounding box
are filled (all four: square; the bottom two only: upright triangle; none: circle) together with
its fill ratio, and checks a pair's relation between centroids with a margin.

Prompts that name an extra shape of a downstream domain (cross, diamond, ring, the digits) are
judged the same way, except that each object's shape is found by template matching against every
known shape (`classify_template`); prompts of base shapes only are judged exactly as before.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import permutations
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmfusion.data.shapes import (
    ALL_COLOURS,
    ALL_SHAPES,
    COLOURS,
    DIGIT_BITMAPS,
    DIGIT_WIDTH,
    DOMAINS,
    EXTRA_SHAPES,
    RELATIONS,
    SHAPES,
    class_names,
    glyph,
    render_example,
)

_PROMPT = re.compile(
    r"^a (?P<c1>\w+) (?P<s1>\w+)(?: (?P<rel>" + "|".join(RELATIONS) + r") a (?P<c2>\w+) (?P<s2>\w+))?$"
)


@dataclass(frozen=True)
class Prompt:
    objects: tuple[tuple[str, str], ...]  # (colour, shape)
    relation: str | None = None

    @classmethod
    def parse(cls, text: str) -> Prompt:
        """Parse a plain shapes prompt: `a red circle` or `a red circle to the left of a blue square`
        (any colour of ALL_COLOURS, any shape of ALL_SHAPES)."""
        m = _PROMPT.match(text.strip().lower())
        if not m or m["c1"] not in ALL_COLOURS or m["s1"] not in ALL_SHAPES:
            raise ValueError(f"not a plain shapes prompt: {text!r}")
        if m["rel"] is None:
            return cls(((m["c1"], m["s1"]),))
        if m["c2"] not in ALL_COLOURS or m["s2"] not in ALL_SHAPES:
            raise ValueError(f"not a plain shapes prompt: {text!r}")
        return cls(((m["c1"], m["s1"]), (m["c2"], m["s2"])), m["rel"])


@dataclass
class Blob:
    colour: str
    area: int
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    shape: str


@dataclass
class Verdict:
    count: bool
    colour: bool
    shape: bool
    position: bool | None  # None for one-object prompts
    clean: bool
    blobs: list[Blob] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return self.count and self.colour and self.shape and self.clean and self.position is not False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["correct"] = self.correct
        return d


def palette_for(prompt: Prompt) -> list[str]:
    """The default colours, plus any extra colour (purple, ...) the prompt names."""
    return [*COLOURS, *sorted({c for c, _ in prompt.objects if c not in COLOURS})]


def classify_pixels(img: np.ndarray, names: list[str], max_dist: float = 110.0) -> np.ndarray:
    """(H, W, 3) uint8 -> labels: 0 white, i >= 1 the colour names[i - 1], -1 anything else."""
    palette = np.array([(255, 255, 255), *(ALL_COLOURS[n] for n in names)], dtype=np.float32)
    d = np.linalg.norm(img[:, :, None, :].astype(np.float32) - palette[None, None], axis=-1)
    labels = d.argmin(-1)
    labels[d.min(-1) > max_dist] = -1
    return labels


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of (y, x) coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pts = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pts.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        comps.append(np.array(pts))
    return comps


def classify_shape(pts: np.ndarray) -> str:
    """circle / square / triangle from corner fill of the bounding box and the fill ratio; '?' if none fits."""
    ys, xs = pts[:, 0], pts[:, 1]
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    if not 0.6 <= w / h <= 1.67:
        return "?"
    box = np.zeros((h, w), dtype=bool)
    box[ys - y0, xs - x0] = True
    k = max(1, round(0.2 * min(h, w)))
    corner = {
        "tl": box[:k, :k].mean(),
        "tr": box[:k, -k:].mean(),
        "bl": box[-k:, :k].mean(),
        "br": box[-k:, -k:].mean(),
    }
    filled = {c for c, v in corner.items() if v >= 0.5}
    fill = box.mean()
    if filled == {"tl", "tr", "bl", "br"} and fill >= 0.85:
        return "square"
    if filled == {"bl", "br"} and 0.3 <= fill <= 0.7:
        return "triangle"
    if not filled and 0.6 <= fill <= 0.92:
        return "circle"
    return "?"


@lru_cache(maxsize=4096)
def template(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of `shape` drawn to fill a w x h box exactly, as the data's renderer draws it
    (a digit's glyph fills the box: its tight bounding box is narrower than its object's square)."""
    if shape in EXTRA_SHAPES:
        mask = glyph(shape, w, h) if shape in DIGIT_BITMAPS else EXTRA_SHAPES[shape](w, h)
        mask.flags.writeable = False  # shared by the cache
        return mask
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, w - 1, h - 1), fill=255)
    else:
        draw.polygon([((w - 1) / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    mask = np.asarray(img) > 0
    mask.flags.writeable = False  # shared by the cache
    return mask


def classify_template(pts: np.ndarray, min_iou: float = 0.6, max_aspect_ratio: float = 1.3) -> str:
    """The shape of ALL_SHAPES whose template, drawn at the blob's tight bounding box, overlaps the blob's
    pixels best (IoU); '?' below `min_iou`. A candidate is only considered when the box's width / height
    is within `max_aspect_ratio` of the candidate's own (1 for the square-box shapes, DIGIT_WIDTH for
    digits), so a squashed circle is no digit and a wide digit no ring."""
    ys, xs = pts[:, 0], pts[:, 1]
    y0, x0 = ys.min(), xs.min()
    h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
    box = np.zeros((h, w), dtype=bool)
    box[ys - y0, xs - x0] = True
    best, best_iou = "?", 0.0
    for shape in ALL_SHAPES:
        aspect = DIGIT_WIDTH if shape in DIGIT_BITMAPS else 1.0
        if max(w / h / aspect, aspect * h / w) > max_aspect_ratio:
            continue
        t = template(shape, int(w), int(h))
        iou = (t & box).sum() / (t | box).sum()
        if iou > best_iou:
            best, best_iou = shape, iou
    return best if best_iou >= min_iou else "?"


def find_blobs(
    img: np.ndarray,
    names: list[str] | None = None,
    min_area_frac: float = 0.02,
    classify: Callable[[np.ndarray], str] = classify_shape,
) -> tuple[list[Blob], int]:
    """Objects of plausible size, and the number of stray coloured pixels away from them (`classify`
    names each object's shape from its (y, x) pixel coordinates)."""
    names = names or list(COLOURS)
    labels = classify_pixels(img, names)
    h, w = labels.shape
    blobs, keep = [], np.zeros((h, w), dtype=bool)
    for lab in range(1, len(names) + 1):
        for pts in _components(labels == lab):
            if len(pts) < min_area_frac * h * w:
                continue
            keep[pts[:, 0], pts[:, 1]] = True
            blobs.append(
                Blob(
                    names[lab - 1],
                    len(pts),
                    float(pts[:, 1].mean()),
                    float(pts[:, 0].mean()),
                    (int(pts[:, 1].min()), int(pts[:, 0].min()), int(pts[:, 1].max()), int(pts[:, 0].max())),
                    classify(pts),
                )
            )
    # boundary fringe (one pixel around an object) is not clutter
    near = keep.copy()
    near[1:] |= keep[:-1]
    near[:-1] |= keep[1:]
    near[:, 1:] |= near[:, :-1].copy()
    near[:, :-1] |= near[:, 1:].copy()
    stray = int(((labels != 0) & ~near).sum())
    return blobs, stray


def relation_holds(a: Blob, b: Blob, relation: str, size: int, margin: float = 0.1) -> bool:
    """`a relation b` between centroids: along the relation axis by more than margin * size, and more
    along that axis than across it."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b
    along = {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy) if relation in ("to the left of", "to the right of") else abs(dx)
    return along > margin * size and along > across


EXTRA_MIN_AREA_FRAC = 0.01  # smallest object (fraction of the image) when a prompt names an extra shape


def check_image(
    img: np.ndarray | object, prompt: str | Prompt, max_stray_frac: float = 0.02, *, templates: bool = False
) -> Verdict:
    """Judge one generated image (H, W, 3 uint8 array or PIL image) against a plain shapes prompt.

    A prompt naming a shape outside the base three is judged with shapes classified by
    `classify_template` (and objects counted from `EXTRA_MIN_AREA_FRAC` of the image, for thin strokes).
    A prompt of base shapes only is judged exactly as the base benchmark always judged it, unless
    `templates`: the base classifier takes a ring, or a thick cross, for a circle, so judge a model
    fine-tuned on new shapes with `templates=True` when asking it for base shapes."""
    img = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    p = Prompt.parse(prompt) if isinstance(prompt, str) else prompt
    if not templates and all(s in SHAPES for _, s in p.objects):
        blobs, stray = find_blobs(img, palette_for(p))
    else:
        blobs, stray = find_blobs(img, palette_for(p), EXTRA_MIN_AREA_FRAC, classify_template)
    size = img.shape[0]
    clean = stray <= max_stray_frac * img.shape[0] * img.shape[1]
    count = len(blobs) == len(p.objects)
    want = sorted(c for c, _ in p.objects)
    colour = sorted(b.colour for b in blobs) == want if count else all(any(b.colour == c for b in blobs) for c in want)
    shape, position = False, (None if p.relation is None else False)
    if count:
        for perm in permutations(blobs):
            if all(b.colour == c for b, (c, _) in zip(perm, p.objects)):
                ok_shape = all(b.shape == s for b, (_, s) in zip(perm, p.objects))
                ok_pos = None if p.relation is None else relation_holds(perm[0], perm[1], p.relation, size)
                if ok_shape or not shape:
                    shape = ok_shape
                    position = ok_pos
                if ok_shape and ok_pos is not False:
                    break
    return Verdict(count, colour, shape, position, clean, blobs)


def score(images: list, prompts: list[str]) -> dict[str, float]:
    """Fraction of images judged correct, overall and per criterion."""
    verdicts = [check_image(i, p) for i, p in zip(images, prompts)]
    out = {"accuracy": float(np.mean([v.correct for v in verdicts]))}
    for key in ("count", "colour", "shape", "clean"):
        out[key] = float(np.mean([getattr(v, key) for v in verdicts]))
    pos = [v.position for v in verdicts if v.position is not None]
    if pos:
        out["position"] = float(np.mean(pos))
    return out


def benchmark_prompts(n_single: int = 48, n_pair: int = 48, seed: int = 0) -> list[str]:
    """Plain prompts: each colour x shape equally often, and pairs drawn from the shapes test split."""
    names = class_names()
    single = [f"a {names[i % len(names)]}" for i in range(n_single)]
    pairs, i = [], 0
    while len(pairs) < n_pair:
        ex = render_example(seed + 1000, "test", i)
        if ex["relation"]:
            pairs.append(ex["text"])
        i += 1
    return single + pairs


def domain_prompts(domain: str, n_single: int, n_pair: int, seed: int = 0) -> list[str]:
    """Plain prompts of a downstream domain (`DOMAINS`): each of its colour x shape objects equally often,
    and pairs drawn from the domain's test split scenes (seed + 1000, as `benchmark_prompts`)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    colours, shapes = DOMAINS[domain]["colours"], DOMAINS[domain]["shapes"]
    names = [f"{c} {s}" for c in colours for s in shapes]
    single = [f"a {names[i % len(names)]}" for i in range(n_single)]
    pairs, i = [], 0
    while len(pairs) < n_pair:
        ex = render_example(seed + 1000, "test", i, colours=colours, shapes=shapes)
        if ex["relation"]:
            pairs.append(ex["text"])
        i += 1
    return single + pairs


def summarize(verdicts: list[Verdict], prompts: list[str]) -> dict[str, dict[str, float]]:
    """Accuracy per prompt kind (one object / two objects) and per criterion, with 95% Wilson intervals."""
    out = {}
    for kind, want in (("single", 1), ("pair", 2)):
        vs = [v for v, p in zip(verdicts, prompts) if len(Prompt.parse(p).objects) == want]
        if not vs:
            continue
        rows = {
            "accuracy": [v.correct for v in vs],
            "count": [v.count for v in vs],
            "colour": [v.colour for v in vs],
            "shape": [v.shape for v in vs],
            "clean": [v.clean for v in vs],
        }
        if want == 2:
            rows["position"] = [bool(v.position) for v in vs]
        out[kind] = proportions(rows)
    return out


def proportions(parts: dict[str, list[bool]]) -> dict[str, Any]:
    """Each part's share of True (`n`: how many were judged), with its 95% Wilson interval (`<part>_ci95`)."""
    out: dict[str, Any] = {"n": len(next(iter(parts.values())))}
    for key, values in parts.items():
        out[key] = float(np.mean(values))
        out[f"{key}_ci95"] = list(wilson(sum(values), len(values)))
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
