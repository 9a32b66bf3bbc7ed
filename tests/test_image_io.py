import json

from PIL import Image

from mmfusion.image_io import make_grid, write_outputs


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
