"""Image files: grids, reading user images and masks with clear errors, writing outputs at once."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmfusion.errors import UserError


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile images into one picture (row-major), with a gray gutter."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (128, 128, 128))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open an image file as RGB, or fail with one line that names the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder: give an image file (PNG or JPEG)")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB") if what == "image" else im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read {what} {path}: {err.__class__.__name__}; give a PNG or JPEG file") from err


def write_outputs(
    out: str | Path,
    images: list[Image.Image],
    records: list[dict[str, Any]],
    scale: int = 1,
    extra: dict[str, Image.Image] | None = None,
    cols: int | None = None,
) -> Path:
    """Write `NNNN.png` per image, `grid.png` and `index.json` into `out`, all or nothing: files go to
    a temporary folder first and are moved into place once every one of them is written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        tmp = Path(tmp)
        for rec, im in zip(records, images):
            im.save(tmp / rec["file"])
        for name, im in (extra or {}).items():
            im.save(tmp / name)
        make_grid(images, cols=cols, scale=scale).save(tmp / "grid.png")
        (tmp / "index.json").write_text(json.dumps(records, indent=2))
        for f in tmp.iterdir():
            shutil.move(str(f), out / f.name)
    return out
