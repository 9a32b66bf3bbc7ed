"""LightningDataModule over `datasets`: shapes or any captioned source `load_captioned` reads.

The order of training batches is a pure function of (seed, step): batch k is slice k of a seeded
permutation of the data (a new permutation per epoch), and under DDP each rank takes its share of
that global batch. A resumed run therefore continues exactly where the killed one stopped, and a
2-process run sees the same global batches as a 1-process run.

Rows that cannot be used (unreadable, truncated or missing image files, no usable caption) are
skipped and counted, never fatal; each batch reports its skipped rows (`skipped`: [(row, reason)]).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from mmfusion.config import DataConfig
from mmfusion.data.datasets import load_captioned
from mmfusion.data.shapes import build_shapes
from mmfusion.errors import ConfigError, UserError
from mmfusion.image_io import from_uint8, to_uint8
from mmfusion.tokenizers.text import TextTokenizer, clean_text


class CaptionedImages(Dataset):
    """Row i -> image tensor in [-1, 1] (or precomputed tokens), every usable caption as token ids,
    label and index; or `{"skip": reason}` for a row that cannot be used.

    Training reads a split this way only when it is too large to decode whole (`DecodedRows`). With
    `cache`, each row is decoded and tokenized once and kept in memory (the image as uint8), so that
    later epochs do not decode it again. `resize` is the policy that makes an image square (`data.resize`).
    """

    def __init__(
        self,
        ds: Any,
        tokenizer: TextTokenizer | None,
        image_size: int,
        max_text_len: int,
        cache: bool = False,
        resize: str = "squash",
    ) -> None:
        self.has_tokens = "tokens" in ds.column_names
        if self.has_tokens and "image" in ds.column_names:
            ds = ds.remove_columns("image")  # precomputed tokens: never decode the image again
        self.ds, self.tok, self.size, self.max_len = ds, tokenizer, image_size, max_text_len
        self.has_label, self.resize = "label" in ds.column_names, resize
        self.cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cache is None:
            return self._decoded(self._read(i))
        if i not in self.cache:
            self.cache[i] = self._read(i)
        return self._decoded(self.cache[i])

    def _decoded(self, item: dict[str, Any]) -> dict[str, Any]:
        if "pixels" not in item:
            return item
        out = {k: v for k, v in item.items() if k != "pixels"}
        out["image"] = from_uint8(item["pixels"])
        return out

    def _read(self, i: int) -> dict[str, Any]:
        try:
            row = self.ds[i]
        except Exception as err:  # unreadable / truncated / missing image file
            return {"skip": f"unreadable image ({type(err).__name__})", "index": i}
        return self._item(i, row, self.tok.encode if self.tok is not None else None)

    def _item(self, i: int, row: dict[str, Any], encode: Callable[[str, int], list[int]] | None) -> dict[str, Any]:
        """Row i's item from its columns (`_read`), with `encode` the caption tokenizer."""
        item: dict[str, Any] = {"index": i, "label": int(row["label"]) if self.has_label else -1}
        if self.has_tokens:
            item["tokens"] = torch.as_tensor(np.asarray(row["tokens"], dtype=np.float32))
        else:
            try:
                item["pixels"] = to_uint8(row["image"], self.size, self.resize)
            except Exception as err:
                return {"skip": f"unreadable image ({type(err).__name__})", "index": i}
        if encode is not None:
            texts = [c for c in (clean_text(c) for c in (row.get("captions") or [])) if c]
            if not texts:
                return {"skip": "no usable caption", "index": i}
            item["captions"] = [encode(c, self.max_len) for c in texts]
        return item

    def read_all(self, chunk: int = 1000, progress: bool = False) -> list[dict[str, Any]]:
        """Every row as `_read` gives it, read `chunk` rows at a time (a slice of the data set decodes in
        one call, and each distinct caption is tokenized once); a chunk holding a row that cannot be
        read is read again row by row, so that only that row is skipped."""
        encoded: dict[str, list[int]] = {}

        def encode(text: str, max_len: int) -> list[int]:
            if text not in encoded:
                encoded[text] = self.tok.encode(text, max_len)
            return encoded[text]

        items: list[dict[str, Any]] = []
        bar = tqdm(total=len(self), desc="decoding the training rows", unit="rows", disable=not progress)
        for start in range(0, len(self), chunk):
            stop = min(start + chunk, len(self))
            try:
                columns = self.ds[start:stop]
            except Exception:  # a bad row in the chunk
                items += [self._read(i) for i in range(start, stop)]
            else:
                rows = ({k: v[j] for k, v in columns.items()} for j in range(stop - start))
                tok = encode if self.tok is not None else None
                items += [self._item(start + j, row, tok) for j, row in enumerate(rows)]
            bar.update(stop - start)
        bar.close()
        return items


def caption_tensors(captions: list[list[list[int]]]) -> dict[str, torch.Tensor]:
    """Each row's captions (token id lists) as tensors: `captions` (rows, K, L) padded with 0,
    `caption_lengths` (rows, K) and `caption_counts` (rows,), K and L the most in any row."""
    counts = [len(caps) for caps in captions]
    k = max(counts, default=1)
    flat = [c for caps in captions for c in caps]
    width = max((len(c) for c in flat), default=0)
    ids = torch.zeros(len(captions) * k, width, dtype=torch.long)
    lengths = torch.zeros(len(captions) * k, dtype=torch.long)
    if width:  # every caption into its (row, j) slot in one copy
        slots = torch.tensor([i * k + j for i, n in enumerate(counts) for j in range(n)])
        ids[slots] = torch.tensor([c + [0] * (width - len(c)) for c in flat], dtype=torch.long)
        lengths[slots] = torch.tensor([len(c) for c in flat], dtype=torch.long)
    return {
        "captions": ids.view(len(captions), k, width),
        "caption_lengths": lengths.view(len(captions), k),
        "caption_counts": torch.tensor(counts, dtype=torch.long),
    }


def pick_captions(batch: dict[str, Any], generators: list[torch.Generator]) -> list[list[int]]:
    """One caption of each row, drawn uniformly with the row's generator."""
    # on the CPU, where the generators draw: Lightning may have moved the batch to a GPU
    ids, lengths = batch["captions"].cpu(), batch["caption_lengths"].cpu().tolist()
    counts = batch["caption_counts"].tolist()
    picked = []
    for i, (n, g) in enumerate(zip(counts, generators)):
        j = int(torch.randint(n, (1,), generator=g))
        picked.append(ids[i, j, : lengths[i][j]].tolist())
    return picked


def collate_items(items: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """Stack usable items; skipped ones are only reported (`skipped`: [(row index, reason)]). Captions,
    labels and row indices become tensors (`caption_tensors`): Lightning moves a tensor to the device
    in one call, a list item by item. A batch a data set made whole (`DecodedRows`) passes through."""
    if isinstance(items, dict):
        return items
    good = [x for x in items if "skip" not in x]
    batch: dict[str, Any] = {"skipped": [(x["index"], x["skip"]) for x in items if "skip" in x]}
    if good and "image" in good[0]:
        batch["images"] = torch.stack([x["image"] for x in good])
    if good and "tokens" in good[0]:
        batch["tokens"] = torch.stack([x["tokens"] for x in good])
    batch.update(caption_tensors([x.get("captions", [[]]) for x in good]))
    batch["labels"] = torch.tensor([x["label"] for x in good], dtype=torch.long)
    batch["index"] = torch.tensor([x["index"] for x in good], dtype=torch.long)
    batch["size"] = len(good)
    return batch


class DecodedRows(Dataset):
    """A split decoded once into tensors: images as uint8 (or precomputed tokens), captions as token
    ids (`caption_tensors`), labels; rows that cannot be used are kept only as their reasons. A batch
    of rows is a handful of indexing operations (`__getitems__`), the same batch `collate_items` makes
    of `CaptionedImages` reads."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        good = [x for x in items if "skip" not in x]
        self.skip = {x["index"]: x["skip"] for x in items if "skip" in x}
        self.row = torch.full((len(items),), -1, dtype=torch.long)  # data set row -> place here, -1: skipped
        self.row[torch.tensor([x["index"] for x in good], dtype=torch.long)] = torch.arange(len(good))
        self.images = torch.stack([x["pixels"] for x in good]) if good and "pixels" in good[0] else None
        self.tokens = torch.stack([x["tokens"] for x in good]) if good and "tokens" in good[0] else None
        captions = caption_tensors([x.get("captions", [[]]) for x in good])
        captions["captions"] = captions["captions"].int()  # half the memory; ids are picked as Python ints
        self.captions = captions
        self.labels = torch.tensor([x["label"] for x in good], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.row)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        rows = self.row[torch.tensor(indices, dtype=torch.long)]
        good = rows >= 0
        batch: dict[str, Any] = {"skipped": [(i, self.skip[i]) for i in indices if i in self.skip]}
        at = rows[good]
        if self.images is not None:
            batch["images"] = from_uint8(self.images[at])
        if self.tokens is not None:
            batch["tokens"] = self.tokens[at]
        batch.update({k: v[at] for k, v in self.captions.items()})
        batch["labels"] = self.labels[at]
        batch["index"] = torch.tensor(indices, dtype=torch.long)[good]
        batch["size"] = len(at)
        return batch

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])


class StepBatchSampler(Sampler[list[int]]):
    """Batches of indices as a pure function of the step: batch k of rank r is the r-th share of
    slice k of permutation(seed, epoch = k // steps_per_epoch).

    Iteration starts at `start_step` and never goes back: a second pass (Lightning starting a new
    "epoch") continues where the first one stopped. `len` is the run's nominal total, so a resumed
    run, which Lightning counts from its restored batch position, ends its epoch where the
    uninterrupted run would.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        total_steps: int = 10**9,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.n, self.batch, self.seed = n, batch_size, seed
        self.start, self.total, self.world, self.rank = start_step, total_steps, world_size, rank
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise UserError(
                f"the training split has {n} usable rows, fewer than one global batch "
                f"({self.global_batch}): lower data.batch_size (or data.global_batch_size)"
            )
        self.steps_per_epoch = n // self.global_batch

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        chunk = perm[k * self.global_batch : (k + 1) * self.global_batch]
        return chunk[self.rank * self.batch : (self.rank + 1) * self.batch].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            step = self.start
            self.start += 1
            yield self.indices(step)

    def __len__(self) -> int:
        return self.total


class MMFusionDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        run_dir: str | Path,
        tokenizer: TextTokenizer | None = None,
        need_text: bool = True,
        seed: int = 0,
        total_steps: int = 10**9,
    ) -> None:
        super().__init__()
        self.cfg, self.image_size, self.run_dir = cfg, image_size, Path(run_dir)
        self.tokenizer, self.need_text = tokenizer, need_text
        self.seed, self.total_steps = seed, total_steps
        self.data = None
        self._datasets: dict[tuple[str, int | None], CaptionedImages | DecodedRows] = {}

    def load(self) -> Any:
        """The DatasetDict; the shapes set is rendered once into the run folder."""
        if self.data is not None:
            return self.data
        c = self.cfg
        if c.source == "shapes":
            self.data = load_captioned(self._render_shapes())
        else:
            self.data = load_captioned(c.source, c.image_root, c.image_column, c.caption_column, self.need_text)
        return self.data

    def _render_shapes(self) -> Path:
        """RUN/data: the shapes set this config asks for, rendered once and reused while the settings it
        was rendered with (recorded beside it) are the same; rendered anew when they are not."""
        import shutil

        path, c = self.run_dir / "data", self.cfg
        wanted = {
            "n": c.shapes_n,
            "size": self.image_size,
            "seed": c.shapes_seed,
            "pair_fraction": c.shapes_pair_fraction,
        }
        record = path / "mmfusion_shapes.json"
        if (path / "dataset_dict.json").exists():
            made = json.loads(record.read_text()) if record.exists() else None
            if made == wanted:
                return path
            was = ", ".join(f"{k} {v}" for k, v in made.items()) if made else "unknown settings"
            now = ", ".join(f"{k} {v}" for k, v in wanted.items())
            print(f"{path} holds shapes rendered with {was}; this run asks for {now}: rendering them anew")
            shutil.rmtree(path, ignore_errors=True)
        # rendered beside the destination and moved into place whole, with its record: processes started
        # together (torchrun) may each render, and each finds either nothing or a complete set
        tmp = path.parent / f".data-{os.getpid()}"
        build_shapes(**wanted).save_to_disk(str(tmp))  # the recorded settings are build_shapes' arguments
        (tmp / record.name).write_text(json.dumps(wanted))
        try:
            tmp.rename(path)
        except OSError:  # another process moved its identical set into place first
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def text_tokenizer(self) -> TextTokenizer:
        """The configured tokenizer.json, or a byte-level BPE trained on the training captions."""
        if self.tokenizer is None:
            if self.cfg.tokenizer:
                self.tokenizer = TextTokenizer.from_file(self.cfg.tokenizer, max_len=self.cfg.max_text_len)
            else:
                train = self.load()[self.cfg.train_split]
                texts = (clean_text(c) for caps in train["captions"] for c in (caps or []))
                self.tokenizer = TextTokenizer.train(texts, self.cfg.vocab_size, self.cfg.max_text_len)
        return self.tokenizer

    def dataset(self, split: str, progress: bool = False, rows: int | None = None) -> CaptionedImages | DecodedRows:
        """The split's rows (its first `rows` when given): decoded into tensors once (`DecodedRows`) when
        they fit in `data.cache_mb`, else read and decoded row by row on every pass. Made once per split
        and size: a second loader over the same split (LoRA-GA's estimate, then training) decodes nothing."""
        if (split, rows) not in self._datasets:
            self._datasets[split, rows] = self._dataset(split, progress, rows)
        return self._datasets[split, rows]

    def _dataset(self, split: str, progress: bool, rows: int | None) -> CaptionedImages | DecodedRows:
        data = self.load()
        if split not in data:
            raise UserError(f"split {split!r} not in the data set (it has: {', '.join(data)}); set data.train_split")
        tok = self.text_tokenizer() if self.need_text else None
        ds = data[split] if rows is None else data[split].select(range(min(rows, len(data[split]))))
        rows = CaptionedImages(ds, tok, self.image_size, self.cfg.max_text_len, resize=self.cfg.resize)
        if self.row_bytes(ds) * len(ds) > self.cfg.cache_mb * 2**20:
            return rows
        return DecodedRows(rows.read_all(progress=progress))

    def row_bytes(self, ds: Any) -> int:
        """Memory one cached row takes: its uint8 image, or its precomputed float32 tokens."""
        if "tokens" in ds.column_names and len(ds):
            return 4 * int(np.asarray(ds[0]["tokens"]).size)
        return 3 * self.image_size * self.image_size

    def val_dataloader(self) -> DataLoader:
        """The first `batches` batches of the validation split, the same rows at every check."""
        trainer = getattr(self, "trainer", None)
        batches = trainer.limit_val_batches if trainer is not None else 2
        split, data = self.cfg.val_split, self.load()
        if split not in data:
            raise ConfigError(
                "data.val_split",
                f"{split!r} is not a split of the data (it has: {', '.join(data)}): name the held-out split, "
                "or train without validation (train.val_every_n_steps=0)",
            )
        size = self.cfg.process_batch(trainer.world_size if trainer is not None else 1)
        ds = self.dataset(split, rows=int(batches) * size)
        order = [list(range(start, min(start + size, len(ds)))) for start in range(0, len(ds), size)]
        return DataLoader(ds, batch_sampler=order, collate_fn=collate_items)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        ds = self.dataset(self.cfg.train_split, progress=trainer is None or trainer.is_global_zero)
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        batch = self.cfg.process_batch(world)
        sampler = StepBatchSampler(len(ds), batch, self.seed, start, self.total_steps, world, rank)
        return DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_items,
            persistent_workers=self.cfg.num_workers > 0,
        )
