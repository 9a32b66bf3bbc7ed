"""The downstream domains: new object kinds drawn exactly in their palette colours, in scenes and captions
like the base set's, with the new words in every caption; the base set itself is unchanged."""

import hashlib

import numpy as np
import pytest

from mmfusion.data.shapes import (
    ALL_COLOURS,
    ALL_SHAPES,
    DIGIT_BITMAPS,
    DOMAINS,
    EXTRA_SHAPES,
    SHAPES,
    Scene,
    ShapeObject,
    build_shapes,
    draw_scene,
    render_example,
)
from mmfusion.evaluation.shapes import _components


def _digest(examples) -> str:
    d = hashlib.sha256()
    for ex in examples:
        d.update(np.asarray(ex["image"]).tobytes())
        d.update("|".join(ex["captions"]).encode())
    return d.hexdigest()


def test_the_base_data_set_is_unchanged():
    """Hashes computed from the renderer before the domains were added: the shapes data set and its seeds
    must render byte for byte as they did."""
    first = {
        0: ("55aaa69cbabf18bd", "a blue circle", 6),
        1: ("73d65c8de4b3dc81", "a red square below a blue square", -1),
        2: ("3bd1b0687049b762", "a green square", 4),
        3: ("8e4fc0b70620b5c1", "a yellow square", 10),
        7: ("ec9199f94e35984b", "a red square below a yellow square", -1),
    }
    for i, (image_hash, text, label) in first.items():
        ex = render_example(0, "train", i)
        assert hashlib.sha256(np.asarray(ex["image"]).tobytes()).hexdigest()[:16] == image_hash
        assert ex["text"] == text and ex["label"] == label
    assert render_example(0, "train", 1)["captions"] == [
        "a red square below a blue square",
        "a blue square above a red square",
        "a picture of a red square below a blue square",
        "a red square placed below a blue square",
        "a red square is below a blue square",
        "an image of a red square below a blue square on white",
    ]
    ex = render_example(0, "test", 5, 64)
    assert hashlib.sha256(np.asarray(ex["image"]).tobytes()).hexdigest()[:16] == "d3b19b8937076284"
    assert _digest(render_example(0, "train", i) for i in range(200)) == (
        "7b01122ab6193250a8515e4d0a526950e64da275ba14980bfaedda720e63f13c"
    )
    assert _digest(render_example(1, "test", i, colours=("purple", "red")) for i in range(200)) == (
        "fde57779f36c203915a7027b5840f5d31fecbfd5aa0d1a43065a615bb2782b8f"
    )
    assert _digest(render_example(0, "validation", i, size=64, pair_fraction=1.0) for i in range(100)) == (
        "f659a08f839ce6ab00f4cfcd623fb9d7e131599de37eb43da7b7b58ef652be30"
    )


def test_names_and_domains():
    assert ALL_SHAPES == (*SHAPES, "cross", "diamond", "ring", "two", "three", "five", "seven")
    assert DOMAINS["new_shapes"] == {
        "colours": ("red", "green", "blue", "yellow"),
        "shapes": ("cross", "diamond", "ring"),
    }
    assert DOMAINS["digits"] == {"colours": ("purple", "orange"), "shapes": ("two", "three", "five", "seven")}
    for spec in DOMAINS.values():
        assert set(spec["colours"]) <= set(ALL_COLOURS) and not set(spec["shapes"]) & set(SHAPES)


@pytest.mark.parametrize("side", [11, 12, 17, 24])
def test_masks_have_their_geometry(side):
    masks = {name: render(side, side) for name, render in EXTRA_SHAPES.items()}
    for name, m in masks.items():
        assert m.dtype == bool and m.shape == (side, side), name
        assert len(_components(m)) == 1, name  # one connected object: a ring or a digit is no two blobs
    c = side // 2
    cross, diamond, ring = masks["cross"], masks["diamond"], masks["ring"]
    assert (
        np.array_equal(cross, cross[::-1]) and np.array_equal(cross, cross[:, ::-1]) and np.array_equal(cross, cross.T)
    )
    assert 0.25 <= cross[0].sum() / side <= 0.42 and cross[c].all()  # arms about a third of the side thick
    assert not cross[0, 0] and not diamond[0, 0] and not diamond[-1, -1]  # corners empty
    assert diamond[0].any() and diamond[:, 0].any() and diamond[c].all()  # corners at the edge midpoints
    assert not ring[c, c] and ring[c, 0] and ring[0, c]  # hollow centre, outer edge on the box
    assert 0.15 <= ring[c, : side // 2].sum() / side <= 0.32  # about a quarter of the side thick
    for digit in DIGIT_BITMAPS:
        cols = np.nonzero(masks[digit].any(0))[0]
        assert masks[digit].any(1).all(), digit  # as tall as the side
        assert abs(len(cols) - 0.6 * side) <= 1 and abs(cols[0] - (side - 1 - cols[-1])) <= 1, digit  # centred
    assert len({m.tobytes() for m in masks.values()}) == len(masks)  # every kind is its own drawing


def test_every_extra_shape_is_drawn_exactly_in_its_palette_colour():
    for k, shape in enumerate(EXTRA_SHAPES):
        for colour in ALL_COLOURS:
            obj = ShapeObject(colour, shape, 15.5 + k % 3, 16.0, 11 + k % 4)
            img = np.asarray(draw_scene(Scene((obj,)), 32))
            white = (img == 255).all(-1)
            ink = (img == np.array(ALL_COLOURS[colour])).all(-1)
            assert (white | ink).all(), (shape, colour)  # no anti-aliasing: no other colour anywhere
            x0, y0, x1, y1 = obj.bbox()
            expect = np.zeros((32, 32), dtype=bool)
            expect[y0 : y1 + 1, x0 : x1 + 1] = EXTRA_SHAPES[shape](obj.size, obj.size)
            assert np.array_equal(ink, expect), (shape, colour)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_domain_rows_carry_their_objects_and_new_words(domain):
    colours, shapes = DOMAINS[domain]["colours"], DOMAINS[domain]["shapes"]
    ds = build_shapes(n=60, n_val=5, n_test=20, colours=colours, shapes=shapes)
    assert {k: len(v) for k, v in ds.items()} == {"train": 60, "validation": 5, "test": 20}
    seen = set()
    for row in ds["train"]:
        img = np.asarray(row["image"])
        assert row["label"] == -1 and len(row["captions"]) == 6 and row["captions"][0] == row["text"]
        drawn = np.zeros(img.shape[:2], dtype=bool)
        for o in row["objects"]:
            assert o["colour"] in colours and o["shape"] in shapes
            assert o["size"] >= 11  # large enough for a digit to be legible at 32 px
            seen.add(o["shape"])
            drawn |= (img == np.array(ALL_COLOURS[o["colour"]])).all(-1)
            for caption in row["captions"]:
                assert f"{o['colour']} {o['shape']}" in caption, caption  # the new word, with its colour
        assert (drawn | (img == 255).all(-1)).all()
        assert not any(s in c.split() for c in row["captions"] for s in SHAPES)  # no base shape word
    assert seen == set(shapes)
    assert len({row["relation"] for row in ds["train"]}) > 1  # singles and pairs in relations
    assert ds["test"][3]["text"] == render_example(0, "test", 3, colours=colours, shapes=shapes)["text"]


def test_domain_scenes_at_64_pixels_keep_their_sizes_and_relations():
    for i in range(100):
        ex = render_example(0, "test", i, 64, colours=("purple", "orange"), shapes=("two", "seven"))
        assert all(o["size"] >= 22 for o in ex["objects"])
        if ex["relation"] in ("to the left of", "above"):
            a, b = ex["objects"]
            assert (a["cx"] < b["cx"]) if ex["relation"] == "to the left of" else (a["cy"] < b["cy"])


def test_unknown_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'; known: circle"):
        render_example(0, "train", 0, shapes=("ring", "hexagon"))
    with pytest.raises(ValueError, match="unknown shape"):
        build_shapes(n=4, shapes=("star",))
    with pytest.raises(ValueError, match="no shapes"):
        render_example(0, "train", 0, shapes=())
