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
