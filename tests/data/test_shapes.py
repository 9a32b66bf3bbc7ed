import json

import numpy as np
import pytest

from mmfusion.data.datasets import load_captioned
from mmfusion.data.shapes import COLOURS, RELATIONS, build_shapes, export_coco, export_imagefolder, render_example

PLAIN_RELATIONS = "|".join(RELATIONS)


def colour_mask(img, colour: str) -> np.ndarray:
    return (np.asarray(img) == np.array(COLOURS[colour])).all(-1)


def test_renderer_is_deterministic():
    a = render_example(7, "train", 123)
    b = render_example(7, "train", 123)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert a["captions"] == b["captions"]
    c = render_example(8, "train", 123)
    d = render_example(7, "test", 123)
    # the seed and the split each change the image
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(d["image"]))


@pytest.mark.parametrize("size", [32, 64])
def test_captions_agree_with_pixels(size):
    """The colours a caption names are in the image, and the relation holds between centroids."""
    for i in range(300):
        ex = render_example(0, "train", i, size=size)
        img, caps, words = ex["image"], ex["captions"], ex["text"].split()
        assert img.size == (size, size)
        assert len(set(caps)) >= 5 and caps[0] == ex["text"]
        white = (np.asarray(img) == 255).all(-1)
        if ex["relation"] == "":
            assert ex["text"] == f"a {words[1]} {words[2]}"
            m = colour_mask(img, words[1])
            assert m.sum() > 0.05 * size * size and (m | white).all()
            continue
        ca, cb = words[1], words[-2]
        assert ex["text"] == f"a {ca} {words[2]} {ex['relation']} a {cb} {words[-1]}"
        assert colour_mask(img, ca).any() and colour_mask(img, cb).any()
        assert (colour_mask(img, ca) | colour_mask(img, cb) | white).all()
        if ca == cb:
            continue
        ya, xa = np.nonzero(colour_mask(img, ca))
        yb, xb = np.nonzero(colour_mask(img, cb))
        dx, dy = xb.mean() - xa.mean(), yb.mean() - ya.mean()  # from a to b
        expect = {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[ex["relation"]]
        across = abs(dy) if "left" in ex["relation"] or "right" in ex["relation"] else abs(dx)
        assert expect > 2 and expect > across, (i, ex["text"])


def test_plain_templates_always_present():
    rels = set()
    for i in range(200):
        ex = render_example(1, "validation", i)
        assert ex["captions"][0] == ex["text"]
        rels.add(ex["relation"])
    assert rels == {"", *RELATIONS}


def test_dataset_splits_and_exports(tmp_path):
    ds = build_shapes(n=40, n_val=10, n_test=12)
    assert {k: len(v) for k, v in ds.items()} == {"train": 40, "validation": 10, "test": 12}
    ds.save_to_disk(tmp_path / "hf")
    again = load_captioned(tmp_path / "hf")
    assert again["test"][3]["captions"] == ds["test"][3]["captions"]
    export_imagefolder(ds, tmp_path / "folder")
    folder = load_captioned(tmp_path / "folder")
    assert len(folder["train"]) == 40
    assert folder["test"][0]["captions"] == ds["test"][0]["captions"]
    assert np.array_equal(np.asarray(folder["test"][0]["image"]), np.asarray(ds["test"][0]["image"]))
    path = export_coco(ds["test"], tmp_path / "coco" / "captions.json", tmp_path / "coco" / "images")
    coco = json.loads(path.read_text())
    assert len(coco["images"]) == 12 and len(coco["annotations"]) == 12 * 6
    assert coco["images"][5]["file_name"] == "images/000005.png"  # relative to the JSON's folder
    loaded = load_captioned(path)["test"]  # so it loads with no image root
    assert loaded[5]["captions"] == ds["test"][5]["captions"]
    assert np.array_equal(np.asarray(loaded[5]["image"]), np.asarray(ds["test"][5]["image"]))


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="32 or 64"):
        build_shapes(n=4, size=48)


def test_run_folder_shapes_are_rendered_again_when_the_settings_change(tmp_path, capsys):
    """OUT/data is reused only while it holds the shapes this config asks for: a run into an existing
    folder with another n or seed (`mmfusion demo --seed 1` into the same --out) gets its own data."""
    import numpy as np

    from mmfusion.config import DataConfig
    from mmfusion.data.datamodule import MMFusionDataModule

    def train_split(**cfg):
        data = MMFusionDataModule(DataConfig(**cfg), 32, tmp_path).load()["train"]
        return len(data), np.asarray(data[0]["image"])

    n, first = train_split(shapes_n=40)
    stamp = (tmp_path / "data" / "dataset_dict.json").stat().st_mtime_ns
    assert n == 40 and train_split(shapes_n=40)[0] == 40
    assert (tmp_path / "data" / "dataset_dict.json").stat().st_mtime_ns == stamp  # reused, not rendered again
    assert "rendering them anew" not in capsys.readouterr().out
    n, other = train_split(shapes_n=40, shapes_seed=5)
    assert n == 40 and not np.array_equal(first, other)
    assert "seed 0" in capsys.readouterr().out
    assert train_split(shapes_n=24, shapes_seed=5)[0] == 24
    (tmp_path / "data" / "mmfusion_shapes.json").unlink()  # a folder from before the settings were recorded
    assert train_split(shapes_n=24, shapes_seed=5)[0] == 24 and "unknown settings" in capsys.readouterr().out
