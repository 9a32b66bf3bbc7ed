"""What the three samplers share: the inference-mode wrapper of a sampling loop, the rows of a guided
batch (conditional rows, then unconditional ones) with one generator per image, the guidance itself,
and the batches a long request is sampled in."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def inference(fn: Callable) -> Callable:
    """Run a sampling loop under `torch.inference_mode` (no autograd bookkeeping on each of its many
    small ops) and hand back an ordinary tensor, which callers may change in place or use with autograd
    (an inference tensor refuses both)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone() if isinstance(out, torch.Tensor) else out

    return run


def guided_prefixes(
    conds: list[list[int]],
    unconds: list[list[int]] | None,
    generators: list[torch.Generator] | None,
    guided: bool,
) -> tuple[list[list[int]], list[torch.Generator]]:
    """The rows to run (conditional, then unconditional when guiding) and one generator per image."""
    b = len(conds)
    if guided and (unconds is None or len(unconds) != b):
        raise ValueError("classifier-free guidance needs one unconditional prefix per condition")
    generators = generators or [torch.Generator().manual_seed(i) for i in range(b)]
    return conds + (unconds if guided else []), generators


def guide(out: torch.Tensor, b: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a guided batch's outputs: the `b` conditional rows first, the
    unconditional ones after them; scale 1 gives the conditional rows back."""
    cond, uncond = out[:b], out[b:]
    return uncond + scale * (cond - uncond)


def batches(items: Sequence[Any], size: int, desc: str, progress: bool = False) -> Iterator[tuple[int, Sequence[Any]]]:
    """(start, items[start : start + size]) over `items`, with a progress bar over the items when asked
    for and there is more than one batch."""
    bar = tqdm(total=len(items), desc=desc, disable=not progress or len(items) <= size)
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield start, chunk
        bar.update(len(chunk))
    bar.close()
