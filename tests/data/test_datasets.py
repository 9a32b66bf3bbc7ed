"""Every kind of captioned source `load_captioned` reads becomes `image` + `captions` (list[str]), with
its image and caption columns found by their usual names or named in the config."""

import json
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pytest
from PIL import Image

from mmfusion.data.datasets import caption_list, check_source, is_hub_name, load_captioned
from mmfusion.errors import ConfigError, UserError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    """`datasets` writes what it prepares (tables, hub data) under tmp_path, never ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _images(folder: Path, n: int = 4) -> list[str]:
    """n one-colour PNGs in `folder` (image i has COLOURS[i]); their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (6, 4), COLOURS[i]).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def _check(split, captions: list[list[str]]) -> None:
    """`split` has these captions, in order, and image i is COLOURS[i]."""
    assert split["captions"] == captions
    for i, row in enumerate(split):
        assert row["image"].convert("RGB").getpixel((0, 0)) == COLOURS[i]


def test_saved_dataset_dict_with_a_text_column(tmp_path):
    names = _images(tmp_path / "imgs")
    paths = [str(tmp_path / "imgs" / n) for n in names]
    ds = datasets.Dataset.from_dict({"image": paths, "text": ["a", "b", "c", "d"], "label": [0, 1, 2, 3]})
    ds = ds.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    data = load_captioned(tmp_path / "saved")
    assert sorted(data) == ["train", "validation"]
    _check(data["train"], [["a"], ["b"], ["c"], ["d"]])
    assert data["train"]["label"] == [0, 1, 2, 3]  # other columns stay


def test_a_set_already_in_form_is_left_as_it_is(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "imgs" / n) for n in _images(tmp_path / "imgs")]})
    ds = ds.add_column("captions", [["a", "b"], ["c"], [], ["d"]]).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    split = load_captioned(tmp_path / "saved")["train"]
    assert split.column_names == ["image", "captions"] and split.features == ds.features
    _check(split, [["a", "b"], ["c"], [], ["d"]])


def test_imagefolder_with_metadata_and_a_named_caption_key(tmp_path):
    root = tmp_path / "folder"
    names = _images(root / "train") + _images(root / "test", 1)
    lines = [{"file_name": n, "description": f"d{i}", "caption": f"c{i}"} for i, n in enumerate(names[:4])]
    (root / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (root / "test" / "metadata.jsonl").write_text(json.dumps({"file_name": "im0.png", "text": "t0"}) + "\n")
    data = load_captioned(root)
    _check(data["train"], [[f"c{i}"] for i in range(4)])  # `caption`, found by its usual name
    _check(data["test"], [["t0"]])
    _check(load_captioned(root, caption_column="description")["train"], [[f"d{i}"] for i in range(4)])
    with pytest.raises(ConfigError, match=r"^data.caption_column: no key 'alt' in .*its keys: caption, "):
        load_captioned(root, caption_column="alt")


def test_parquet_with_a_path_column_relative_to_the_file(tmp_path):
    names = _images(tmp_path / "d" / "imgs")
    frame = pd.DataFrame({"file_name": [f"imgs/{n}" for n in names], "caption": ["a", "b", "c", "d"]})
    frame.to_parquet(tmp_path / "d" / "captions.parquet")
    data = load_captioned(tmp_path / "d" / "captions.parquet")
    assert list(data) == ["train"]
    _check(data["train"], [["a"], ["b"], ["c"], ["d"]])


def test_csv_with_a_path_column_under_image_root_and_named_columns(tmp_path):
    names = _images(tmp_path / "pictures")
    frame = pd.DataFrame({"picture": names, "alt_text": ["a", "b", "c", "d"], "text": ["x"] * 4})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    data = load_captioned(
        tmp_path / "rows.csv", image_root=tmp_path / "pictures", image_column="picture", caption_column="alt_text"
    )
    _check(data["train"], [["a"], ["b"], ["c"], ["d"]])


def test_a_folder_of_parquet_files_named_after_their_splits(tmp_path):
    names = _images(tmp_path / "d")
    for stem, rows in (("train-00000-of-00001", slice(0, 3)), ("validation", slice(3, 4))):
        frame = pd.DataFrame({"image_path": names[rows], "text": ["a", "b", "c", "d"][rows]})
        frame.to_parquet(tmp_path / "d" / f"{stem}.parquet")
    data = load_captioned(tmp_path / "d")
    assert sorted(data) == ["train", "validation"]
    _check(data["train"], [["a"], ["b"], ["c"]])
    assert data["validation"]["captions"] == [["d"]]


def test_json_and_jsonl_with_lists_of_captions(tmp_path):
    names = _images(tmp_path)
    sentences = [["a", "a2"], ["b"], [], ["d"]]
    rows = [{"path": n, "sentences": s} for n, s in zip(names, sentences)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("rows.json", "rows.jsonl"):
        _check(load_captioned(tmp_path / name)["train"], sentences)
    karpathy_style = [
        {"img": n, "sentences": [{"raw": s, "tokens": s.split()} for s in c]} for n, c in zip(names, sentences)
    ]
    (tmp_path / "k.jsonl").write_text("\n".join(json.dumps(r) for r in karpathy_style) + "\n")
    _check(load_captioned(tmp_path / "k.jsonl")["train"], sentences)


def test_caption_cells_of_every_form():
    assert caption_list("a") == ["a"]
    assert caption_list(["a", "b"]) == ["a", "b"]
    assert caption_list([{"raw": "a", "tokens": ["x"]}, {"tokens": ["b", "c"]}]) == ["a", "b c"]
    assert caption_list(None) == [] and caption_list([None, 3]) == ["3"]


def _karpathy_fixture(root: Path) -> Path:
    """dataset_coco.json in its real layout, one image per split, over COCO-style folders."""
    images = []
    for i, (split, folder) in enumerate(
        [("train", "train2014"), ("val", "val2014"), ("test", "val2014"), ("restval", "val2014")]
    ):
        name = f"COCO_{folder}_{i:012d}.png"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), COLOURS[i]).save(root / folder / name)
        sents = [
            {
                "tokens": ["image", str(i), "caption", str(k)],
                "raw": f"Image {i} caption {k}.",
                "imgid": i,
                "sentid": 10 * i + k,
            }
            for k in range(2)
        ]
        images.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sents],
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": sents,
                "cocoid": 1000 + i,
            }
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_json_in_its_real_layout(tmp_path):
    path = _karpathy_fixture(tmp_path / "coco")
    data = load_captioned(path)
    assert sorted(data) == ["test", "train", "validation"]
    train = data["train"]  # restval trains, as in Karpathy's split
    assert train["captions"] == [[f"Image {i} caption {k}." for k in range(2)] for i in (0, 3)]
    assert train["image_id"] == [1000, 1003]
    assert [im.getpixel((0, 0)) for im in train["image"]] == [COLOURS[0], COLOURS[3]]
    assert data["validation"]["image_id"] == [1001] and data["test"]["image_id"] == [1002]
    # the images elsewhere: data.image_root
    shutil.move(str(tmp_path / "coco"), str(tmp_path / "moved"))
    (tmp_path / "json").mkdir()
    shutil.move(str(tmp_path / "moved" / "dataset_coco.json"), str(tmp_path / "json" / "dataset_coco.json"))
    moved = load_captioned(tmp_path / "json" / "dataset_coco.json", image_root=tmp_path / "moved")
    assert moved["test"][0]["image"].getpixel((0, 0)) == COLOURS[2]


def test_coco_caption_json(tmp_path):
    names = _images(tmp_path / "val2014", 2)
    coco = {
        "images": [{"id": 7, "file_name": names[0]}, {"id": 9, "file_name": names[1]}],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "second"},
            {"id": 2, "image_id": 7, "caption": "first"},
            {"id": 3, "image_id": 7, "caption": "first again"},
        ],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    data = load_captioned(tmp_path / "captions_val2014.json", image_root=tmp_path / "val2014")
    assert list(data) == ["test"]
    _check(data["test"], [["first", "first again"], ["second"]])
    assert data["test"]["image_id"] == [7, 9]


def _hub_cache(cache: Path, repo: str, parquet: Path) -> None:
    """`repo` as `datasets` caches a hub data set it has downloaded: CACHE/owner___name/default/0.0.0/HASH."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    name = repo.split("/")[1]
    builder = Parquet(
        cache_dir=str(cache / "build"),
        dataset_name=name,
        hash="0123abcd",
        data_files=DataFilesDict.from_patterns({"train": [str(parquet)]}),
    )
    builder.download_and_prepare()
    (config,) = (cache / "build" / name).iterdir()
    shutil.move(str(config), str(cache / repo.replace("/", "___") / "default"))


def test_a_hub_name_loads_through_datasets_load_dataset(tmp_path, monkeypatch):
    """A hub name goes to `datasets.load_dataset(name)`; offline (as every test runs), `datasets` serves it
    from its cache, here a cache laid out as a download leaves it, of a hub-style set: images embedded
    as bytes, captions in `text`."""
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: no network
    names = _images(tmp_path / "imgs")
    embedded = [{"bytes": (tmp_path / "imgs" / n).read_bytes(), "path": None} for n in names]
    ds = datasets.Dataset.from_dict({"jpg": embedded, "text": list("abcd")})
    ds.cast_column("jpg", datasets.Image()).to_parquet(str(tmp_path / "hub.parquet"))
    shutil.rmtree(tmp_path / "imgs")  # the bytes are in the parquet file
    cache = tmp_path / "hf_cache"
    _hub_cache(cache, "someone/tiny-captions", tmp_path / "hub.parquet")
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    monkeypatch.chdir(tmp_path)  # no local someone/tiny-captions
    _check(load_captioned("someone/tiny-captions")["train"], [["a"], ["b"], ["c"], ["d"]])
    assert calls == ["someone/tiny-captions"]
    with pytest.raises(UserError, match=r"^cannot load someone/missing from the Hugging Face hub: "):
        load_captioned("someone/missing")


def test_hub_names_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_name("owner/name") and is_hub_name("owner/name.v2")
    for local in ("my_images", "my_images/", "./owner/name", "/abs/path", "a/b/c", "owner/name.parquet"):
        assert not is_hub_name(local), local
        with pytest.raises(UserError, match="does not exist"):
            check_source(local)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not is_hub_name("owner/name")  # a local folder of that name wins


def test_missing_columns_are_one_line_config_errors(tmp_path):
    names = _images(tmp_path)
    pd.DataFrame({"file_name": names, "label": [0, 1, 2, 3]}).to_csv(tmp_path / "nocaps.csv", index=False)
    pd.DataFrame({"name": names, "text": list("abcd")}).to_csv(tmp_path / "noimage.csv", index=False)
    with pytest.raises(ConfigError) as err:
        load_captioned(tmp_path / "nocaps.csv")
    message = str(err.value)
    assert message.startswith("data.caption_column: none of the usual caption columns") and "\n" not in message
    assert message.endswith("its columns: file_name, label: name the column of captions")
    assert load_captioned(tmp_path / "nocaps.csv", need_captions=False)["train"].column_names == ["label", "image"]
    with pytest.raises(
        ConfigError, match=r"^data.image_column: none of the usual image columns .* its columns: name, text"
    ):
        load_captioned(tmp_path / "noimage.csv")
    with pytest.raises(
        ConfigError, match=r"^data.caption_column: no column 'alt' in the data; its columns: name, text$"
    ):
        load_captioned(tmp_path / "noimage.csv", image_column="name", caption_column="alt")
    with pytest.raises(ConfigError, match=r"^data.image_column: no column 'picture' in the data; its columns: "):
        load_captioned(tmp_path / "noimage.csv", image_column="picture")
