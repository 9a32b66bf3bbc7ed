"""The data module reads any captioned source with the configured columns and resize policy."""

import datasets
import pandas as pd
import torch
from PIL import Image

from mmfusion.config import DataConfig
from mmfusion.data.datamodule import MMFusionDataModule
from mmfusion.image_io import from_uint8, to_uint8


def test_a_table_source_trains_with_its_columns_and_the_resize_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        image.save(tmp_path / "imgs" / f"{i}.png")
    rows = {"picture": [f"imgs/{i}.png" for i in range(4)], "alt": [f"a red and blue picture {i}" for i in range(4)]}
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    cfg = DataConfig(
        source=str(tmp_path / "train.parquet"),
        image_column="picture",
        caption_column="alt",
        resize="center_crop",
        vocab_size=300,
        batch_size=2,
    )
    dm = MMFusionDataModule(cfg, 20, tmp_path / "run")
    batch = next(iter(dm.train_dataloader()))
    assert batch["size"] == 2 and not batch["skipped"]
    cropped = to_uint8(image, 20, "center_crop")
    assert cropped[:, :, :10].float().mean((1, 2)).tolist() == [255.0, 0.0, 0.0]  # the centre: half red
    assert torch.equal(batch["images"], from_uint8(cropped).expand(2, -1, -1, -1))
    tok = dm.text_tokenizer()
    assert tok.decode(batch["captions"][0, 0, : batch["caption_lengths"][0, 0]].tolist()).startswith("a red and blue")


def test_the_rows_are_decoded_once_for_every_loader_over_a_split(tmp_path, monkeypatch):
    from mmfusion.data import datamodule

    reads = []
    read_all = datamodule.CaptionedImages.read_all
    monkeypatch.setattr(
        datamodule.CaptionedImages, "read_all", lambda self, **kw: reads.append(1) or read_all(self, **kw)
    )
    dm = MMFusionDataModule(DataConfig(source="shapes", shapes_n=40, vocab_size=300, batch_size=4), 32, tmp_path)
    first, second = dm.train_dataloader(), dm.train_dataloader()
    assert first.dataset is second.dataset and len(reads) == 1
    assert torch.equal(next(iter(first))["images"], next(iter(second))["images"])  # the same sampler start
    dm.dataset("train", rows=8)  # another size is another set
    assert len(reads) == 2 and len(dm.dataset("train", rows=8)) == 8 and len(reads) == 2
