"""The checker is only worth its strictness: ~100% on clean renders, ~0% on wrong prompts and junk."""

import numpy as np
import pytest

from mmfusion.data.shapes import COLOURS, INVERSE, SHAPES, render_example
from mmfusion.evaluation.shapes import Prompt, benchmark_prompts, check_image, summarize, wilson

N = 150


@pytest.mark.parametrize("size", [32, 64])
def test_clean_renders_pass(size):
    ok = [check_image(ex["image"], ex["text"]).correct for ex in (render_example(0, "test", i, size) for i in range(N))]
    assert np.mean(ok) >= 0.99


def test_wrong_prompts_fail():
    flipped, colour, shape = [], [], []
    for i in range(N):
        ex = render_example(0, "test", i)
        w = ex["text"].split()
        if ex["relation"]:
            flipped.append(
                check_image(ex["image"], ex["text"].replace(ex["relation"], INVERSE[ex["relation"]])).correct
            )
        other_colour = [c for c in COLOURS if c != w[1]][i % 3]
        colour.append(check_image(ex["image"], ex["text"].replace(w[1], other_colour, 1)).correct)
        other_shape = [s for s in SHAPES if s != w[2]][i % 2]
        shape.append(check_image(ex["image"], " ".join([*w[:2], other_shape, *w[3:]])).correct)
    assert np.mean(flipped) <= 0.02 and np.mean(colour) <= 0.02 and np.mean(shape) <= 0.02


def test_junk_images_fail():
    rng = np.random.default_rng(0)
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert not check_image(blank, "a red circle").correct
    assert not any(
        check_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "a red circle").correct for _ in range(50)
    )
    scattered = []
    for _ in range(50):  # scattered 4x4 patches of the right colour are no "red square"
        im = blank.copy()
        for _ in range(int(rng.integers(3, 9))):
            y, x = rng.integers(0, 28, 2)
            im[y : y + 4, x : x + 4] = COLOURS["red"]
        scattered.append(check_image(im, "a red square").correct)
    assert np.mean(scattered) <= 0.05


def test_clutter_and_extra_objects_fail():
    ex = render_example(0, "test", 0)
    while ex["relation"]:
        ex = render_example(0, "test", int(np.random.default_rng(len(ex["text"])).integers(1, 99)))
    img = np.asarray(ex["image"]).copy()
    img[0:2, 0:12] = COLOURS["green"]  # a stray stripe of another colour
    v = check_image(img, ex["text"])
    assert not v.correct


def test_prompt_parsing():
    assert Prompt.parse("a red circle") == Prompt((("red", "circle"),))
    p = Prompt.parse("A blue square to the left of a green triangle")
    assert p.objects == (("blue", "square"), ("green", "triangle")) and p.relation == "to the left of"
    assert Prompt.parse("a purple circle").objects == (("purple", "circle"),)  # an extra colour
    with pytest.raises(ValueError):
        Prompt.parse("a pink circle")


def test_extra_colours_are_checked_too():
    exs = [render_example(0, "test", i, colours=("purple", "red")) for i in range(N)]
    assert np.mean([check_image(e["image"], e["text"]).correct for e in exs]) >= 0.99
    purple = [e for e in exs if e["text"].startswith("a purple")]
    wrong = [check_image(e["image"], e["text"].replace("a purple", "a blue", 1)).correct for e in purple]
    assert purple and np.mean(wrong) <= 0.02


def test_summary_and_intervals():
    prompts = benchmark_prompts(12, 12)
    assert len(prompts) == 24 and sum(" of " in p or "above" in p or "below" in p for p in prompts) == 12
    example = render_example(1000, "test", 0)
    assert example["text"] == "a yellow triangle"
    s = summarize([check_image(example["image"], p) for p in prompts], prompts)
    # one yellow triangle against the 12 one-object prompts (4 colours x 3 shapes): right for exactly
    # one prompt, right in colour for the 3 yellow ones, in count for all; shapes are judged on the
    # objects found in the prompt's colours, so only "a yellow triangle" has the shape right
    assert s["single"]["n"] == 12 and s["single"]["accuracy"] == pytest.approx(1 / 12)
    assert s["single"]["colour"] == pytest.approx(3 / 12) and s["single"]["shape"] == pytest.approx(1 / 12)
    assert s["single"]["count"] == 1.0
    # and wrong in count (so wrong) for every two-object prompt
    assert s["pair"]["n"] == 12 and s["pair"]["accuracy"] == 0.0 and s["pair"]["count"] == 0.0
    lo, hi = wilson(45, 50)
    assert lo < 0.9 < hi and 0.75 < lo and hi < 0.97
