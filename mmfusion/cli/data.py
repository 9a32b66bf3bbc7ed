"""`mmfusion data ...` and `mmfusion tokenizer ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def shapes(
    *,
    out: str,
    n: int = 10000,
    size: int = 32,
    seed: int = 0,
    n_val: int | None = None,
    n_test: int | None = None,
    pair_fraction: float = 0.5,
) -> None:
    """Render the built-in captioned "shapes" data set and save it as a `datasets` DatasetDict.

    One or two solid objects (circle, square, triangle; red, green, blue, yellow) on white; pairs
    stand in a relation (left of, right of, above, below). Each image has 6 captions.

    Args:
        out: folder to write (loadable with `datasets.load_from_disk`)
        n: number of training images
        size: image side in pixels, 32 or 64
        seed: random seed; the same seed renders the same images
        n_val: validation images (default: max(100, n / 20))
        n_test: test images (default: max(200, n / 20))
        pair_fraction: fraction of images with two objects
    """
    from mmfusion.data.shapes import build_shapes

    ds = build_shapes(n=n, size=size, seed=seed, n_val=n_val, n_test=n_test, pair_fraction=pair_fraction)
    ds.save_to_disk(out)
    counts = ", ".join(f"{k}: {len(v)}" for k, v in ds.items())
    print(f"wrote shapes ({counts}) to {out}")


def export(*, data: str, out: str, format: Literal["imagefolder", "coco"] = "imagefolder", split: str = "test") -> None:
    """Export a saved data set as an imagefolder (PNG + metadata.jsonl) or as COCO caption JSON.

    Args:
        data: a folder written by `mmfusion data shapes` (or any saved DatasetDict with image/captions)
        out: output folder
        format: imagefolder (all splits) or coco (one split: OUT/captions_SPLIT.json + OUT/SPLIT/*.png)
        split: the split to export as COCO
    """
    import datasets

    from mmfusion.data.shapes import export_coco, export_imagefolder

    ds = datasets.load_from_disk(data)
    if format == "imagefolder":
        export_imagefolder(ds, out)
        print(f"wrote imagefolder to {out}")
    else:
        path = export_coco(ds[split], Path(out) / f"captions_{split}.json", Path(out) / split)
        print(f"wrote {path} and images under {Path(out) / split}")


def tokenizer_train(*, data: str, out: str, vocab_size: int = 512, max_len: int = 35) -> None:
    """Train a byte-level BPE text tokenizer on the captions of a data set.

    Args:
        data: a saved data set with a `captions` column, or a text file with one caption per line
        out: where to write tokenizer.json (a file path or a folder)
        vocab_size: BPE vocabulary size, special tokens included
        max_len: maximum number of text tokens kept per caption (CausalFusion: 35)
    """
    from mmfusion.tokenizers.text import TextTokenizer

    tok = TextTokenizer.train(_caption_iter(data), vocab_size=vocab_size, max_len=max_len)
    path = tok.save(out)
    print(f"wrote {path} ({len(tok)} tokens)")


def _caption_iter(data: str):  # noqa: ANN202
    path = Path(data)
    if path.is_file():
        yield from path.read_text(errors="replace").splitlines()
        return
    from mmfusion.data.datasets import load_captioned

    for split in load_captioned(data).values():
        for caps in split["captions"]:
            yield from caps
