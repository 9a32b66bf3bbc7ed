"""Image I/O in one place: PIL images to and from tensors, reading user images and masks with clear
errors, PNG grids, and writing a set of outputs all at once."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmfusion.errors import UserError


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: transparency is composited on white, 16-bit / float images are
    rescaled to 0..255, palette and grayscale images are expanded."""
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def squash(image: Image.Image, size: int) -> Image.Image:
    """Both sides to `size` (bicubic): the whole image, its aspect ratio lost."""
    return image.resize((size, size), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The short side to `size` (bicubic), then the centre `size` x `size` cut out."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """The long side to `size` (bicubic), centred on a white `size` x `size` square."""
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(image, ((size - nw) // 2, (size - nh) // 2))
    return square


# data.resize: how an image becomes the model's square input (mmfusion.config.RESIZE_POLICIES)
RESIZERS = {"squash": squash, "center_crop": center_crop, "pad": pad_to_square}


def to_uint8(image: Image.Image, size: int, resize: str = "squash") -> torch.Tensor:
    """A PIL image -> (3, size, size) uint8 tensor (RGB, made square by the `resize` policy of RESIZERS;
    an image of that size already is left as it is)."""
    img = to_rgb(image)
    if img.size != (size, size):
        img = RESIZERS[resize](img, size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_tensor(image: Image.Image, size: int, resize: str = "squash") -> torch.Tensor:
    """A PIL image -> (3, size, size) float tensor in [-1, 1] (`to_uint8`)."""
    return from_uint8(to_uint8(image, size, resize))


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float in [-1, 1], the range image tokenizers take."""
    return pixels.float() / 127.5 - 1.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB image."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


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


def read_image(source: str | Path | IO[bytes], name: str) -> Image.Image:
    """Decode an image file (a path or open bytes) in its own mode, or fail with one line that names it
    `name`: unreadable bytes, or an image too large to decode safely (PIL's decompression-bomb limit)."""
    try:
        with Image.open(source) as im:
            im.load()
            return im.copy()
    except Image.DecompressionBombError as err:
        raise UserError(f"{name} is too large to open: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(
            f"cannot read {name}: {err.__class__.__name__}; give an image file (PNG, JPEG, WebP, ...)"
        ) from err


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open an image file, or fail with one line that names the file and the problem (`read_image`). An
    "image" is made RGB as training makes it (`to_rgb`: transparency on white); anything else keeps its
    mode."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder: give an image file (PNG or JPEG)")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    image = read_image(path, f"{what} {path}")
    return to_rgb(image) if what == "image" else image


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


def write_generated(
    out: str | Path, images: list[Image.Image], prompts: list[Any], per_prompt: int, seed: int, scale: int = 1
) -> Path:
    """`write_outputs` for the images of `generate`: `per_prompt` images of each prompt in turn, image k
    sampled with seed + k, in a grid of one row per prompt when there are several of each."""
    records = [
        {"file": f"{k:04d}.png", "prompt": prompts[k // per_prompt], "seed": seed + k} for k in range(len(images))
    ]
    cols = per_prompt if per_prompt > 1 and len(prompts) > 1 else None
    return write_outputs(out, images, records, scale=scale, cols=cols)
