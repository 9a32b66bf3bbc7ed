"""Caption content accuracy on shapes: does a caption name the right objects and the right relation?

n-gram metrics such as CIDEr are blunt here: a caption with the wrong relation or the shapes swapped
shares most of its n-grams with the references and still scores high. This judge reads a caption in
any phrasing the data's templates produce (`mmfusion.data.shapes`), turns it into what it states
(which colour-shape objects, and which one is left of / above which), and compares that with the
scene the image was drawn from. Any colour and shape the data knows reads, so the captions of the
downstream domains ("a red ring above a blue cross", "a single purple seven") are judged alike.
Inverse phrasings state the same fact: "a blue square to the right of a red circle" is right for a
red circle left of a blue square.

A two-object caption counts only when it states the relation: "a red circle and a blue square" (one
of the templates) names the objects but does not say what the scene says about them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmfusion.data.shapes import ALL_COLOURS, ALL_SHAPES, INVERSE, PAIR_TEMPLATES, RELATIONS, SINGLE_TEMPLATES
from mmfusion.evaluation.shapes import proportions

Thing = tuple[str, str]  # (colour, shape)
Fact = tuple[Thing, str, Thing]  # first object, "to the left of" | "above", second object


def normalize(text: str) -> str:
    """Lower case, one space between words and around ':' (the tokenizer may join or split it)."""
    text = re.sub(r"\s*:\s*", " : ", text.lower())
    return " ".join(text.replace(".", " ").split())


def canonical_fact(first: Thing, relation: str, second: Thing) -> Fact:
    """One spelling per fact: "b to the right of a" becomes "a to the left of b", "below" "above"."""
    if relation in ("to the right of", "below"):
        return second, INVERSE[relation], first
    return first, relation, second


_OBJECT = r"(?P<c{i}>[a-z]+) (?P<s{i}>[a-z]+)"
_RELATION = "(?P<rel>" + "|".join(re.escape(r) for r in RELATIONS) + ")"


def _pattern(template: str) -> re.Pattern[str]:
    """A template ("a {b} {inv} a {a}") as a regex whose objects are named in the order they appear."""
    parts = re.split(r"(\{a\}|\{b\}|\{rel\}|\{inv\})", normalize(template))
    out, seen = [], 0
    for part in parts:
        if part in ("{a}", "{b}"):
            seen += 1
            out.append(_OBJECT.format(i=seen))
        elif part in ("{rel}", "{inv}"):
            out.append(_RELATION)
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$")


# the plain captions ("a {a}", "a {a} {rel} a {b}") first, then every template of the data
PATTERNS = [_pattern(t) for t in ("a {a}", "a {a} {rel} a {b}", *SINGLE_TEMPLATES, *PAIR_TEMPLATES)]


@dataclass(frozen=True)
class Statement:
    """What a caption says: the objects it names (sorted) and the relation it states, if any."""

    objects: tuple[Thing, ...]
    fact: Fact | None = None

    @classmethod
    def parse(cls, caption: str) -> Statement | None:
        """The statement of a caption in the data's language; None for anything else."""
        text = normalize(caption)
        for pattern in PATTERNS:
            m = pattern.match(text)
            if m is None:
                continue
            things = [(m[f"c{i}"], m[f"s{i}"]) for i in (1, 2) if f"c{i}" in m.groupdict()]
            if any(c not in ALL_COLOURS or s not in ALL_SHAPES for c, s in things):
                continue
            rel = m.groupdict().get("rel")
            fact = canonical_fact(things[0], rel, things[1]) if rel else None
            return cls(tuple(sorted(things)), fact)
        return None

    @classmethod
    def of_scene(cls, objects: Sequence[dict[str, Any]], relation: str | None) -> Statement:
        """The truth, from a shapes row: `objects[0] relation objects[1]`."""
        things = [(o["colour"], o["shape"]) for o in objects]
        fact = canonical_fact(things[0], relation, things[1]) if relation else None
        return cls(tuple(sorted(things)), fact)


@dataclass(frozen=True)
class CaptionVerdict:
    parsed: bool  # in the data's language at all
    count: bool  # as many objects as the scene
    objects: bool  # the same colour-shape objects
    relation: bool | None  # two-object scenes: the right relation is stated (None for one object)

    @property
    def correct(self) -> bool:
        return self.objects and self.relation is not False


def judge_caption(caption: str, objects: Sequence[dict[str, Any]], relation: str | None) -> CaptionVerdict:
    """Judge one caption against the scene (a shapes row's `objects` and `relation`)."""
    truth = Statement.of_scene(objects, relation or None)
    said = Statement.parse(caption)
    pair = truth.fact is not None
    if said is None:
        return CaptionVerdict(False, False, False, False if pair else None)
    count = len(said.objects) == len(truth.objects)
    right_objects = said.objects == truth.objects
    if pair:
        return CaptionVerdict(True, count, right_objects, said.fact == truth.fact)
    return CaptionVerdict(True, count, right_objects, None)


def caption_content(captions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Content accuracy of captions of shapes rows, per scene kind (one / two objects), with 95% Wilson
    intervals: `accuracy` (objects and relation right), and the parts `parsed`, `count`, `objects`,
    `relation`."""
    verdicts = [judge_caption(c, r["objects"], r["relation"]) for c, r in zip(captions, rows)]
    out: dict[str, dict[str, Any]] = {}
    for kind, n_objects in (("single", 1), ("pair", 2)):
        vs = [v for v, r in zip(verdicts, rows) if len(r["objects"]) == n_objects]
        if not vs:
            continue
        parts = {
            "accuracy": [v.correct for v in vs],
            "parsed": [v.parsed for v in vs],
            "count": [v.count for v in vs],
            "objects": [v.objects for v in vs],
        }
        if n_objects == 2:
            parts["relation"] = [bool(v.relation) for v in vs]
        out[kind] = proportions(parts)
    return out
