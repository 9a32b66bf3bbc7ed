import io
import json

import pytest
import torch
from PIL import Image

from mmfusion.config import RESIZE_POLICIES, DataConfig, load_config
from mmfusion.errors import ConfigError, UserError
from mmfusion.image_io import RESIZERS, make_grid, open_image, read_image, to_tensor, to_uint8, write_outputs


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(n)]


def test_grid_layout_and_pixels():
    grid = make_grid(_images(6), cols=3, pad=2)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    assert grid.getpixel((2 + 1 * 10, 2 + 1 * 10)) == (40, 0, 0)  # row 1, column 1 is image 4
    assert grid.getpixel((0, 0)) == (128, 128, 128)  # gutter


def test_write_outputs_files_index_and_one_row_per_prompt(tmp_path):
    records = [{"file": f"{k:04d}.png", "prompt": f"p{k // 2}", "seed": k} for k in range(6)]
    write_outputs(tmp_path / "out", _images(6), records, cols=2)
    out = tmp_path / "out"
    assert json.loads((out / "index.json").read_text()) == records
    assert sorted(f.name for f in out.iterdir()) == [*(r["file"] for r in records), "grid.png", "index.json"]
    assert Image.open(out / "grid.png").size == (2 * 10 + 2, 3 * 10 + 2)
    assert Image.open(out / "0003.png").getpixel((0, 0)) == (30, 0, 0)


def _red_left_half() -> Image.Image:
    """40 x 20: the left half red, the right half blue."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    return image


def _expected(size: int, red: slice, blue: slice, rows: slice) -> torch.Tensor:
    """A white size x size square with red columns `red` and blue columns `blue` over `rows`."""
    out = torch.full((3, size, size), 255, dtype=torch.uint8)
    out[:, rows, red] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    out[:, rows, blue] = torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    return out


def test_the_three_resize_policies_on_a_non_square_image():
    image = _red_left_half()
    # squash: both sides to 40, the halves stretched to full height (the aspect ratio lost)
    assert torch.equal(to_uint8(image, 40, "squash"), _expected(40, slice(0, 20), slice(20, 40), slice(0, 40)))
    assert torch.equal(to_uint8(image, 40), to_uint8(image, 40, "squash"))  # today's default
    # center_crop: the short side is 20 already; the centre 20 columns (10..29) of 40 are kept
    assert torch.equal(to_uint8(image, 20, "center_crop"), _expected(20, slice(0, 10), slice(10, 20), slice(0, 20)))
    # pad: the long side is 40 already; the image sits in rows 10..29 between white bands
    assert torch.equal(to_uint8(image, 40, "pad"), _expected(40, slice(0, 20), slice(20, 40), slice(10, 30)))
    # scaled by half: 20 x 10 centred in rows 5..14, the columns either side of the seam blended
    half = to_uint8(image, 20, "pad")
    assert torch.equal(half[:, :5], torch.full((3, 5, 20), 255, dtype=torch.uint8)) and half[:, 15:].min() == 255
    assert half[:, 5:15, :4].tolist() == _expected(20, slice(0, 4), slice(4, 4), slice(0, 10))[:, :10, :4].tolist()
    crop = to_uint8(image, 10, "center_crop")  # 20 x 10, columns 5..14: red, then blue
    assert crop.shape == (3, 10, 10) and crop[0, :, :4].min() == 255 and crop[2, :, 6:].min() == 255
    assert to_tensor(image, 10, "pad").shape == (3, 10, 10)


def test_a_square_image_of_the_size_is_left_as_it_is():
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    assert all(torch.equal(to_uint8(image, 16, p), to_uint8(image, 16, "squash")) for p in RESIZERS)


def test_the_resize_setting_names_the_policies_image_io_has():
    assert tuple(RESIZERS) == RESIZE_POLICIES
    assert DataConfig(resize="pad").resize == "pad"
    with pytest.raises(ConfigError, match=r"^data.resize: must be one of squash, center_crop, pad, got 'crop'$"):
        load_config(None, ["data.resize=crop"])


def test_unreadable_and_oversized_images_fail_with_one_line_naming_them(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGBA", (64, 64), (0, 0, 255, 0)).save(path)
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)  # transparency on white, as training reads
    assert read_image(io.BytesIO(path.read_bytes()), "upload").mode == "RGBA"  # bytes keep their mode
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice the limit
    with pytest.raises(UserError, match=r"^image .*big\.png is too large to open: "):
        open_image(path)
    with pytest.raises(UserError, match="^upload is too large to open: "):
        read_image(io.BytesIO(path.read_bytes()), "upload")
    with pytest.raises(UserError, match=r"^cannot read upload: UnidentifiedImageError; give an image file"):
        read_image(io.BytesIO(b"\x89PNG but not"), "upload")
