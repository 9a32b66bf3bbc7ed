"""LightningDataModule over `datasets`: shapes, an imagefolder with captions, or COCO / Karpathy JSON.

Rows that cannot be used (unreadable or truncated image files, empty captions, ...) are skipped and
counted, never fatal; `DataModule.skipped` holds the counts by reason.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmfusion.config import DataConfig
from mmfusion.data.datasets import load_captioned
from mmfusion.tokenizers.image import to_tensor
from mmfusion.tokenizers.text import TextTokenizer, clean_text


class CaptionedImages(Dataset):
    """Image tensor in [-1, 1], one caption (token ids) drawn at random per access, label, skip reason."""

    def __init__(
        self, ds: Any, tokenizer: TextTokenizer | None, image_size: int, max_text_len: int, hflip: bool = False
    ) -> None:
        self.has_tokens = "tokens" in ds.column_names
        if self.has_tokens and "image" in ds.column_names:
            ds = ds.remove_columns("image")  # precomputed tokens: never decode the image again
        self.ds, self.tok, self.size, self.max_len, self.hflip = ds, tokenizer, image_size, max_text_len, hflip
        self.has_label = "label" in ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            row = self.ds[i]
        except Exception as err:  # unreadable / truncated / missing image file
            return {"skip": f"unreadable image ({type(err).__name__})"}
        item: dict[str, Any] = {"label": int(row["label"]) if self.has_label else -1}
        if self.has_tokens:
            item["tokens"] = torch.as_tensor(np.asarray(row["tokens"], dtype=np.float32))
        else:
            try:
                image = row["image"]
                image.load()
                item["image"] = to_tensor(image, self.size)
            except Exception as err:
                return {"skip": f"unreadable image ({type(err).__name__})"}
            if self.hflip and random.random() < 0.5:
                item["image"] = item["image"].flip(-1)
        captions = [c for c in (clean_text(c) for c in row.get("captions") or []) if c]
        if self.tok is not None:
            if not captions:
                return {"skip": "no usable caption"}
            item["caption"] = self.tok.encode(random.choice(captions), self.max_len)
        return item


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack usable items; skipped ones are only counted (`skipped`: reason -> count)."""
    good = [x for x in items if "skip" not in x]
    batch: dict[str, Any] = {"skipped": Counter(x["skip"] for x in items if "skip" in x)}
    if good and "image" in good[0]:
        batch["images"] = torch.stack([x["image"] for x in good])
    if good and "tokens" in good[0]:
        batch["tokens"] = torch.stack([x["tokens"] for x in good])
    batch["captions"] = [x.get("caption", []) for x in good]
    batch["labels"] = [x["label"] for x in good]
    batch["size"] = len(good)
    return batch


class MMFusionDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        run_dir: str | Path,
        tokenizer: TextTokenizer | None = None,
        need_text: bool = True,
    ) -> None:
        super().__init__()
        self.cfg, self.image_size, self.run_dir = cfg, image_size, Path(run_dir)
        self.tokenizer, self.need_text = tokenizer, need_text
        self.data = None

    def load(self) -> Any:
        """The DatasetDict; the shapes set is rendered once into the run folder."""
        if self.data is not None:
            return self.data
        if self.cfg.source == "shapes":
            path = self.run_dir / "data"
            if not (path / "dataset_dict.json").exists():
                from mmfusion.data.shapes import build_shapes

                build_shapes(
                    n=self.cfg.shapes_n,
                    size=self.image_size,
                    seed=self.cfg.shapes_seed,
                    pair_fraction=self.cfg.shapes_pair_fraction,
                ).save_to_disk(str(path))
            self.data = load_captioned(path)
        else:
            self.data = load_captioned(self.cfg.source, self.cfg.image_root)
        return self.data

    def text_tokenizer(self) -> TextTokenizer:
        """The configured tokenizer.json, or a byte-level BPE trained on the training captions."""
        if self.tokenizer is None:
            if self.cfg.tokenizer:
                self.tokenizer = TextTokenizer.from_file(self.cfg.tokenizer, max_len=self.cfg.max_text_len)
            else:
                train = self.load()[self.cfg.train_split]
                texts = (c for caps in train["captions"] for c in caps)
                self.tokenizer = TextTokenizer.train(texts, self.cfg.vocab_size, self.cfg.max_text_len)
        return self.tokenizer

    def dataset(self, split: str) -> CaptionedImages:
        data = self.load()
        if split not in data:
            raise KeyError(f"split {split!r} not in data set (has: {', '.join(data)})")
        tok = self.text_tokenizer() if self.need_text else None
        return CaptionedImages(
            data[split],
            tok,
            self.image_size,
            self.cfg.max_text_len,
            hflip=self.cfg.hflip and split == self.cfg.train_split,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset(self.cfg.train_split),
            batch_size=self.cfg.batch_size,
            shuffle=True,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_items,
            drop_last=True,
            persistent_workers=self.cfg.num_workers > 0,
        )
