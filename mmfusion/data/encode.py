"""`mmfusion data encode`: run the image tokenizer (e.g. a VAE) once and store the tokens.

The result is a copy of the data set with a `tokens` column (N x C float32 per image) and
`mmfusion_tokens.json` recording the image tokenizer config; training then never re-runs the VAE and
checks that its own image config matches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfusion.data.datasets import load_captioned
from mmfusion.errors import UserError
from mmfusion.image_io import to_tensor
from mmfusion.tokenizers.build import build_image_tokenizer
from mmfusion.tokenizers.config import ImageTokenizerConfig

META = "mmfusion_tokens.json"


def encode_dataset(
    source: str,
    out: str | Path,
    image: ImageTokenizerConfig,
    batch_size: int = 32,
    image_root: str | None = None,
    resize: str = "squash",
    image_column: str | None = None,
    caption_column: str | None = None,
) -> Path:
    """Encode every image of `source` (made square by `resize`, as `data.resize` does in training)."""
    import datasets

    tok = build_image_tokenizer(image)
    data = load_captioned(source, image_root, image_column, caption_column)
    first = next(iter(data.values()))[0]["image"]
    if max(first.size) < image.image_size:
        print(
            f"note: the images are {first.size[0]}x{first.size[1]} px and are enlarged to {image.image_size}; "
            f"--image-size {max(first.size)} keeps their size (the training config's image.image_size must match)"
        )

    def add_tokens(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        x = torch.stack([to_tensor(im, image.image_size, resize) for im in batch["image"]])
        return {"tokens": [t.numpy().astype(np.float32) for t in tok.encode(x)]}

    encoded = datasets.DatasetDict(
        {
            name: split.map(add_tokens, batched=True, batch_size=batch_size, desc=f"encoding {name}")
            for name, split in data.items()
        }
    )
    out = Path(out)
    encoded.save_to_disk(str(out))
    (out / META).write_text(json.dumps(tok.cfg.to_dict() | {"resize": resize}, indent=2))
    return out


def is_encoded(source: str | Path) -> bool:
    """Whether `source` holds image tokens encoded ahead of time (by `mmfusion data encode`)."""
    return (Path(source) / META).exists()


def check_encoded(source: str | Path, image: ImageTokenizerConfig) -> None:
    """Refuse to train on tokens made by a different image tokenizer than the run's."""
    meta = Path(source) / META
    if not meta.exists():
        return
    stored = json.loads(meta.read_text())
    wanted = {k: v for k, v in image.to_dict().items() if k not in ("channels", "downsample")}
    mismatch = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if mismatch:
        key, (have, want) = next(iter(mismatch.items()))
        raise UserError(
            f"data {source} was encoded with image.{key}={have!r} but the run asks for {want!r}: "
            "re-run `mmfusion data encode` or change the config"
        )
