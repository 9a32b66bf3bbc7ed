"""Load any captioned image source into one `datasets.DatasetDict` with `image` and `captions`.

Sources: a saved DatasetDict (e.g. from `mmfusion data shapes`), an `imagefolder` with
`metadata.jsonl`, the Karpathy `dataset_coco.json`, or a COCO-format caption JSON; the last two
take the folder their image paths are relative to.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import datasets

from mmfusion.errors import UserError

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def check_source(source: str | Path) -> Path:
    """The path of a data source, or a one-line error when there is nothing there."""
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"data source {source} does not exist: pass a saved data set, an imagefolder or a "
            "COCO / Karpathy JSON file (try `mmfusion data shapes --out DIR`)"
        )
    return path


def load_captioned(source: str | Path, image_root: str | Path | None = None) -> datasets.DatasetDict:
    """Open `source` as a DatasetDict whose rows have at least `image` and `captions` (list[str])."""
    path = check_source(source)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        return _imagefolder(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        root = Path(image_root) if image_root else path.parent
        if isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
            return _karpathy(data, root)
        if isinstance(data, dict) and "annotations" in data:
            return datasets.DatasetDict({"test": coco_split(data, root)})
    raise UserError(
        f"cannot read {source} as captioned images: expected a saved data set folder, a folder "
        "with metadata.jsonl, dataset_coco.json (Karpathy) or a COCO caption JSON"
    )


def _with_images(rows: list[dict]) -> datasets.Dataset:
    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("image", datasets.Image())


def _imagefolder(path: Path) -> datasets.DatasetDict:
    metas = sorted(path.glob("**/metadata.jsonl"))
    if not metas:
        raise UserError(
            f'{path} has no metadata.jsonl: an imagefolder needs one line {{"file_name": ..., "text": ...}} per image'
        )
    splits: dict[str, list[dict]] = defaultdict(list)
    for meta in metas:
        split = meta.parent.name if meta.parent != path else "train"
        split = KARPATHY_SPLITS.get(split, split)
        for line in meta.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (ValueError, KeyError, TypeError):
                continue  # a blank or malformed metadata line: no row
            caps = row.get("captions") or [row.get("text") or ""]
            caps = [c if isinstance(c, str) else str(c) for c in (caps if isinstance(caps, list) else [caps])]
            splits[split].append({"image": str(meta.parent / name), "captions": caps})
    return datasets.DatasetDict({k: _with_images(v) for k, v in splits.items()})


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
