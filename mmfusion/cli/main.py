"""Entry point of the `mmfusion` console script."""

from __future__ import annotations

import logging
import os
import sys

from mmfusion.cli import bench, data, demo, evaluate, finetune, infer, plan, serve, train
from mmfusion.cli.app import build_parser, run
from mmfusion.errors import Stopped, UserError
from mmfusion.runtime import tune_malloc

COMMANDS = {
    "data": {
        "__doc__": "build, export and encode data sets",
        "shapes": data.shapes,
        "export": data.export,
        "encode": data.encode,
    },
    "vae": {"__doc__": "train a small AutoencoderKL image tokenizer", "train": data.vae_train},
    "vq": {"__doc__": "train a small VQ image tokenizer (Token-Shuffle path)", "train": data.vq_train},
    "tokenizer": {"__doc__": "train text tokenizers", "train": data.tokenizer_train},
    "train": train.train,
    "finetune": finetune.finetune,
    "generate": infer.generate,
    "caption": infer.caption,
    "edit": infer.edit,
    "serve": serve.serve,
    "eval": {
        "__doc__": "evaluate: caption metrics, the shapes benchmark, FID / CLIP score",
        "caption": evaluate.caption,
        "shapes": evaluate.shapes,
        "generation": evaluate.generation,
    },
    "plan": plan.plan,
    "bench": bench.bench,
    "demo": demo.demo,
}


def _quiet() -> None:
    """Keep the terminal for our own progress bars and messages."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    _quiet()
    tune_malloc()
    parser = build_parser(COMMANDS, "mmfusion", "mmfusion: one transformer for text-to-image and captioning.")
    try:
        run(parser, argv)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as err:  # its message comes from one process only
        if str(err):
            print(f"\n{err}", file=sys.stderr, flush=True)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
