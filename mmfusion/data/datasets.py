"""Load any captioned image source into one `datasets.DatasetDict` with `image` and `captions`.

Sources, all read through `datasets`: a saved DatasetDict (e.g. from `mmfusion data shapes`), an
`imagefolder` with `metadata.jsonl`, the Karpathy `dataset_coco.json`, a COCO-format caption JSON, a
parquet / json / jsonl / csv file or a folder of them, or a Hugging Face hub name (`owner/name`). The
image column (an image, or a path relative to the file or to `image_root`) and the caption column (a
string, a list of strings, or Karpathy's list of `{"raw": ...}`) are found by their usual names
(`IMAGE_COLUMNS`, `CAPTION_COLUMNS`) unless named, and become `image` and `captions` (list[str]).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets

from mmfusion.errors import ConfigError, UserError

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
# the columns tried, in order, when data.image_column / data.caption_column are not set
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "file_name", "image_path", "filepath", "path")
CAPTION_COLUMNS = ("captions", "caption", "text", "sentences", "raw", "txt", "prompt", "description")
TABLE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_name(source: str | Path) -> bool:
    """`owner/name` that is no local path: a data set on the Hugging Face hub."""
    text = str(source)
    return not Path(text).exists() and bool(HUB_NAME.match(text)) and Path(text).suffix not in TABLE_FORMATS


def check_source(source: str | Path) -> Path:
    """The path of a data source (a hub name as it is), or a one-line error when there is nothing there."""
    path = Path(source)
    if not path.exists() and not is_hub_name(source):
        raise UserError(
            f"data source {source} does not exist: pass a saved data set, an imagefolder, a COCO / Karpathy "
            "JSON file, a parquet / json / csv file or a hub name owner/name (try `mmfusion data shapes --out DIR`)"
        )
    return path


def load_captioned(
    source: str | Path,
    image_root: str | Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    need_captions: bool = True,
) -> datasets.DatasetDict:
    """Open `source` as a DatasetDict whose rows have at least `image` (or precomputed `tokens`) and
    `captions` (list[str]); `need_captions` False lets a source without captions through (images only)."""
    check_source(source)
    data, base, tabular = _open(source, image_root, caption_column)
    if not tabular:  # the folder kinds made `image` and `captions` themselves
        image_column = caption_column = None
    return datasets.DatasetDict(
        {name: captioned(split, base, image_column, caption_column, need_captions) for name, split in data.items()}
    )


def _open(
    source: str | Path, image_root: str | Path | None, caption_column: str | None
) -> tuple[datasets.DatasetDict, Path | None, bool]:
    """The source's DatasetDict as it is, the folder its relative image paths start from, and whether its
    columns are the source's own (a table, a hub or saved data set) rather than `image` and `captions`."""
    path = Path(source)
    root = Path(image_root) if image_root else None
    if not path.exists():
        return _hub(str(source)), root, True
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path)), root or path, True
    if path.is_dir() and any(path.glob("**/metadata.jsonl")):
        return _imagefolder(path, caption_column), None, False
    if path.is_dir():
        return _tables(sorted(p for p in path.rglob("*") if p.suffix in TABLE_FORMATS), path), root or path, True
    if path.suffix == ".json":
        data = _json_or_none(path)
        if isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
            return _karpathy(data, root or path.parent), None, False
        if isinstance(data, dict) and "annotations" in data:
            return datasets.DatasetDict({"test": coco_split(data, root or path.parent)}), None, False
    if path.suffix in TABLE_FORMATS:
        return _tables([path], path), root or path.parent, True
    raise UserError(
        f"cannot read {source} as captioned images: expected a saved data set folder, a folder with "
        "metadata.jsonl, dataset_coco.json (Karpathy), a COCO caption JSON or parquet / json / jsonl / csv files"
    )


def _json_or_none(path: Path) -> Any:
    """The JSON document in `path`, or None when it is not one (JSON lines, say)."""
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        return None


def _hub(name: str) -> datasets.DatasetDict:
    try:
        data = datasets.load_dataset(name)
    except Exception as err:  # not found, no network, gated: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"cannot load {name} from the Hugging Face hub: {type(err).__name__}: {first} "
            "(nor is there a local path of that name)"
        ) from err
    return data if isinstance(data, datasets.DatasetDict) else datasets.DatasetDict({"train": data})


def _tables(files: list[Path], path: Path) -> datasets.DatasetDict:
    """parquet / json / jsonl / csv files of one kind; a file named after a split (train, validation,
    test, val, ...) is that split, any other is train."""
    kinds = sorted({TABLE_FORMATS[f.suffix] for f in files})
    if not kinds:
        raise UserError(
            f"{path} holds no data: a folder of images needs a metadata.jsonl, one line "
            '{"file_name": ..., "text": ...} per image (or give parquet / json / jsonl / csv files)'
        )
    if len(kinds) != 1:
        raise UserError(f"{path}: expected parquet, json, jsonl or csv files of one kind, found {', '.join(kinds)}")
    splits: dict[str, list[str]] = defaultdict(list)
    for f in files:
        stem = f.stem.split("-")[0]  # train-00000-of-00002.parquet: train
        splits[KARPATHY_SPLITS.get(stem, stem if stem in ("validation", "test") else "train")].append(str(f))
    try:
        return datasets.load_dataset(kinds[0], data_files=dict(splits))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read {path} as a {kinds[0]} table: {first}") from err


def pick_column(columns: list[str], given: str | None, usual: tuple[str, ...], key: str) -> str | None:
    """The column `given` names (ConfigError when the data has none of that name), else the first of
    `usual` that the data has, else None."""
    if given is not None:
        if given not in columns:
            raise ConfigError(key, f"no column {given!r} in the data; its columns: {', '.join(columns)}")
        return given
    return next((c for c in usual if c in columns), None)


def caption_list(cell: Any) -> list[str]:
    """A caption cell as a list of strings: a string, a list of strings, or Karpathy's `{"raw": ...}`
    (or `{"tokens": [...]}`) items; anything else is dropped."""
    if cell is None:
        return []
    if isinstance(cell, (str, dict)):
        cell = [cell]
    out = []
    for c in cell if isinstance(cell, (list, tuple)) else [cell]:
        if isinstance(c, dict):
            c = c.get("raw") or c.get("caption") or c.get("text") or " ".join(c.get("tokens") or [])
        if c is not None:
            out.append(c if isinstance(c, str) else str(c))
    return out


def captioned(
    ds: datasets.Dataset,
    base: Path | None,
    image_column: str | None = None,
    caption_column: str | None = None,
    need_captions: bool = True,
) -> datasets.Dataset:
    """`ds` with an `image` column (images; a path column becomes images, relative paths under `base`)
    and a `captions` column (list[str]); a split already in that form is returned as it is."""
    columns = list(ds.column_names)
    has_tokens = "tokens" in columns
    image = pick_column(columns, image_column, IMAGE_COLUMNS, "data.image_column")
    if image is None and not has_tokens:
        raise ConfigError(
            "data.image_column",
            f"none of the usual image columns ({', '.join(IMAGE_COLUMNS)}) in the data; its columns: "
            f"{', '.join(columns)}: name the column of images or image paths",
        )
    caps = pick_column(columns, caption_column, CAPTION_COLUMNS, "data.caption_column")
    if caps is None and need_captions:
        raise ConfigError(
            "data.caption_column",
            f"none of the usual caption columns ({', '.join(CAPTION_COLUMNS)}) in the data; its columns: "
            f"{', '.join(columns)}: name the column of captions",
        )
    if caps is not None and not _is_caption_list(ds, caps):
        ds = ds.remove_columns(caps).add_column("captions", [caption_list(c) for c in ds[caps]])
        ds = ds.cast_column("captions", datasets.Sequence(datasets.Value("string")))
    elif caps is not None and caps != "captions":
        ds = ds.rename_column(caps, "captions")
    if image is not None and not isinstance(ds.features[image], datasets.Image):
        paths = [_image_path(p, base) for p in ds[image]]
        ds = ds.remove_columns(image).add_column("image", paths).cast_column("image", datasets.Image())
    elif image is not None and image != "image":
        ds = ds.rename_column(image, "image")
    return ds


def _is_caption_list(ds: datasets.Dataset, column: str) -> bool:
    feature = ds.features[column]
    inner = getattr(feature, "feature", None)
    return isinstance(feature, (datasets.Sequence, datasets.List)) and inner == datasets.Value("string")


def _image_path(cell: Any, base: Path | None) -> Any:
    """A path cell as a path under `base` when relative; a dict of bytes / path is left to `datasets`."""
    if isinstance(cell, dict) or cell is None:
        return cell
    path = Path(str(cell))
    return str(path if path.is_absolute() or base is None else base / path)


def _with_images(rows: list[dict]) -> datasets.Dataset:
    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("image", datasets.Image())


def _imagefolder(path: Path, caption_column: str | None = None) -> datasets.DatasetDict:
    """Rows of every `metadata.jsonl` (a sub-folder's is that split); its captions are under
    `caption_column`, else `captions`, `text` or `caption`. A malformed line is no row."""
    metas = sorted(path.glob("**/metadata.jsonl"))
    splits: dict[str, list[dict]] = defaultdict(list)
    named = 0  # rows with the key `caption_column` names
    for meta in metas:
        split = meta.parent.name if meta.parent != path else "train"
        split = KARPATHY_SPLITS.get(split, split)
        for line in meta.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (ValueError, KeyError, TypeError):
                continue  # a blank or malformed metadata line: no row
            if caption_column is not None:
                named += caption_column in row
                caps = caption_list(row.get(caption_column))
            else:
                caps = row.get("captions") or [row.get("text") or row.get("caption") or ""]
                caps = [c if isinstance(c, str) else str(c) for c in (caps if isinstance(caps, list) else [caps])]
            splits[split].append({"image": str(meta.parent / name), "captions": caps})
    if caption_column is not None and not named:
        keys = sorted({k for m in metas for k in _first_keys(m)})
        raise ConfigError(
            "data.caption_column", f"no key {caption_column!r} in {path}'s metadata.jsonl; its keys: {', '.join(keys)}"
        )
    return datasets.DatasetDict({k: _with_images(v) for k, v in splits.items()})


def _first_keys(meta: Path) -> list[str]:
    """The keys of the first readable line of a metadata.jsonl."""
    for line in meta.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            return list(json.loads(line))
        except (ValueError, TypeError):
            continue
    return []


def _karpathy(data: dict, root: Path) -> datasets.DatasetDict:
    splits: dict[str, list[dict]] = defaultdict(list)
    for img in data["images"]:
        file = root / img.get("filepath", "") / img["filename"]
        caps = [s.get("raw", " ".join(s.get("tokens", []))) for s in img["sentences"]]
        image_id = img.get("cocoid", img.get("imgid"))
        splits[KARPATHY_SPLITS.get(img["split"], img["split"])].append(
            {"image": str(file), "captions": caps, "image_id": image_id}
        )
    return datasets.DatasetDict({k: _with_images(v) for k, v in splits.items()})


def coco_split(data: dict, root: Path) -> datasets.Dataset:
    """One split from COCO caption annotations (`images` + `annotations`)."""
    caps: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        caps[ann["image_id"]].append(ann["caption"])
    rows = [
        {"image": str(root / img["file_name"]), "captions": caps[img["id"]], "image_id": img["id"]}
        for img in data["images"]
    ]
    return _with_images(rows)
