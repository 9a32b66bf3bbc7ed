"""The caption content judge: every phrasing the data produces reads as its scene, and a caption that
gets the relation, a colour, a shape or the number of objects wrong scores 0."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from mmfusion.data.shapes import (
    ALL_COLOURS,
    DOMAINS,
    INVERSE,
    PAIR_TEMPLATES,
    RELATIONS,
    SHAPES,
    SINGLE_TEMPLATES,
    random_scene,
    render_example,
)
from mmfusion.evaluation.caption_content import Statement, caption_content, judge_caption


def _scenes(n: int, pair_fraction: float) -> list:
    rng = np.random.default_rng(0)
    return [random_scene(rng, 32, pair_fraction, tuple(ALL_COLOURS)) for _ in range(n)]


def _objects(scene) -> list[dict]:  # noqa: ANN001
    return [asdict(o) for o in scene.objects]


def _every_phrasing(scene) -> list[str]:  # noqa: ANN001
    a = scene.objects[0].name
    if scene.relation is None:
        return [scene.plain_caption(), *(t.format(a=a) for t in SINGLE_TEMPLATES)]
    b, rel = scene.objects[1].name, scene.relation
    return [scene.plain_caption(), *(t.format(a=a, b=b, rel=rel, inv=INVERSE[rel]) for t in PAIR_TEMPLATES)]


@pytest.mark.parametrize("pair_fraction", [0.0, 1.0])
def test_every_template_parses_as_its_scene(pair_fraction):
    for scene in _scenes(200, pair_fraction):
        for caption in _every_phrasing(scene):
            said = Statement.parse(caption)
            assert said is not None, caption
            assert said.objects == Statement.of_scene(_objects(scene), scene.relation).objects, caption
            v = judge_caption(caption, _objects(scene), scene.relation)
            assert v.parsed and v.count and v.objects, caption
            # the one template that states no relation names the right objects but is not right
            assert v.correct == (scene.relation is None or " and a " not in caption), caption


def test_the_data_sets_own_captions_are_right():
    rows = [render_example(3, "test", i) for i in range(200)]
    for r in rows:
        stated = [c for c in r["captions"] if " and a " not in c]
        assert all(judge_caption(c, r["objects"], r["relation"]).correct for c in stated), r["captions"]
    m = caption_content([r["text"] for r in rows], rows)
    assert m["single"]["accuracy"] == 1.0 and m["pair"]["accuracy"] == 1.0
    assert m["single"]["n"] + m["pair"]["n"] == 200


def test_inverse_phrasings_state_the_same_fact():
    objects = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]
    for caption in (
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
        "there is a blue square to the right of a red circle",
        "two shapes: a red circle to the left of a blue square",
        "two shapes : a red circle to the left of a blue square.",
    ):
        assert judge_caption(caption, objects, "to the left of").correct, caption
    assert judge_caption("a red circle above a blue square", objects, "above").correct
    assert judge_caption("a blue square below a red circle", objects, "above").correct
    assert not judge_caption("a blue square above a red circle", objects, "above").correct


def _wrong_relations(rel: str) -> list[str]:
    """Every relation that states another fact about the same two objects in the same order."""
    return [r for r in RELATIONS if r != rel]


def test_a_wrong_relation_colour_shape_or_count_scores_zero():
    rows = [render_example(5, "test", i) for i in range(300)]
    pairs = [r for r in rows if r["relation"]]
    singles = [r for r in rows if not r["relation"]]
    wrong, wrong_rows = [], []
    for r in pairs:
        (a, b), rel = r["objects"], r["relation"]
        name = lambda o: f"{o['colour']} {o['shape']}"  # noqa: E731
        # the relation: every other relation between the same objects, and the right one with the objects swapped
        wrong += [f"a {name(a)} {w} a {name(b)}" for w in _wrong_relations(rel)]
        wrong += [f"a {name(b)} {rel} a {name(a)}"]
        # a colour or a shape changed, relation kept
        other_colour = next(c for c in ALL_COLOURS if c not in (a["colour"], b["colour"]))
        other_shape = next(s for s in SHAPES if s not in (a["shape"], b["shape"]))
        wrong += [
            f"a {other_colour} {a['shape']} {rel} a {name(b)}",
            f"a {name(a)} {rel} a {b['colour']} {other_shape}",
        ]
        wrong += [f"a {name(a)}", f"a {name(b)}"]  # one object of two
        wrong_rows += [r] * (len(RELATIONS) - 1 + 1 + 2 + 2)
    for r in singles:
        (a,) = r["objects"]
        other_colour = next(c for c in ALL_COLOURS if c != a["colour"])
        other_shape = next(s for s in SHAPES if s != a["shape"])
        wrong += [
            f"a {other_colour} {a['shape']}",
            f"a {a['colour']} {other_shape}",
            f"a {a['colour']} {a['shape']} to the left of a {other_colour} {other_shape}",  # two objects of one
            f"a single {a['shape']}",  # no colour: not in the data's language
        ]
        wrong_rows += [r] * 4
    assert len(wrong) == len(wrong_rows)
    m = caption_content(wrong, wrong_rows)
    assert m["single"]["accuracy"] == 0.0 and m["pair"]["accuracy"] == 0.0
    assert m["pair"]["n"] == len(pairs) * 8 and m["single"]["n"] == len(singles) * 4


def test_parts_and_intervals():
    rows = [render_example(7, "test", i) for i in range(40)]
    pairs = [r for r in rows if r["relation"]]
    # every pair captioned with its objects but no relation: objects right, relation and accuracy 0
    caps = [f"a {a['colour']} {a['shape']} and a {b['colour']} {b['shape']}" for a, b in (r["objects"] for r in pairs)]
    m = caption_content(caps, pairs)["pair"]
    assert m["objects"] == 1.0 and m["relation"] == 0.0 and m["accuracy"] == 0.0 and m["parsed"] == 1.0
    lo, hi = m["accuracy_ci95"]
    assert lo == 0.0 and 0.0 < hi < 0.25  # a Wilson interval, not a point
    garbage = caption_content(["to the left of"] * len(pairs), pairs)["pair"]
    assert garbage["parsed"] == 0.0 and garbage["count"] == 0.0


@pytest.mark.parametrize("domain", list(DOMAINS))
@pytest.mark.parametrize("pair_fraction", [0.0, 1.0])
def test_every_template_with_domain_objects_parses_as_its_scene(domain, pair_fraction):
    rng = np.random.default_rng(1)
    colours, shapes = DOMAINS[domain]["colours"], DOMAINS[domain]["shapes"]
    for scene in (random_scene(rng, 32, pair_fraction, colours, shapes) for _ in range(100)):
        truth = Statement.of_scene(_objects(scene), scene.relation)
        for caption in _every_phrasing(scene):
            said = Statement.parse(caption)
            assert said is not None and said.objects == truth.objects, caption
            assert said.fact == (truth.fact if " and a " not in caption else None), caption
            assert judge_caption(caption, _objects(scene), scene.relation).correct == (said.fact == truth.fact)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_domain_captions_are_right_and_a_wrong_digit_or_relation_scores_zero(domain):
    colours, shapes = DOMAINS[domain]["colours"], DOMAINS[domain]["shapes"]
    rows = [render_example(2, "test", i, colours=colours, shapes=shapes) for i in range(200)]
    m = caption_content([r["text"] for r in rows], rows)
    assert m["single"]["accuracy"] == 1.0 and m["pair"]["accuracy"] == 1.0
    for r in rows:
        stated = [c for c in r["captions"] if " and a " not in c]
        assert all(judge_caption(c, r["objects"], r["relation"]).correct for c in stated), r["captions"]
    wrong, wrong_rows = [], []
    for r in rows:
        things = [(o["colour"], o["shape"]) for o in r["objects"]]
        for k, (colour, shape) in enumerate(things):  # every other shape of the domain (a wrong digit) in turn
            for other in (s for s in shapes if s != shape):
                changed = [*things[:k], (colour, other), *things[k + 1 :]]
                words = [f"{c} {s}" for c, s in changed]
                wrong.append(f"a {words[0]}" if len(words) == 1 else f"a {words[0]} {r['relation']} a {words[1]}")
                wrong_rows.append(r)
        if r["relation"]:
            a, b = (f"{c} {s}" for c, s in things)
            wrong += [f"a {a} {rel} a {b}" for rel in RELATIONS if rel != r["relation"]] + [
                f"a {b} {r['relation']} a {a}",
                f"two shapes : a {a} {INVERSE[r['relation']]} a {b}",
            ]
            wrong_rows += [r] * (len(RELATIONS) + 1)
    m = caption_content(wrong, wrong_rows)
    assert m["single"]["accuracy"] == 0.0 and m["pair"]["accuracy"] == 0.0
    assert m["single"]["parsed"] == 1.0 and m["pair"]["parsed"] == 1.0  # read, and judged wrong
    assert m["pair"]["n"] > 300


def test_digit_words_are_objects_not_counts():
    """'two shapes : ...' is a template's opening; 'a purple two' an object."""
    objects = [{"colour": "purple", "shape": "two"}, {"colour": "orange", "shape": "seven"}]
    assert judge_caption("two shapes : a purple two above a orange seven", objects, "above").correct
    assert judge_caption("a orange seven below a purple two", objects, "above").correct
    assert not judge_caption("a purple seven above a orange two", objects, "above").correct
    assert Statement.parse("a purple two") == Statement((("purple", "two"),))
    assert Statement.parse("a purple hexagon") is None
