"""An analytic checker for generated "shapes" images (GenEval-style, SPEC section 8).

Strict on purpose: it counts objects of plausible size exactly, rejects clutter (coloured pixels
away from the named objects), classifies each object's shape by which corners of its bounding box
are filled (all four: square; the bottom two only: upright triangle; none: circle) together with
its fill ratio, and checks a pair's relation between centroids with a margin.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import asdict, dataclass, field
from itertools import permutations
from typing import Any

import numpy as np

from mmfusion.data.shapes import ALL_COLOURS, COLOURS, RELATIONS, SHAPES, class_names, render_example

_PROMPT = re.compile(
    r"^a (?P<c1>\w+) (?P<s1>\w+)(?: (?P<rel>" + "|".join(RELATIONS) + r") a (?P<c2>\w+) (?P<s2>\w+))?$"
)


@dataclass(frozen=True)
class Prompt:
    objects: tuple[tuple[str, str], ...]  # (colour, shape)
    relation: str | None = None

    @classmethod
    def parse(cls, text: str) -> Prompt:
        """Parse a plain shapes prompt: `a red circle` or `a red circle to the left of a blue square`."""
        m = _PROMPT.match(text.strip().lower())
        if not m or m["c1"] not in ALL_COLOURS or m["s1"] not in SHAPES:
            raise ValueError(f"not a plain shapes prompt: {text!r}")
        if m["rel"] is None:
            return cls(((m["c1"], m["s1"]),))
        if m["c2"] not in ALL_COLOURS or m["s2"] not in SHAPES:
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


def find_blobs(img: np.ndarray, names: list[str] | None = None, min_area_frac: float = 0.02) -> tuple[list[Blob], int]:
    """Objects of plausible size, and the number of stray coloured pixels away from them."""
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
                    classify_shape(pts),
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


def check_image(img: np.ndarray | object, prompt: str | Prompt, max_stray_frac: float = 0.02) -> Verdict:
    """Judge one generated image (H, W, 3 uint8 array or PIL image) against a plain shapes prompt."""
    img = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    p = Prompt.parse(prompt) if isinstance(prompt, str) else prompt
    blobs, stray = find_blobs(img, palette_for(p))
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
