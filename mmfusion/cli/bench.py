"""`mmfusion bench`: the benchmark suite of the checkout (benchmarks/bench.py, outside the package)."""

# Deferred imports: the suite is loaded from the checkout when the command runs

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from mmfusion.errors import UserError


def bench(*, quick: bool = False, only: list[str] | None = None, doc: bool = True) -> None:
    """Run the benchmark suite: matmul peak, training throughput and MFU, the demo's training step from
    data rows to optimizer step (new path against the old, in turn), the fine-tuning step (full, LoRA in
    peft's form and in weight space, in turn), sampling and captioning with
    and without the KV cache, Token-Shuffle s = 1, 2, 4, FlexAttention vs SDPA, and mmfusion against
    its peers on the same work (transformers' LLaMA training step and `generate`, the diffusers
    scheduler loop), `mmfusion serve` under load against the Python API, and the compiled pipeline
    against the eager one. Writes docs/benchmarks.json
    and the tables of docs/BENCHMARKS.md in the repository. The benchmarks live in the repository
    (benchmarks/bench.py), not in the installed package: run this from a checkout.

    Args:
        quick: fewer repetitions and smaller batches, a smoke test: writes docs/benchmarks-quick.json
            and leaves the recorded tables alone
        only: run only this benchmark (repeat; the others' results are kept from the last run on this
            machine, torch and mode; where none carry over, only the items run get tables): matmul,
            train_tiny, train_small, train_width, pipeline, finetune, sampling, sampling_batch, sampling_paper_tokens,
            caption, token_shuffle, attention, peers_train, peers_decode, peers_sampling, serve, compiled
        doc: update the tables of docs/BENCHMARKS.md (--no-doc: write the JSON only)
    """
    argv = (["--quick"] if quick else []) + (["--only", *only] if only else []) + ([] if doc else ["--no-doc"])
    load_bench().main(argv)


def load_bench() -> ModuleType:
    """benchmarks/bench.py of the checkout this mmfusion was installed from."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not path.is_file():
        raise UserError(
            f"no benchmarks at {path}: they live in the repository, not in the installed package; "
            "run `mmfusion bench` from a checkout installed with `pip install -e .`"
        )
    try:  # the repository on sys.path (tests, `python -m` from its root): the module as imported there
        module = importlib.import_module("benchmarks.bench")
        if Path(module.__file__).resolve() == path:
            return module
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("mmfusion_benchmarks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
