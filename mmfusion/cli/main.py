"""Entry point of the `mmfusion` console script."""

from __future__ import annotations

import sys

from mmfusion.cli import data, demo, evaluate, finetune, infer, train
from mmfusion.cli.app import build_parser, run
from mmfusion.errors import UserError

COMMANDS = {
    "data": {
        "__doc__": "build, export and encode data sets",
        "shapes": data.shapes,
        "export": data.export,
        "encode": data.encode,
    },
    "vae": {"__doc__": "train a small AutoencoderKL image tokenizer", "train": data.vae_train},
    "tokenizer": {"__doc__": "train text tokenizers", "train": data.tokenizer_train},
    "train": train.train,
    "finetune": finetune.finetune,
    "generate": infer.generate,
    "caption": infer.caption,
    "edit": infer.edit,
    "eval": {
        "__doc__": "evaluate: caption metrics, the shapes benchmark, FID / CLIP score",
        "caption": evaluate.caption,
        "shapes": evaluate.shapes,
        "generation": evaluate.generation,
    },
    "demo": demo.demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(COMMANDS, "mmfusion", "mmfusion: one transformer for text-to-image and captioning.")
    try:
        run(parser, argv)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
