"""mmfusion benchmarks: every figure measured in one run, on this machine.

    python benchmarks/bench.py [--quick] [--only NAME ...] [--docs DIR]
    mmfusion bench [--quick] [--only NAME ...]        (the same, from a checkout of the repository)

Each benchmark runs in its own subprocess, so its peak memory (peak RSS of that process) is its own.
Results go to a JSON file and to the tables of BENCHMARKS.md (between the generated markers; the rest
of that file is prose kept by hand), both in the repository's docs/ folder, found from this file, or in
the folder `--docs` names. `--only` re-runs some items and keeps the others from
the JSON of the last run on this machine, each with the date it was measured (the tables say which
came from an earlier run): the figures of one table always come from one run. Measured items:

* the dense matmul peak of this machine (fp32 and bf16 GFLOP/s): the reference for utilisation;
* the demo's training step from data set rows to the optimizer step, by the row-by-row path and by
  decoded rows with the whole-batch layout, in turn;
* training throughput (tokens/s) and model-FLOPs utilisation of the `tiny` and `small` configs, in
  fp32 and bf16: eager, compiled (`train.compile`), compiled on packed rows (`objective.pack_length`),
  and that last in 2 data-parallel processes sharing the cores (DDP, as the demo trains);
* training MFU as the model widens: `small`'s 4 layers at dim 128, 256 and 512 (heads of 64; 128 and 256
  with --quick), fp32 and bf16, compiled on packed rows, each against the peak of its precision measured in turn;
* CausalFusion sampling time for S = 1, 4, 16 AR steps, with and without the KV cache, for the demo's
  model (16 tokens per image), cached S = 16 against S = 1 for that model at 32, 128 and 512 images
  per batch, and, cached, for a wider model at the paper's 256 tokens per image; for cached S = 1 and
  S = 16 also the floor of their ratio: the runs' own products and attention calls replayed alone;
* captioning tokens/s with and without the KV cache (32 new tokens);
* Token-Shuffle s = 1, 2, 4: tokens per image, training step time, sampling time;
* FlexAttention (block-sparse, compiled) against dense masked SDPA on the generalized causal mask;
* peers, the same work done by mmfusion and by another library, timed in turn on the same inputs:
  the training step against transformers' LlamaForCausalLM of the same shape and weights, eager and
  compiled, fp32 and bf16 (`peers_train`); greedy decoding with a KV cache against transformers'
  `generate` (`peers_decode`); one-step image sampling against the diffusers scheduler loop driving
  the same network (`peers_sampling`);
* `mmfusion serve` under load: text-to-image and caption requests from concurrent clients on loopback,
  p50 / p95 latency and images (captions) per second, against the same work through the Python API.
"""

# Deferred imports: each item imports what it times inside its own child process, so that the
# process's peak memory is that item's alone

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"  # the repository's docs/
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


# --- helpers ---------------------------------------------------------------------------------
def _durations(fn, calls: int) -> list[float]:  # noqa: ANN001
    """Seconds of each of `calls` calls of `fn`."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def timed(fn, repeat: int, warmup: int = 1) -> float:  # noqa: ANN001
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return _median(_durations(fn, repeat))


def timed_against_peak(fn, dtype: Any, rounds: int, per_round: int, warmup: int = 1) -> tuple[float, float]:  # noqa: ANN001
    """(median seconds of `fn`, median dense matmul GFLOP/s of `dtype` at 2048^3), measured in turn:
    a 0.3 s matmul probe, then one untimed call (the probe evicts the caches, which back-to-back
    training steps keep warm) and `per_round` timed calls, `rounds` times, and a last probe. The
    machines here are shared, and a peak measured a minute before the steps (before compiling, say)
    can meet a busier or quieter machine than they did; this way both see the same one."""
    from mmfusion.runtime import matmul_gflops

    for _ in range(warmup):
        fn()
    times, peaks = [], []
    for _ in range(rounds):
        peaks.append(matmul_gflops(dtype, 2048, 0.3))
        fn()
        times += _durations(fn, per_round)
    peaks.append(matmul_gflops(dtype, 2048, 0.3))
    return _median(times), _median(peaks)


KERNELS_ALONE = "products and attention alone (floor)"  # the rows of `kernel_seconds`


# the matrix products and attention calls, as a TorchDispatchMode sees them (`linear` and SDPA reach the
# mode whole, before they decompose)
KERNEL_OPS = frozenset(
    (
        "aten.linear.default",
        "aten.mm.default",
        "aten.addmm.default",
        "aten.bmm.default",
        "aten.baddbmm.default",
        "aten.matmul.default",
        "aten.scaled_dot_product_attention.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
    )
)


def _record_kernels(fn) -> list[tuple[int, Any, list, dict]]:  # noqa: ANN001
    """Run `fn` once under a dispatch mode that records its products and attention calls: one entry per
    kind (op, and the shapes, strides and dtypes of its arguments) with how often `fn` made it and the
    arguments of its first call."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def signature(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.stride(), x.dtype, x.device.type)
        if isinstance(x, (list, tuple)):
            return tuple(signature(y) for y in x)
        return x

    kinds: dict[Any, list] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            if str(func) in KERNEL_OPS:
                key = (str(func), signature(args), signature(sorted(kwargs.items())))
                if key not in kinds:
                    copy = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                    kinds[key] = [0, func, copy, dict(kwargs)]
                kinds[key][0] += 1
            return func(*args, **kwargs)

    with Record():
        fn()
    return [tuple(k) for k in kinds.values()]


def kernel_seconds(*fns, seconds: float = 0.02) -> list[dict]:  # noqa: ANN002
    """What the matrix products and attention calls of one call of each of `fns` cost alone. Each fn runs
    once while its calls are recorded (`_record_kernels`); then every recorded kind is replayed back to
    back, with nothing between the calls, for `seconds` / 5, in five rounds that go through the kinds of
    all the fns in turn (so that the fns being compared meet the same machine), and each kind's fastest
    round's time per call is counted as often as its fn made it (the fastest: a busy machine only adds
    time). Every other op, the Python between the ops and the caches' going cold are left out, so this
    is a lower bound on a fn's time for any implementation that calls these kernels as it does. Returns
    one {"seconds", "calls", "kinds"} per fn."""
    import torch

    recorded = [_record_kernels(fn) for fn in fns]
    fastest: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        for _ in range(5):
            for i, kinds in enumerate(recorded):
                for j, (_, func, args, kwargs) in enumerate(kinds):
                    func(*args, **kwargs)  # the first call after another kind's is not timed
                    calls, start = 0, time.perf_counter()
                    while calls < 3 or time.perf_counter() - start < seconds / 5:
                        func(*args, **kwargs)
                        calls += 1
                    per_call = (time.perf_counter() - start) / calls
                    fastest[i, j] = min(per_call, fastest.get((i, j), per_call))
    return [
        {
            "seconds": sum(n * fastest[i, j] for j, (n, *_) in enumerate(kinds)),
            "calls": sum(n for n, *_ in kinds),
            "kinds": len(kinds),
        }
        for i, kinds in enumerate(recorded)
    ]


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB). On Linux the high-water mark of this process's own
    address space (VmHWM): getrusage's maximum is inherited over fork and exec, so a spawned worker
    would report its parent's peak when that is larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_tokenizer():  # noqa: ANN201
    from mmfusion.data.shapes import render_example
    from mmfusion.tokenizers.text import TextTokenizer

    caps = [c for i in range(400) for c in render_example(0, "train", i)["captions"]]
    return TextTokenizer.train(caps, vocab_size=400)


def shapes_images(n: int, size: int = 32):  # noqa: ANN201
    import torch

    from mmfusion.data.shapes import render_example
    from mmfusion.image_io import to_tensor

    rows = [render_example(0, "train", i, size=size) for i in range(n)]
    return torch.stack([to_tensor(r["image"], size) for r in rows]), [r["captions"][0] for r in rows]


PACK_LENGTH = 64  # training rows: samples packed into rows of this many tokens (objective.pack_length)
TRAIN_BATCH = 64  # samples per training step (global: split between the processes of the DDP row)
DDP_ROW = " compiled packed, 2 processes (DDP)"  # suffix of the data-parallel training rows


def model_flops(cfg: Any, batch: Any) -> float:
    """Training FLOPs of one step over `batch` (padded, one sample per row): the library's formula
    (`mmfusion.training.plan.step_flops`, the one `mmfusion plan` uses) over the batch's own counts:
    its valid tokens, its row length, its image tokens, its tokens with a diffusion target and those with
    a text target. The timestep MLP runs once per distinct timestep and is left out."""
    from mmfusion.model.sequence import IGNORE
    from mmfusion.training.plan import step_flops

    return step_flops(
        cfg,
        tokens=int(batch.valid().sum()),
        seq_len=batch.kind.shape[1],
        image_tokens=int(batch.is_image().sum()),
        noisy_tokens=int((batch.weights > 0).sum()),
        text_targets=int((batch.labels != IGNORE).sum()),
    )


# --- benchmarks --------------------------------------------------------------------------------
def bench_matmul(quick: bool) -> dict:
    import torch

    from mmfusion.runtime import bf16_native, matmul_gflops

    n = 1024 if quick else 2048
    native, bf16_512, _ = bf16_native()
    return {
        "n": n,
        "fp32_gflops": matmul_gflops(torch.float32, n, 1.0),
        "bf16_gflops": matmul_gflops(torch.bfloat16, n, 1.0) if native else bf16_512,
        "bf16_n": n if native else 512,
        "bf16_native": native,
    }


def _train_setup(preset: str, rank: int = 0, world: int = 1, **overrides: Any) -> tuple:
    """The training benchmark's data: 64 shapes samples (this process's share of them when `world`
    processes split the batch), padded one per row and packed into rows of PACK_LENGTH, with the model
    config (the preset with `overrides`) and the objective. Returns (cfg, objective, {pack_length: TokenBatch})."""
    import torch

    from mmfusion.config import ObjectiveConfig
    from mmfusion.diffusion.config import DiffusionConfig
    from mmfusion.model.config import ModelConfig
    from mmfusion.tokenizers.config import ImageTokenizerConfig
    from mmfusion.tokenizers.image import PixelTokenizer
    from mmfusion.training.objective import JointObjective

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    pix = PixelTokenizer(ImageTokenizerConfig(image_size=32, patch_size=8))
    cfg = ModelConfig.from_name(
        preset, vocab_size=len(tok), image_token_dim=pix.token_dim, image_grid=pix.grid, image_rope=True, **overrides
    )
    images, caps = shapes_images(TRAIN_BATCH)
    share = slice(rank * TRAIN_BATCH // world, (rank + 1) * TRAIN_BATCH // world)
    tokens_in, captions = pix.encode(images[share]), [tok.encode(c) for c in caps[share]]
    batches = {}
    for pack_length in (0, PACK_LENGTH):  # one padded row per sample; samples packed into rows
        obj = JointObjective(
            cfg,
            DiffusionConfig(gamma=0.5),
            ObjectiveConfig(pack_length=pack_length),
            tok.bos_id,
            tok.eos_id,
            tok.boi_id,
            tok.eoi_id,
        )
        batches[pack_length] = obj.build(tokens_in, captions, None, torch.Generator().manual_seed(rank))
    return cfg, obj, batches


def _train_step(model: Any, obj: Any, rows: Any, dtype: Any, ddp: bool = False):  # noqa: ANN202
    """One training step of `model` over `rows` as `mmfusion train` takes it: fused AdamW, gradients
    clipped to norm 1 (MMFusionModule); under `ddp`, through DistributedDataParallel with the
    unused-parameter search of mmfusion's DDP strategy."""
    import torch

    class Loss(torch.nn.Module):  # DDP synchronises the gradients of what its forward computes
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> torch.Tensor:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                return obj.loss(self.model, rows)["loss"]

    loss_of = Loss()
    if ddp:
        loss_of = torch.nn.parallel.DistributedDataParallel(loss_of, find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        loss_of().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def _ddp_timing(preset: str, rank: int, world: int, dtype_name: str, quick: bool, compiled: bool) -> dict:
    """This process's share of the step: its model FLOPs and tokens (each share draws its own noise and
    AR steps) and its median step seconds (None where blocks cannot be compiled)."""
    import torch

    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.training.module import compile_blocks

    cfg, obj, batches = _train_setup(preset, rank, world)
    share = {"flops": model_flops(cfg, batches[0]), "tokens": int(batches[0].valid().sum()), "step_s": None}
    torch.manual_seed(0)
    model = MMFusionModel(cfg)
    if not compiled or compile_blocks(model):
        dtype = torch.bfloat16 if dtype_name == "bf16" else None
        step = _train_step(model, obj, batches[PACK_LENGTH], dtype, ddp=True)
        share["step_s"] = timed(step, repeat=3 if quick else 10, warmup=3 if compiled else 2)
    return share


def _ddp_train_worker(
    rank: int, world: int, threads: int, preset: str, dtype_name: str, quick: bool, compiled: bool, folder: str
) -> None:
    """One of `world` processes of the data-parallel timing (torch.multiprocessing.spawn target): writes
    its share of the step (`_ddp_timing`) and its peak memory to FOLDER/share{rank}.json."""
    import torch
    import torch.distributed as dist

    from mmfusion.runtime import tune_malloc

    tune_malloc()
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    share = _ddp_timing(preset, rank, world, dtype_name, quick, compiled)
    (Path(folder) / f"share{rank}.json").write_text(json.dumps({**share, "peak_rss_mb": peak_rss_mb()}))
    dist.barrier()
    # Leave without tearing gloo down: its destructors, racing its worker threads at exit, deadlocked on
    # the GIL or aborted ("terminate called without an active exception") in some runs. The result is
    # written, and nothing else of this process is needed.
    os._exit(0)


def ddp_step_seconds(
    preset: str, dtype_name: str, quick: bool, threads: int, world: int = 2, compiled: bool = True
) -> dict:
    """Median step seconds of `world` DDP processes (gloo) of threads // world threads each, each with
    its share of the batch, packed (and compiled): how the demo trains on a CPU of two or more cores.
    Returns {"step_s": rank 0's seconds (None where blocks cannot be compiled), "rank0_peak_rss_mb",
    "flops", "tokens"}: the model FLOPs and tokens of the whole step, summed over the processes' shares."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:  # a file rendezvous: no port to race for
        args = (world, max(1, threads // world), preset, dtype_name, quick, compiled, folder)
        mp.spawn(_ddp_train_worker, args=args, nprocs=world)
        shares = [json.loads((Path(folder) / f"share{rank}.json").read_text()) for rank in range(world)]
    return {
        "step_s": shares[0]["step_s"],
        "rank0_peak_rss_mb": shares[0]["peak_rss_mb"],
        "flops": sum(share["flops"] for share in shares),
        "tokens": sum(share["tokens"] for share in shares),
    }


def bench_train(preset: str, quick: bool) -> dict:
    """Steps of the joint objective on shapes (pixels, patch 8): fp32 and bf16 autocast, each eager and
    with compiled blocks (`train.compile`), on padded and on packed rows; and packed with compiled blocks
    in 2 data-parallel processes that share the threads (the demo's layout on 2 cores)."""
    import torch

    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.runtime import bf16_native
    from mmfusion.training.module import compile_blocks

    cfg, obj, batches = _train_setup(preset)
    batch = batches[0]
    tokens = int(batch.valid().sum())
    out: dict[str, Any] = {
        "preset": preset,
        "parameters": MMFusionModel(cfg).num_parameters(),
        "batch": TRAIN_BATCH,
        "tokens_per_step": tokens,
        "seq_len": batch.kind.shape[1],
        "packed_rows": f"{len(batches[PACK_LENGTH])} x {batches[PACK_LENGTH].kind.shape[1]}",
    }
    # the same model FLOPs for packed rows: attention counted over the longest sample, not the row
    flops = model_flops(cfg, batch)
    out["model_gflops_per_step"] = flops / 1e9
    precisions = [("fp32", None)]
    native, bf16_gflops, fp32_gflops = bf16_native()
    if native:
        precisions.append(("bf16", torch.bfloat16))
    else:
        out["bf16"] = {"skipped": f"no native bf16 ({bf16_gflops:.0f} vs {fp32_gflops:.0f} GFLOP/s fp32 at 512^3)"}
    threads = torch.get_num_threads()
    for name, dtype in precisions:
        # row -> (step s, model FLOPs, tokens, per-process peak RSS or None, matmul peak measured in turn)
        rows: dict[str, tuple] = {}
        for compiled, pack_length in ((False, 0), (True, 0), (True, PACK_LENGTH)):
            torch.manual_seed(0)
            model = MMFusionModel(cfg)
            if compiled and not compile_blocks(model):
                continue
            key = name + (" compiled" if compiled else "") + (" packed" if pack_length else "")
            step = _train_step(model, obj, batches[pack_length], dtype)
            sec, peak = timed_against_peak(
                step, dtype or torch.float32, 2 if quick else 5, 2 if quick else 4, warmup=3 if compiled else 2
            )
            rows[key] = (sec, flops, tokens, None, peak)
        if threads >= 2 and name + " compiled packed" in rows:
            try:
                ddp = ddp_step_seconds(preset, name, quick, threads)
            except Exception as err:  # noqa: BLE001  the single-process rows stand on their own
                out[name + DDP_ROW] = {"skipped": f"{type(err).__name__}: {err}"[:200]}
            else:
                # the processes' shares carry their own noise draws: their FLOPs and tokens, summed
                # against the peak measured with the row before it (the spawned processes share the cores)
                peak = rows[name + " compiled packed"][4]
                rows[name + DDP_ROW] = (ddp["step_s"], ddp["flops"], ddp["tokens"], ddp["rank0_peak_rss_mb"], peak)
        for key, (sec, work, count, rss, peak) in rows.items():
            out[key] = _rates(sec, work, count, peak)
            if rss is not None:
                out[key]["peak_rss_mb_per_process"] = rss
    return out


FINETUNE_VARIANTS = {  # bench_finetune's rows: key -> what the row times
    "full": "full fine-tuning (`--full`)",
    "lora_peft": "LoRA r 16 on the seven projections, peft's forward (x W^T + s (x A^T) B^T)",
    "lora": "the same LoRA in weight space (x (W + s B A)^T; `mmfusion finetune`)",
}


def bench_finetune(quick: bool, preset: str = "small", compiled: bool = True) -> dict:
    """The fine-tuning step (forward, backward, clipping, fused AdamW over the trainable weights) on the
    `train_small` batch packed into rows, bf16 autocast where the CPU has it, compiled transformer: full
    fine-tuning, LoRA through peft's forward and LoRA in weight space (`weight_space_training`), in turn.
    The LoRA rows train the same factors from the same start; only how the products are grouped differs."""
    import contextlib

    import torch

    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.runtime import bf16_native
    from mmfusion.training.lora import ATTENTION, MLP, add_lora, parameter_counts, weight_space_training
    from mmfusion.training.module import compile_blocks

    cfg, obj, batches = _train_setup(preset)
    dtype = torch.bfloat16 if bf16_native()[0] else None
    steps, trainable = {}, {}
    with contextlib.ExitStack() as stack:
        for key in FINETUNE_VARIANTS:
            torch.manual_seed(0)
            model = MMFusionModel(cfg)
            if key != "full":
                model = add_lora(model, r=16, alpha=32, targets=ATTENTION + MLP)
            if key == "lora":  # before compiling: the graph traces the forward in place
                stack.enter_context(weight_space_training(model))
            if compiled:
                compile_blocks(model)
            steps[key] = _train_step(model, obj, batches[PACK_LENGTH], dtype)
            trainable[key] = parameter_counts(model)[0]
        times = in_turn(steps, rounds=3 if quick else 12, warmup=3 if compiled else 1)
    out: dict[str, Any] = {"preset": preset, "precision": "bf16" if dtype else "fp32", "compiled": compiled}
    for key in FINETUNE_VARIANTS:
        over_full = times[key] / times["full"]
        out[key] = {"step_s": times[key], "trainable_parameters": trainable[key], "over_full": over_full}
    out["lora_speedup"] = times["lora_peft"] / times["lora"]
    return out


def _rates(sec: float, flops: float, tokens: int, peak: float) -> dict:
    """A training row: step seconds, tokens/s, achieved GFLOP/s, the matmul peak measured with it, MFU."""
    return {
        "step_s": sec,
        "tokens_per_s": tokens / sec,
        "achieved_gflops": flops / sec / 1e9,
        "matmul_peak_gflops": peak,
        "mfu": flops / sec / 1e9 / peak,
    }


WIDTHS = (128, 256, 512)  # train_width: 4 layers, heads of 64 channels; 128 is the `small` preset
HEAD_DIM = 64


def bench_train_width(quick: bool, widths: tuple[int, ...] = (), compiled: bool = True) -> dict:
    """MFU as the model widens: the `small` preset (4 layers) at each of `widths`, with heads of 64
    channels (SwiGLU 8/3 x dim), trained on the `train_small` data (64 samples packed into rows of
    PACK_LENGTH) with compiled blocks, in fp32 and in bf16 autocast, each against the matmul peak of its
    precision measured in turn with its steps (the first two widths with `quick`). `compiled` False times
    eager steps (tests)."""
    import torch

    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.runtime import bf16_native
    from mmfusion.training.module import compile_blocks

    precisions: list[tuple[str, Any]] = [("fp32", None)]
    if bf16_native()[0]:
        precisions.append(("bf16", torch.bfloat16))
    out: dict[str, Any] = {"layers": 4, "head_dim": HEAD_DIM, "batch": TRAIN_BATCH, "compiled": compiled}
    out["threads"] = torch.get_num_threads()
    for dim in widths or (WIDTHS[:2] if quick else WIDTHS):
        cfg, obj, batches = _train_setup("small", dim=dim, n_heads=dim // HEAD_DIM)
        flops, tokens = model_flops(cfg, batches[0]), int(batches[0].valid().sum())
        row: dict[str, Any] = {"parameters": MMFusionModel(cfg).num_parameters(), "model_gflops_per_step": flops / 1e9}
        row["tokens_per_step"] = tokens
        for name, dtype in precisions:
            torch.manual_seed(0)
            model = MMFusionModel(cfg)
            if compiled and not compile_blocks(model):
                row[name] = {"skipped": "no C++ compiler"}
                continue
            step = _train_step(model, obj, batches[PACK_LENGTH], dtype)
            sec, peak = timed_against_peak(
                step, dtype or torch.float32, 2 if quick else 5, 2 if quick else 4, warmup=3 if compiled else 2
            )
            row[name] = _rates(sec, flops, tokens, peak)
        out[f"dim={dim}"] = row
    return out


PIPELINE_BATCH = 64  # one demo process's share of the demo's global batch of 128


def bench_pipeline(quick: bool, overrides: tuple[str, ...] = (), rows_n: int = 0, rounds: int = 0) -> dict:
    """The demo configuration's training step as one process of `mmfusion demo` runs it (1 thread, its
    64 of the 128 samples a step), from data set rows to the optimizer step, by two paths in turn:
    "rows" reads each row (kept once read, so every row is warm: the path's best case) and lays the
    batch out one sample at a time, as training did before (its captions, though, travel as tensors, as
    they do now: the old cost of moving nested caption lists is not in it); "decoded" indexes rows decoded once into
    tensors and lays the batch out for the whole batch, as training does now. Both make the same
    batches (tests/training/test_layout.py). Reports samples/s of each, their ratio, and the share of
    a step spent outside the forward, backward and optimizer (reading, collating, Lightning's batch
    transfer, drawing and laying out the batch); Lightning's loop itself is left out of both.
    `overrides` change the demo config, `rows_n` and `rounds` the data set's size and the rounds (tests)."""
    import shutil

    import torch

    threads, per_round = torch.get_num_threads(), 20 if quick else 60
    bench = _PipelineBench(quick, overrides, rows_n or (1024 if quick else 4096))
    try:
        times = _pipeline_rounds(bench, per_round, rounds or (2 if quick else 4))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(bench.tmp, ignore_errors=True)
    out: dict[str, Any] = {"batch": PIPELINE_BATCH, "threads": 1, **bench.info}
    for path, measured in times.items():
        out[path] = {
            "samples_per_s": _median([per_round * PIPELINE_BATCH / (a + b) for a, b in measured]),
            "outside_share": _median([a / (a + b) for a, b in measured]),
            "batch_ms": _median([a / per_round * 1000 for a, _ in measured]),
            "model_step_ms": _median([b / per_round * 1000 for _, b in measured]),
        }
    out["speedup"] = out["decoded"]["samples_per_s"] / out["rows"]["samples_per_s"]
    return out


def _pipeline_rounds(bench: _PipelineBench, per_round: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Each path's (batch seconds, model seconds) per round, the paths in turn within every round."""
    for path in bench.paths:  # warm-up (the compiled graph for the shapes both paths make)
        bench.seconds(path, range(5 if bench.compiled else 2))
    times: dict[str, list[tuple[float, float]]] = {path: [] for path in bench.paths}
    for r in range(rounds):
        for path in bench.paths:
            times[path].append(bench.seconds(path, range(r * per_round, (r + 1) * per_round)))
    return times


class _PipelineBench:
    """`bench_pipeline`'s model, optimizer and the two ways to a batch, over the demo config."""

    def __init__(self, quick: bool, overrides: tuple[str, ...], rows_n: int) -> None:
        import tempfile

        import torch

        from mmfusion.config import load_config
        from mmfusion.data.datamodule import CaptionedImages, MMFusionDataModule, StepBatchSampler, collate_items
        from mmfusion.runtime import bf16_native
        from mmfusion.training.demo import DEMO_CONFIG
        from mmfusion.training.module import MMFusionModule, compile_blocks

        torch.set_num_threads(1)
        self.tmp = tmp = tempfile.mkdtemp(prefix="mmfusion-bench-")  # removed by bench_pipeline
        cfg = load_config(DEMO_CONFIG, [f"data.shapes_n={rows_n}", f"train.out={tmp}", *overrides])
        data = MMFusionDataModule(cfg.data, cfg.image.image_size, tmp, seed=0)
        tok = data.text_tokenizer()
        split = data.load()[cfg.data.train_split]
        start = time.perf_counter()
        decoded = data.dataset(cfg.data.train_split)
        decode_s = time.perf_counter() - start
        rows = CaptionedImages(split, tok, cfg.image.image_size, cfg.data.max_text_len, cache=True)
        start = time.perf_counter()
        for i in range(len(rows)):  # the first epoch's reads; later ones come from the cache
            rows[i]
        first_read_s = time.perf_counter() - start
        torch.manual_seed(0)
        self.module = MMFusionModule(cfg, tok)
        self.compiled = bool(cfg.train.compile and compile_blocks(self.module.model))
        self.dtype = torch.bfloat16 if bf16_native()[0] else None
        self.opt = torch.optim.AdamW(self.module.model.parameters(), lr=1e-4, fused=True)
        self.sampler = StepBatchSampler(len(rows), PIPELINE_BATCH, seed=0)
        self.paths = {
            "rows": (lambda idx: collate_items([rows[i] for i in idx]), None),
            "decoded": (lambda idx: collate_items(decoded.__getitems__(idx)), self.module.objective.layout),
        }
        self.info = {
            "rows": rows_n,
            "compiled": self.compiled,
            "precision": "bf16" if self.dtype else "fp32",
            "decode_s_per_1k_rows": decode_s / rows_n * 1000,
            "first_read_s_per_1k_rows": first_read_s / rows_n * 1000,
        }

    def seconds(self, path: str, steps: range) -> tuple[float, float]:
        """Seconds spent making the batches and in the model's step, over `steps`, by `path`."""
        import torch
        from lightning.fabric.utilities.apply_func import move_data_to_device

        module = self.module
        fetch, module.objective.layout = self.paths[path]
        outside = inside = 0.0
        for step in steps:
            t0 = time.perf_counter()
            batch = move_data_to_device(fetch(self.sampler.indices(step)), "cpu")  # as Lightning moves each batch
            built = module.token_batch(batch)
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype is not None):
                loss = module.objective.loss(module.model, built)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad()
            module.update_ema()
            t2 = time.perf_counter()
            outside, inside = outside + t1 - t0, inside + t2 - t1
        return outside, inside


def _sampling_model(grid: int = 4, token_dim: int = 192, **overrides: Any):  # noqa: ANN202
    import torch

    from mmfusion.model.config import ModelConfig
    from mmfusion.model.multimodal import MMFusionModel

    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "small", image_grid=(grid, grid), image_token_dim=token_dim, image_rope=True, vocab_size=400, **overrides
    )
    model = MMFusionModel(cfg).eval()
    torch.nn.init.normal_(model.image_head.weight, std=0.02)
    return model


def _sampling_times(
    model: Any, images: int, uncached: tuple[int, ...], ar_steps: tuple[int, ...] = (1, 4, 16), bf16: bool = False
) -> dict:
    """Seconds to sample `images` images with S = 1, 4, 16 AR steps (20 DDIM steps each, CFG 3), with
    the KV cache, and without it for the S in `uncached`; with `bf16`, also cached with the model's
    weights in bf16 (`to_dtype`), where this CPU multiplies bf16 natively. For cached float32 S = 1 and
    S = 16 also the time of the run's products and attention calls alone (`kernel_seconds`): the floor
    of S = 16 / S = 1 for any sampler that makes those calls."""
    import copy

    import torch

    from mmfusion.diffusion.config import DiffusionConfig
    from mmfusion.generation.diffusion import NextTokenDiffusionSampler
    from mmfusion.generation.settings import DiffusionSampling
    from mmfusion.runtime import bf16_native

    conds = [[1, 10 + i % 50, 20, 30, 3] for i in range(images)]
    unconds = [[1, 3]] * images
    h, w = model.cfg.image_grid
    out = {"images": images, "denoising_steps": 20, "tokens_per_image": h * w, "parameters": model.num_parameters()}
    variants = [("", model, True), ("", model, False)]
    floors: dict[int, Any] = {}  # cached float32 S = 1 and S = 16, for their products and attention alone
    if bf16 and bf16_native()[0]:
        variants.append(("_bf16", copy.deepcopy(model).to_dtype(torch.bfloat16), True))
    for steps in ar_steps:
        settings = DiffusionSampling(ar_steps=steps, sampler="ddim", steps=20, cfg_scale=3.0)
        for suffix, m, cached in variants:
            if not cached and steps not in uncached:
                continue
            smp = NextTokenDiffusionSampler(m, DiffusionConfig(), settings)
            gens = lambda: [torch.Generator().manual_seed(i) for i in range(images)]  # noqa: E731
            sec = timed(lambda: smp(conds, unconds, gens(), use_cache=cached), repeat=1 if not cached else 3)
            out[f"S={steps}_{'cached' if cached else 'uncached'}{suffix}_s"] = sec
            if cached and not suffix and steps in (1, 16):
                floors[steps] = lambda smp=smp: smp(conds, unconds, gens())
    for suffix in {suffix for suffix, _, _ in variants}:
        out[f"S16_over_S1_cached{suffix}"] = out[f"S=16_cached{suffix}_s"] / out[f"S=1_cached{suffix}_s"]
    if set(floors) == {1, 16}:
        s1, s16 = kernel_seconds(floors[1], floors[16])
        out["S=1_kernels_s"], out["S=16_kernels_s"] = s1["seconds"], s16["seconds"]
        out["S16_over_S1_kernels"] = s16["seconds"] / s1["seconds"]
    return out


def bench_sampling(quick: bool) -> dict:
    """CausalFusion sampling with the demo's model and token count: `small`, 4 x 4 pixel tokens."""
    return _sampling_times(_sampling_model(), 8 if quick else 32, uncached=(1, 4) if quick else (1, 4, 16), bf16=True)


def bench_sampling_batch(quick: bool) -> dict:
    """Cached S = 16 against S = 1 for the demo's model as the batch grows: the S = 16 passes carry one
    token per image, so their matrices have 2 x images rows (CFG) against 32 x images for S = 1."""
    model = _sampling_model()
    return {
        str(images): _sampling_times(model, images, uncached=(), ar_steps=(1, 16))
        for images in ((8, 32) if quick else (32, 128, 512))
    }


def bench_sampling_paper_tokens(quick: bool) -> dict:
    """CausalFusion sampling at the paper's token count (16 x 16 latent tokens of 16 dims, as for 256 px
    with an f8 VAE and patch 2) with a wider model (256 wide, 6 layers), cached only, in float32 and with
    bf16 weights."""
    model = _sampling_model(grid=16, token_dim=16, dim=256, n_layers=6, n_heads=4)
    return _sampling_times(model, 2 if quick else 8, uncached=(), bf16=True)


def bench_caption(quick: bool) -> dict:
    import copy

    import torch

    from mmfusion.generation.caption import CaptionDecoder
    from mmfusion.generation.settings import CaptionSampling
    from mmfusion.runtime import bf16_native

    model = _sampling_model()
    specials = dict(bos=1, boi=3, eoi=4, eos=2)
    dec = CaptionDecoder(model, **specials)
    b = 8 if quick else 32
    tokens = torch.randn(b, 16, 192)
    s = CaptionSampling(max_new_tokens=32, min_new_tokens=32)
    out = {"images": b, "new_tokens": 32}
    for cached in (True, False):
        sec = timed(lambda: dec(tokens, s, use_cache=cached), repeat=3)
        out[f"{'cached' if cached else 'uncached'}_tokens_per_s"] = b * 32 / sec
    out["speedup"] = out["cached_tokens_per_s"] / out["uncached_tokens_per_s"]
    if bf16_native()[0]:  # the same decoding with the weights in bf16 (`to_dtype`)
        low = CaptionDecoder(copy.deepcopy(model).to_dtype(torch.bfloat16), **specials)
        out["cached_bf16_tokens_per_s"] = b * 32 / timed(lambda: low(tokens, s), repeat=3)
    return out


def bench_token_shuffle(quick: bool) -> dict:
    """Discrete path at 64 px with an f4 VQ: 16 x 16 codes, fused s x s; train step (fp32, eager) and
    sampling."""
    import torch

    from mmfusion.config import ObjectiveConfig
    from mmfusion.diffusion.config import DiffusionConfig
    from mmfusion.generation.settings import TokenSampling
    from mmfusion.generation.tokens import ARImageSampler
    from mmfusion.model.config import ModelConfig
    from mmfusion.model.multimodal import MMFusionModel
    from mmfusion.training.objective import JointObjective

    torch.manual_seed(0)
    grid = 16
    out: dict[str, Any] = {"image_size": 64, "codes_per_image": grid * grid}
    for s in (1, 2, 4):
        cfg = ModelConfig.from_name(
            "small", image_codebook_size=1024, shuffle=s, image_grid=(grid // s, grid // s), vocab_size=400
        )
        model = MMFusionModel(cfg)
        obj = JointObjective(cfg, DiffusionConfig(), ObjectiveConfig(t2i_fraction=1.0), 1, 2, 3, 4)
        codes = torch.randint(0, 1024, (16, grid, grid))
        batch = obj.build(codes, [[10, 11, 12, 13, 14, 15, 16, 17]] * 16, None, torch.Generator().manual_seed(0))
        # the step as `mmfusion train` takes it in fp32 (fused AdamW, clipping), like the training rows
        train_s = timed(_train_step(model, obj, batch, None), repeat=2 if quick else 5, warmup=1)
        sampler = ARImageSampler(model.eval(), TokenSampling(top_k=100, cfg_scale=2.0, cfg_schedule="linear"))
        b = 4
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(b)]  # noqa: E731
        sample_s = timed(lambda: sampler([[1, 10, 11, 3]] * b, [[1, 3]] * b, gens()), repeat=1 if quick else 2)
        model.train()
        out[f"s={s}"] = {"tokens_per_image": (grid // s) ** 2, "train_step_s": train_s, "sample_s": sample_s}
    out["train_speedup_s2_vs_s1"] = out["s=1"]["train_step_s"] / out["s=2"]["train_step_s"]
    out["sample_speedup_s2_vs_s1"] = out["s=1"]["sample_s"] / out["s=2"]["sample_s"]
    return out


def bench_attention(quick: bool) -> dict:
    """Generalized causal mask at L = 1024 (condition 32 + clean and noisy groups): dense masked SDPA
    against FlexAttention with a block mask (compiled), forward only, 8 heads of 64."""
    import torch
    import torch.nn.functional as F

    from mmfusion.model.attention_backends import flex_attention_masked, flex_available
    from mmfusion.model.masks import generalized_causal_mask, layout

    n_groups = 8
    kind, group = layout(32, [62] * n_groups, clean_last_group=False)
    kind, group = kind[:, :1024], group[:, :1024]
    mask = generalized_causal_mask(kind, group)
    length = kind.shape[1]
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    out: dict[str, Any] = {"seq_len": length, "fraction_of_pairs_attended": float(mask.float().mean())}
    out["sdpa_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]), repeat=10)
    if flex_available():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        got = flex_attention_masked(q, k, v, mask)  # compiles on first use
        out["max_abs_diff"] = float((ref - got).abs().max())
        out["flex_s"] = timed(lambda: flex_attention_masked(q, k, v, mask), repeat=10, warmup=2)
        out["flex_speedup"] = out["sdpa_s"] / out["flex_s"]
    return out


# --- peers: mmfusion against transformers and diffusers on the same inputs, in turn ------------------
PEER_SHAPES = {  # LlamaConfig fields of the two backbones the peer items compare (vocabulary 512)
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2),
    "wide": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
}
PEER_ROWS = {"small": 16, "wide": 8}  # training rows of PACK_LENGTH text tokens per step
PEER_VOCAB = 512
PEER_SPECIALS = dict(bos=1, eos=2, boi=3, eoi=4)


def in_turn(fns: dict[str, Any], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each of `fns`, called in turn (A, B, A, B, ...) for `rounds` rounds after
    `warmup` calls of each: on a shared machine the two sides of a comparison meet the same load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += _durations(fn, 1)
    return {name: _median(t) for name, t in times.items()}


def peer_models(shape: dict, vocab: int = PEER_VOCAB, seed: int = 0) -> tuple[Any, Any]:
    """transformers' LlamaForCausalLM of `shape` (LlamaConfig fields) with SDPA attention, and mmfusion's
    MMFusionModel of the same config (`config_from_hf`) with its weights (`state_dict_from_hf`), SDPA
    attention and the text head in the compute dtype, as LLaMA's is (`fp32_head=False`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmfusion.model.hf import config_from_hf, state_dict_from_hf
    from mmfusion.model.multimodal import MMFusionModel

    torch.manual_seed(seed)
    specials = dict(bos_token_id=PEER_SPECIALS["bos"], eos_token_id=PEER_SPECIALS["eos"])
    kv = dict(num_key_value_heads=shape["num_attention_heads"])
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, attn_implementation="sdpa", **specials, **kv, **shape))
    ours = MMFusionModel(config_from_hf(hf.config, fp32_head=False, attention="sdpa"))
    _, unexpected = ours.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=False)
    assert not unexpected, unexpected
    return hf, ours


class HFCausalLoss:
    """transformers' causal-LM loss, in the form `_train_step` takes an objective: the labels are the
    input ids, shifted inside the model (mean cross-entropy over each row's next tokens)."""

    @staticmethod
    def loss(model: Any, ids: Any) -> dict:
        return {"loss": model(input_ids=ids, labels=ids).loss}


def peer_text_batch(ours: Any, rows: int, length: int = PACK_LENGTH, seed: int = 0) -> tuple[Any, Any, Any]:
    """`rows` random text rows of `length` tokens, full (no padding): (ids for transformers, the same rows
    as mmfusion's TokenBatch with the next-token labels, mmfusion's JointObjective with text weight 1,
    so that its loss is LLaMA's mean next-token cross-entropy)."""
    import torch

    from mmfusion.config import ObjectiveConfig
    from mmfusion.diffusion.config import DiffusionConfig
    from mmfusion.model.sequence import SequenceBuilder, collate
    from mmfusion.training.objective import JointObjective

    ids = torch.randint(5, ours.cfg.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))
    batch = collate([SequenceBuilder(0).text(r[:1]).text(r[1:], loss=True).tensors() for r in ids.tolist()])
    s = PEER_SPECIALS
    obj = JointObjective(
        ours.cfg, DiffusionConfig(), ObjectiveConfig(text_loss_weight=1.0), s["bos"], s["eos"], s["boi"], s["eoi"]
    )
    return ids, batch, obj


def bench_peers_train(quick: bool, shapes: dict | None = None, compiled: bool = True) -> dict:
    """The training step (forward, backward, clipping, fused AdamW: `_train_step`) of mmfusion's model
    against transformers' LlamaForCausalLM of the same shape and weights, on the same text rows, in turn:
    fp32 and (where this CPU multiplies bf16 natively) bf16 autocast, eager and with the transformer
    stack compiled on both sides (`compile_blocks`; transformers' `model.model`, the same flags)."""
    import torch

    from mmfusion.runtime import bf16_native
    from mmfusion.training.module import compile_blocks

    shapes = shapes or {name: PEER_SHAPES[name] for name in (("small",) if quick else PEER_SHAPES)}
    precisions = [("fp32", None)] + ([("bf16", torch.bfloat16)] if bf16_native()[0] else [])
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "row_tokens": PACK_LENGTH}
    for shape, fields in shapes.items():
        hf, ours = peer_models(fields)
        ids, batch, obj = peer_text_batch(ours, PEER_ROWS.get(shape, 4) // (2 if quick else 1))
        entry: dict[str, Any] = {"parameters": hf.num_parameters(), "tokens_per_step": ids.numel(), "shape": fields}
        for compile_now in (False, True) if compiled else (False,):
            if compile_now:
                if not compile_blocks(ours):
                    break
                hf.model.compile(dynamic=True)
            for name, dtype in precisions:
                steps = {
                    "transformers": _train_step(hf, HFCausalLoss, ids, dtype),
                    "mmfusion": _train_step(ours, obj, batch, dtype),
                }
                sec = in_turn(steps, rounds=3 if quick else 7, warmup=3 if compile_now else 2)
                entry[name + (" compiled" if compile_now else "")] = {
                    "transformers_s": sec["transformers"],
                    "mmfusion_s": sec["mmfusion"],
                    "ratio": sec["mmfusion"] / sec["transformers"],
                }
        out[shape] = entry
    return out


def peer_decoders(hf: Any, ours: Any, prompts: Any, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding of `new_tokens` tokens after `prompts` (B, P) text ids, <eos> barred until then on
    both sides: transformers' `generate` (its KV cache) and mmfusion's caption loop with its KV cache
    (`CaptionDecoder.decode` of text-only prefix rows). Each returns the new ids (B, new_tokens)."""
    import torch

    from mmfusion.generation.caption import CaptionDecoder
    from mmfusion.generation.settings import CaptionSampling
    from mmfusion.model.sequence import SequenceBuilder

    hf, ours = hf.eval(), ours.eval()
    eos, width = PEER_SPECIALS["eos"], prompts.shape[1]
    decoder = CaptionDecoder(ours, **PEER_SPECIALS)
    rows = [SequenceBuilder(0).text(r, prompt=True).tensors() for r in prompts.tolist()]
    settings = CaptionSampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos)

    def transformers() -> Any:
        with torch.inference_mode():
            mask = torch.ones_like(prompts)
            return hf.generate(prompts, attention_mask=mask, pad_token_id=eos, **kwargs)[:, width:].clone()

    return {"transformers": transformers, "mmfusion": lambda: torch.tensor(decoder.decode(rows, settings))}


def bench_peers_decode(quick: bool, shapes: dict | None = None) -> dict:
    """Greedy text decoding with a KV cache, mmfusion's caption loop against transformers' `generate`,
    same weights (`peer_models`), same prompts (8 random tokens per row), the same count of new tokens,
    float32, in turn; with whether both decoded the same ids."""
    import torch

    shapes = shapes or {name: PEER_SHAPES[name] for name in (("small",) if quick else PEER_SHAPES)}
    rows, new_tokens = (8, 16) if quick else (32, 32)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "rows": rows, "prompt": 8, "new_tokens": new_tokens}
    for shape, fields in shapes.items():
        hf, ours = peer_models(fields)
        prompts = torch.randint(5, PEER_VOCAB, (rows, 8), generator=torch.Generator().manual_seed(0))
        fns = peer_decoders(hf, ours, prompts, new_tokens)
        same = bool(torch.equal(fns["transformers"](), fns["mmfusion"]()))
        sec = in_turn(fns, rounds=3 if quick else 7)
        out[shape] = {
            "parameters": hf.num_parameters(),
            "shape": fields,
            "same_ids": same,
            **{f"{name}_tokens_per_s": rows * new_tokens / s for name, s in sec.items()},
            "ratio": sec["mmfusion"] / sec["transformers"],  # time per token, mmfusion / transformers
        }
    return out


def diffusers_loop(model: Any, diffusion: Any, settings: Any, conds: list, unconds: list, generators: list) -> Any:
    """One-step (S = 1) sampling as a diffusers pipeline writes it: the scheduler's `set_timesteps`, then
    at each timestep the network over the whole sequence (condition and all the noisy tokens, no KV
    cache), classifier-free guidance over the conditional and unconditional rows, `scheduler.step`.
    The noise is drawn as mmfusion's sampler draws it in raster order (one generator per image), so both
    make the same images. Returns the image tokens (B, N, C)."""
    import torch

    from mmfusion.generation.common import guide
    from mmfusion.model.masks import NOISY
    from mmfusion.model.sequence import SequenceBuilder, collate, place_rows, row_index, select_rows

    n, dim, b = model.cfg.num_image_tokens, model.cfg.image_token_dim, len(conds)
    scheduler = diffusion.make_scheduler(settings.sampler)
    scheduler.set_timesteps(settings.steps)
    kwargs = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    zeros, grid, group = torch.zeros(n, dim), torch.arange(n), torch.zeros(n, dtype=torch.long)
    with torch.inference_mode():
        samples = [
            SequenceBuilder(dim).text(p, prompt=True).image(zeros, grid, kind=NOISY, group=group).end_image().tensors()
            for p in conds + unconds
        ]
        batch = collate(samples)
        noisy = batch.kind == NOISY
        rows = row_index(noisy)
        x = torch.stack([torch.randn(n, dim, generator=g) for g in generators])
        for t in scheduler.timesteps:
            batch.values = place_rows(batch.values, rows, torch.cat([x, x]).flatten(0, 1))
            batch.t = noisy * int(t)
            pred = model.image_output(select_rows(model(batch), rows)).float().view(2 * b, n, dim)
            pred = guide(pred, b, settings.cfg_scale)
            if diffusion.prediction_type == "sample" and diffusion.clip_sample:
                pred = pred.clamp(-1.0, 1.0)  # as mmfusion's sampler clips a guided x0
            x = scheduler.step(pred, t, x, generator=generators, **kwargs).prev_sample
    return x.clone()


def peer_samplers(model: Any, images: int, settings: Any) -> dict[str, Any]:
    """The two sides of `bench_peers_sampling` for `images` prompts: the diffusers loop and mmfusion's
    NextTokenDiffusionSampler (KV cache for the condition), same model, settings and generators."""
    import torch

    from mmfusion.diffusion.config import DiffusionConfig
    from mmfusion.generation.diffusion import NextTokenDiffusionSampler

    conds = [[1, 10 + i % 50, 20, 30, 3] for i in range(images)]
    unconds = [[1, 3]] * images
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(images)]  # noqa: E731
    sampler = NextTokenDiffusionSampler(model, DiffusionConfig(), settings)
    return {
        "diffusers": lambda: diffusers_loop(model, DiffusionConfig(), settings, conds, unconds, gens()),
        "mmfusion": lambda: sampler(conds, unconds, gens()),
    }


def bench_peers_sampling(quick: bool, cases: list[tuple[str, str, int, int]] | None = None) -> dict:
    """One-step (S = 1) image sampling, CFG 3: mmfusion's sampler against the diffusers scheduler loop
    driving the same network (`diffusers_loop`), in turn: DDIM 20 and DDPM 50 steps for the demo's
    model (`small`, 16 pixel tokens per image), DDIM 20 at the paper's 256 tokens per image; with the
    largest difference between the two sides' images, against their scale. `cases`: (model, sampler,
    steps, images) each, instead of these (tests)."""
    import torch

    from mmfusion.generation.settings import DiffusionSampling

    full = [("demo", "ddim", 20, 32), ("demo", "ddpm", 50, 32), ("paper", "ddim", 20, 4)]
    cases = cases or ([("demo", "ddim", 5, 4), ("demo", "ddpm", 10, 4)] if quick else full)
    models = {"demo": _sampling_model, "paper": lambda: _sampling_model(16, 16, dim=256, n_layers=6, n_heads=4)}
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for model_name, sampler, steps, images in cases:
        model = models[model_name]()
        settings = DiffusionSampling(ar_steps=1, order="raster", sampler=sampler, steps=steps, cfg_scale=3.0)
        fns = peer_samplers(model, images, settings)
        ref, got = fns["diffusers"](), fns["mmfusion"]()
        sec = in_turn(fns, rounds=3 if quick or model_name == "paper" else 5)
        out[f"{model_name} {sampler} {steps}"] = {
            "images": images,
            "tokens_per_image": model.cfg.num_image_tokens,
            "diffusers_s": sec["diffusers"],
            "mmfusion_s": sec["mmfusion"],
            "ratio": sec["mmfusion"] / sec["diffusers"],
            "max_abs_diff": float((ref - got).abs().max()),
            "max_abs": float(ref.abs().max()),
        }
    return out


# --- serving ------------------------------------------------------------------------------------
def serve_model_folder(folder: Path) -> Path:
    """The model `mmfusion serve` is timed with: MMFUSION_BENCH_MODEL (a trained demo model) or else the
    demo's architecture trained for one step on a small shapes set (the same work per image or caption:
    the timed captions decode a fixed number of tokens)."""
    if os.environ.get("MMFUSION_BENCH_MODEL"):
        return Path(os.environ["MMFUSION_BENCH_MODEL"])
    from mmfusion.config import load_config
    from mmfusion.training.demo import DEMO_CONFIG
    from mmfusion.training.run import train

    overrides = ["train.max_steps=1", "train.compile=false", "data.shapes_n=512", "data.global_batch_size=8"]
    return train(load_config(DEMO_CONFIG, [*overrides, f"train.out={folder}", "train.max_time_minutes=10"]))


SERVE_MAX_BATCH = 16  # the server's samples per model call (`mmfusion serve --max-batch`)


def _start_server(model: Path, port: int, concurrency: int, log: Path) -> Any:
    import urllib.request

    cmd = [sys.executable, "-m", "mmfusion.cli.main", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--concurrency", str(concurrency), "--max-queue", "256", "--max-batch", str(SERVE_MAX_BATCH)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the server stopped: {log.read_text()[-500:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer in 120 s")


def _request(client: Any, url: str, api_name: str, data: list, session: str = "") -> Any:
    """One call of a served endpoint through Gradio's documented HTTP API (what `curl` does: post the
    inputs, read the result from the event stream), fetching the images it returns; raises on an error
    event. `session`: the session the request belongs to, as a browser tab sends it. Not gradio_client:
    its thread and stream per job cost the client far more CPU, which on shared cores the server would
    pay for (docs/BENCHMARKS.md)."""
    import json as _json

    body = {"data": data, "session_hash": session} if session else {"data": data}
    event = client.post(f"{url}gradio_api/call/{api_name}", json=body).json()["event_id"]
    kind, result = None, None
    with client.stream("GET", f"{url}gradio_api/call/{api_name}/{event}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                result = _json.loads(line[5:]) if kind == "complete" else line[5:].strip()
                break
    if kind != "complete":
        raise RuntimeError(f"{api_name}: {result}")
    if api_name == "text_to_image":
        for item in result[0]:
            client.get(item["image"]["url"]).raise_for_status()
    return result


def _json_request(client: Any, url: str, path: str, body: dict) -> dict:
    """One call of the server's JSON API (`mmfusion.serving.rest`): one POST, one answer; raises on an
    error answer."""
    r = client.post(f"{url}{path}", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
    return r.json()


def _client_load(url: str, jobs: list, clients: int, api_name: str) -> tuple[float, list]:
    """`jobs` (the inputs of each request) from `clients` concurrent clients, each a session of its own
    sending its share one after another: (wall seconds, [(latency s, result)] in the order of `jobs`).
    `api_name` is a page endpoint (Gradio's API, `jobs` are lists of inputs) or a JSON API path such as
    "v1/generate" (`jobs` are request bodies)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    pool = [httpx.Client(timeout=600) for _ in range(clients)]

    def run(k: int) -> list:
        done = []
        for j in range(k, len(jobs), clients):
            start = time.perf_counter()
            if api_name.startswith("v1/"):
                result = _json_request(pool[k], url, api_name, jobs[j])
            else:
                result = _request(pool[k], url, api_name, jobs[j], session=f"bench-client-{k}")
            done.append((j, time.perf_counter() - start, result))
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = sorted(r for share in ex.map(run, range(clients)) for r in share)
    for c in pool:
        c.close()
    return time.perf_counter() - start, [(sec, result) for _, sec, result in results]


def _latency(results: list) -> dict:
    import numpy as np

    lat = np.array([sec for sec, _ in results])
    return {"p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95))}


def bench_serve(quick: bool) -> dict:
    """`mmfusion serve` under load, on loopback: text-to-image requests of one image and of four (the
    page's default), and caption requests, each kind from concurrent clients against the server in its
    own process, and the same work through the Python API in one process (`pipe.generate` /
    `pipe.caption` on the whole list), timed in turn. Captions are greedy, and also decoded the model's
    own way (what the page and the JSON API do when no method is named; the demo's: beam search with
    each candidate checked by redrawing the image), 16 tokens each. Each kind is sent through the page's API
    (Gradio's: post, then read an event stream) and then through the JSON API (one POST; a caption's
    image travels in its request). Every request must come back whole (its images, with their seeds; a
    caption); the ratio of images (captions) per second, server over API, is what serving costs."""
    import dataclasses
    import socket
    import tempfile

    import torch

    from mmfusion.data.shapes import render_example
    from mmfusion.evaluation.shapes import benchmark_prompts
    from mmfusion.image_io import open_image
    from mmfusion.pipeline import MMFusion

    n, clients, steps = (8, 4, 5) if quick else (64, 8, 50)
    work = Path(tempfile.mkdtemp(prefix="mmfusion-bench-serve-"))
    pipe = MMFusion.from_pretrained(serve_model_folder(work / "run"))
    # the model's own decoding (the demo's: beam search, candidates checked by redrawing) at a fixed length,
    # the same work for any weights; greedy requests ask for greedy
    own = dataclasses.replace(pipe.sampling.caption, max_new_tokens=16, min_new_tokens=16)
    pipe.sampling = dataclasses.replace(pipe.sampling, caption=own)
    pipe.save_pretrained(work / "served")  # served with those caption settings as its defaults
    prompts = benchmark_prompts(n // 2, n - n // 2, seed=0)
    paths = [work / f"test_{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        render_example(0, "test", i, pipe.image_cfg.image_size)["image"].save(path)
    pils = [open_image(path) for path in paths]
    # in the order of the page's controls: the served requests send the values by position
    sampler = dict(ar_steps=1, order="random", sampler="ddpm", steps=steps, temperature=1.0, cfg_scale=3.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    out: dict[str, Any] = {"requests": n, "clients": clients, "steps": steps, "threads": torch.get_num_threads()}
    cases = {"t2i_1": 1, "t2i_4": 4, "caption": 1, "caption_4": 4, "caption_own": 1}  # samples a request
    page_kinds = ("t2i_1", "t2i_4", "caption", "caption_own")  # the page captions one image at a time
    json_kinds = tuple(cases)
    out["own_decoding"] = {"method": own.method, "num_beams": own.num_beams, "rerank_weight": own.rerank_weight}
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    size = (pipe.image_cfg.image_size,) * 2

    captions: dict[str, list[str]] = {}  # the API's captions of each kind: what the server must answer

    def api(case: str, batch: int | None = None) -> Any:
        """The Python API on the whole list: in its own batches, or in `batch`es (`clients_batch`)."""
        size = {"batch_size": batch} if batch else {}
        per = cases[case]
        if case.startswith("caption"):
            method = {} if case == "caption_own" else {"method": "greedy"}
            return lambda: captions.__setitem__(case, pipe.caption(pils * per, **size, **method))
        return lambda: pipe.generate(prompts, num_images=per, **sampler, **size)

    def clients_batch(case: str) -> int:
        """The largest batch the clients can make: each waits for its answer before it asks again."""
        return min(SERVE_MAX_BATCH, clients * cases[case])

    def served(case: str) -> tuple[float, list]:
        if case.startswith("json_"):
            path = "v1/caption" if case.startswith("json_caption") else "v1/generate"
            return _client_load(url, json_jobs(case[5:]), clients, path)
        if case.startswith("caption"):
            method, beams = (own.method, own.num_beams) if case == "caption_own" else ("greedy", 1)
            file = {"meta": {"_type": "gradio.FileData"}}
            uploads = [[{"path": str(p), **file}, method, beams, 0.9, 1.0, 0] for p in paths]
            return _client_load(url, _uploaded(url, uploads), clients, "caption")
        per = cases[case]
        jobs = [[p, "", per, k * per, *sampler.values()] for k, p in enumerate(prompts)]
        return _client_load(url, jobs, clients, "text_to_image")

    def json_jobs(case: str) -> list[dict]:
        per = cases[case]
        if case == "caption_own":  # no method named: the model's own
            return [{"image": data} for data in encoded]
        if case == "caption":  # each request carries its image, base64-encoded
            return [{"image": data, "method": "greedy"} for data in encoded]
        if case.startswith("caption"):  # request k: the images the API captions at k * per .. k * per + per - 1
            return [{"images": [encoded[(k * per + j) % n] for j in range(per)], "method": "greedy"} for k in range(n)]
        return [{"prompt": p, "num_images": per, "seed": k * per, **sampler} for k, p in enumerate(prompts)]

    def whole(case: str, got: list) -> int:
        """Requests answered in full: the API's captions (greedy: the same text), or images with the seeds
        asked for (the page's were each downloaded; the JSON API's must decode to the model's size)."""
        kind = case.removeprefix("json_")
        per = cases[kind]
        want = [[k * per + j for j in range(per)] for k in range(n)]
        if kind.startswith("caption"):
            texts = [[r[0]] if kind == case else r.get("captions", [r.get("caption")]) for _, r in got]
            return sum(t == [captions[kind][i % (n * per)] for i in w] for t, w in zip(texts, want))
        if case.startswith("json_"):
            return sum(
                [item["seed"] for item in r["images"]] == w
                and all(_png_size(item["png"]) == size for item in r["images"])
                for (_, r), w in zip(got, want)
            )
        return sum([item["caption"] for item in r[0]] == [f"seed {s}" for s in w] for (_, r), w in zip(got, want))

    for case in cases:
        api(case)()  # warm-up
    server = _start_server(work / "served", port, clients, work / "server.log")
    try:
        served("t2i_1")  # warm-up
        for case in (*page_kinds, *(f"json_{kind}" for kind in json_kinds)):
            kind = case.removeprefix("json_")
            api_s, ceiling_s, server_s, complete = [], [], [], []
            for _ in range(1 if quick else 3):  # in turn; the median of three
                api_s.append(timed(api(kind), repeat=1, warmup=0))
                ceiling_s.append(timed(api(kind, clients_batch(kind)), repeat=1, warmup=0))
                sec, got = served(case)
                server_s.append(sec)
                complete.append(whole(case, got))
            samples = n * cases[kind]
            out[case] = {
                "samples": samples,
                "complete": min(complete),  # in the worst round
                **_latency(got),
                "api_per_s": samples / _median(api_s),
                "server_per_s": samples / _median(server_s),
                "ratio": _median(api_s) / _median(server_s),
                "clients_batch": clients_batch(kind),
                "api_clients_batch_per_s": samples / _median(ceiling_s),
            }
    finally:
        server.terminate()
        server.wait(30)
    return out


def _png_size(data: str) -> tuple[int, int]:
    """The size of a base64 PNG as the JSON API returns images."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return im.size


def bench_compiled(quick: bool, model: Path | None = None) -> dict:
    """`pipe.compile()` against the eager pipeline on the same weights, called in turn in one process
    (`in_turn`): images at S = 1 (50 DDPM steps, CFG 3) and greedy captions of 16 tokens, at batches of
    one and more. Reports the seconds a call of each, their ratio, the seconds of compiling every kind
    first, and whether the two give the same captions and images (to a level of rounding). `model`: the
    weights (default: `serve_model_folder`, the demo's architecture)."""
    import dataclasses
    import tempfile

    import numpy as np

    from mmfusion.data.shapes import render_example
    from mmfusion.evaluation.shapes import benchmark_prompts
    from mmfusion.generation.settings import CaptionSampling
    from mmfusion.model.transformer import can_compile
    from mmfusion.pipeline import MMFusion

    if not can_compile("cpu"):
        return {"skipped": "no C++ compiler"}
    folder = model or serve_model_folder(Path(tempfile.mkdtemp(prefix="mmfusion-bench-compiled-")) / "run")
    fixed = CaptionSampling(method="greedy", max_new_tokens=16, min_new_tokens=16)
    eager, compiled = (MMFusion.from_pretrained(folder) for _ in range(2))
    for pipe in (eager, compiled):
        pipe.sampling = dataclasses.replace(pipe.sampling, caption=fixed)
    start = time.perf_counter()
    compiled.compile()
    steps = 5 if quick else 50
    prompts = benchmark_prompts(4, 4, seed=0)
    images = [render_example(0, "test", i, eager.image_cfg.image_size)["image"] for i in range(32)]
    sampler = dict(ar_steps=1, order="random", sampler="ddpm", steps=steps, cfg_scale=3.0)
    work = {f"images_{b}": (lambda p, b=b: p.generate(prompts[:b], batch_size=b, **sampler)) for b in (1, 8)}
    work |= {f"captions_{b}": (lambda p, b=b: p.caption(images[:b], batch_size=b)) for b in (1, 8, 32)}
    for fn in work.values():  # every kind compiled before any is timed
        fn(compiled)
    out: dict[str, Any] = {"compile_s": time.perf_counter() - start, "steps": steps}
    for name, fn in work.items():
        t = in_turn({"eager": lambda fn=fn: fn(eager), "compiled": lambda fn=fn: fn(compiled)}, 2 if quick else 5)
        out[name] = {**t, "speedup": t["eager"] / t["compiled"]}
    a, b = eager.generate(prompts, seed=3, **sampler), compiled.generate(prompts, seed=3, **sampler)
    out["max_pixel_diff"] = int(
        max(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() for x, y in zip(a, b))
    )
    out["same_captions"] = eager.caption(images) == compiled.caption(images)
    return out


def _compiled_rows(r: dict, f: Any) -> list[str]:
    if "skipped" in r:
        return [f"`pipe.compile()` against eager: skipped ({r['skipped']})", ""]
    lines = [
        f"| `pipe.compile()` against eager, in turn (images: S = 1, {r.get('steps')} DDPM steps, CFG 3; captions: "
        "16 tokens, greedy) | eager s | compiled s | speed-up |",
        "|---|---|---|---|",
    ]
    for key, name in (("images", "images"), ("captions", "captions")):
        for batch in (1, 8, 32):
            t = r.get(f"{key}_{batch}")
            if t:
                lines.append(
                    f"| {name}, batch {batch} | {f(t['eager'])} | {f(t['compiled'])} | {f(t['speedup'], '.2f')}x |"
                )
    lines.append(
        f"\nCompiling every kind first: {f(r.get('compile_s'), '.0f')} s. The same captions: "
        f"{r.get('same_captions')}; images at most {r.get('max_pixel_diff')} level(s) apart."
    )
    return [*lines, ""]


def _uploaded(url: str, jobs: list[list]) -> list[list]:
    """`jobs` with each image file uploaded to the server first (as the page uploads a dropped file)."""
    import httpx

    with httpx.Client(timeout=60) as client:
        for job in jobs:
            path = job[0]["path"]
            with open(path, "rb") as f:
                job[0] = {**job[0], "path": client.post(f"{url}gradio_api/upload", files={"files": f}).json()[0]}
    return jobs


BENCHES = {
    "matmul": bench_matmul,
    "train_tiny": lambda quick: bench_train("tiny", quick),
    "train_small": lambda quick: bench_train("small", quick),
    "train_width": bench_train_width,
    "pipeline": bench_pipeline,
    "finetune": bench_finetune,
    "sampling": bench_sampling,
    "sampling_batch": bench_sampling_batch,
    "sampling_paper_tokens": bench_sampling_paper_tokens,
    "caption": bench_caption,
    "token_shuffle": bench_token_shuffle,
    "attention": bench_attention,
    "peers_train": bench_peers_train,
    "peers_decode": bench_peers_decode,
    "peers_sampling": bench_peers_sampling,
    "serve": bench_serve,
    "compiled": bench_compiled,
}


# --- driver ------------------------------------------------------------------------------------
def run_one(name: str, quick: bool) -> dict:
    import torch

    from mmfusion.runtime import tune_malloc

    tune_malloc()  # as `mmfusion train` and the CLI do
    torch.set_num_threads(int(os.environ.get("MMFUSION_BENCH_THREADS", torch.get_num_threads())))
    baseline = peak_rss_mb()
    result = BENCHES[name](quick)
    result["peak_rss_mb"] = peak_rss_mb()
    result["baseline_rss_mb"] = baseline
    return result


MATMUL_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def cpu_name() -> str:
    """The CPU model with the matmul features that decide the results (AVX-512, AVX512-BF16, AMX), e.g.
    "Intel(R) Xeon(R) Platinum 8488C (avx512f amx_bf16 avx512_bf16)": `--only` carries results over
    only between runs on the same CPU. Linux reads /proc/cpuinfo; elsewhere the platform's name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    have = sorted(set(flags.group(1).split()) & MATMUL_FLAGS) if flags else []
    name = model.group(1).strip() if model else platform.processor() or platform.machine()
    return f"{name} ({' '.join(have)})" if have else name


def machine_info() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
    }


def run_all(names: list[str], quick: bool, previous: dict | None = None) -> dict:
    """Run the benches `names`, each in its own process. The other benches' results are carried over
    from `previous` (an earlier run's JSON, as `--only` passes it) when that run was on this machine,
    with the same torch and mode; each result keeps the date of the run that measured it."""
    results: dict[str, Any] = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
    }
    if previous and previous.get("machine") == results["machine"] and previous.get("quick") == quick:
        for name in BENCHES:
            if name not in names and isinstance(previous.get(name), dict):
                results[name] = {**previous[name], "date": previous[name].get("date", previous.get("date"))}
    elif previous:
        print("[bench] the earlier results are from another machine, torch or mode: not carried over", flush=True)
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name]["date"] = results["date"]
        print(f"[bench] {name}: {json.dumps(results[name])[:300]}", flush=True)
    return results


def _fmt(x: Any, fmt: str = ".3g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def render_markdown(r: dict) -> str:
    """The tables of BENCHMARKS.md: one per item this run measured or carried over, none of n/a rows."""
    lines = [
        f"Measured {r['date']} on {r['machine']['cores']} cores ({r['machine']['cpu']}), torch "
        f"{r['machine']['torch']}{' (quick mode)' if r.get('quick') else ''}.",
        "",
    ]
    older = [f"{name} ({r[name]['date']})" for name in BENCHES if r.get(name, {}).get("date", r["date"]) != r["date"]]
    if older:
        lines += [f"Carried over from earlier runs on this machine (`--only` re-ran the rest): {', '.join(older)}.", ""]
    failed = [f"{name} ({r[name]['error']})" for name in BENCHES if "error" in r.get(name, {})]
    if failed:
        lines += [f"Failed: {'; '.join(failed)}.", ""]
    has = {name: bool(r.get(name)) and "error" not in r[name] for name in BENCHES}
    if has["matmul"]:
        lines += _matmul_rows(r["matmul"])
    if has["train_tiny"] or has["train_small"]:
        lines += _train_rows({key: r.get(key, {}) for key in ("train_tiny", "train_small")})
    for name, rows in TABLES.items():
        if has[name]:
            lines += rows(r[name], _fmt)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def _matmul_rows(m: dict) -> list[str]:
    native = "" if m.get("bf16_native", True) else " (emulated: this CPU has no native bf16)"
    return [
        "| matmul peak | GFLOP/s |",
        "|---|---|",
        f"| fp32 {m.get('n')}^3 | {_fmt(m.get('fp32_gflops'), '.0f')} |",
        f"| bf16 {m.get('bf16_n', m.get('n'))}^3 | {_fmt(m.get('bf16_gflops'), '.0f')}{native} |",
        "",
    ]


def _train_rows(items: dict[str, dict]) -> list[str]:
    f = _fmt
    lines = [
        f"| training (batch 64, shapes, patch 8; packed: rows of {PACK_LENGTH} tokens) | params | tokens/step | "
        "precision | step s | tokens/s | achieved GFLOP/s | matmul peak | MFU | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    variants = ("", " compiled", " compiled packed", DDP_ROW)
    for key, t in items.items():
        for prec in (p + v for p in ("fp32", "bf16") for v in variants):
            p = t.get(prec, {})
            if not p:
                continue
            if "skipped" in p:
                lines.append(f"| {t.get('preset', key)} | | | {prec} | skipped: {p['skipped']} | | | | | |")
                continue
            per_process = " per process" if "peak_rss_mb_per_process" in p else ""
            lines.append(
                f"| {t.get('preset', key)} | {f(t.get('parameters'), ',')} | {t.get('tokens_per_step')} | "
                f"{prec} | {f(p.get('step_s'))} | {f(p.get('tokens_per_s'), '.0f')} | "
                f"{f(p.get('achieved_gflops'), '.0f')} | {f(p.get('matmul_peak_gflops'), '.0f')} | "
                f"{f(p.get('mfu'), '.1%')} | {f(p.get('peak_rss_mb_per_process', t.get('peak_rss_mb')), '.0f')}"
                f"{per_process} |"
            )
    return [*lines, ""]


def _sampling_rows(s: dict, f: Any) -> list[str]:
    lines = [
        f"| sampling ({s.get('images')} images, {s.get('denoising_steps')} DDIM steps per AR step, CFG) | "
        "cached s | uncached s | cached s, bf16 weights |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| S = {steps} | {f(s.get(f'S={steps}_cached_s'))} | {f(s.get(f'S={steps}_uncached_s'))} | "
        f"{f(s.get(f'S={steps}_cached_bf16_s'))} |"
        for steps in (1, 4, 16)
    ]
    lines.append(
        f"| S = 16 / S = 1, cached | {f(s.get('S16_over_S1_cached'))} | | {f(s.get('S16_over_S1_cached_bf16'))} |"
    )
    if "S16_over_S1_kernels" in s:
        lines.append(f"| S = 16 / S = 1, {KERNELS_ALONE} | {f(s['S16_over_S1_kernels'])} | | |")
    lines.append("")
    return lines


def _sampling_batch_rows(batches: dict, f: Any) -> list[str]:
    lines = [
        "| sampling with the demo's model, by batch (cached) | S = 1 s | S = 16 s | S = 16 / S = 1 | "
        f"S = 16 / S = 1, {KERNELS_ALONE} |"
    ]
    lines += ["|---|---|---|---|---|"]
    lines += [
        f"| {images} images | {f(e.get('S=1_cached_s'))} | {f(e.get('S=16_cached_s'))} | "
        f"{f(e.get('S16_over_S1_cached'))} | {f(e.get('S16_over_S1_kernels'))} |"
        for images, e in batches.items()
        if isinstance(e, dict)
    ]
    lines.append("")
    return lines


def _sampling_paper_tokens_rows(sp: dict, f: Any) -> list[str]:
    lines = [
        f"| sampling at the paper's token count ({sp.get('tokens_per_image')} tokens per image, "
        f"{f(sp.get('parameters'), ',')} params, {sp.get('images')} images, 20 DDIM steps, CFG) | cached s | "
        "cached s, bf16 weights |",
        "|---|---|---|",
    ]
    lines += [
        f"| S = {steps} | {f(sp.get(f'S={steps}_cached_s'))} | {f(sp.get(f'S={steps}_cached_bf16_s'))} |"
        for steps in (1, 4, 16)
    ]
    lines.append(f"| S = 16 / S = 1 | {f(sp.get('S16_over_S1_cached'))} | {f(sp.get('S16_over_S1_cached_bf16'))} |")
    if "S16_over_S1_kernels" in sp:
        lines.append(f"| S = 16 / S = 1, {KERNELS_ALONE} | {f(sp['S16_over_S1_kernels'])} | |")
    lines.append("")
    return lines


def _caption_rows(c: dict, f: Any) -> list[str]:
    lines = [
        "| captioning (32 new tokens) | tokens/s |",
        "|---|---|",
        f"| KV cache | {f(c.get('cached_tokens_per_s'), '.0f')} |",
        f"| no cache | {f(c.get('uncached_tokens_per_s'), '.0f')} |",
        f"| speed-up | {f(c.get('speedup'), '.1f')}x |",
    ]
    if "cached_bf16_tokens_per_s" in c:
        lines.append(f"| KV cache, bf16 weights | {f(c['cached_bf16_tokens_per_s'], '.0f')} |")
    lines.append("")
    return lines


def _token_shuffle_rows(ts: dict, f: Any) -> list[str]:
    lines = [
        "| Token-Shuffle (64 px, 16 x 16 codes) | tokens / image | train step s | sampling s (4 images) |",
        "|---|---|---|---|",
    ]
    for s_ in (1, 2, 4):
        e = ts.get(f"s={s_}", {})
        lines.append(
            f"| s = {s_} | {e.get('tokens_per_image')} | {f(e.get('train_step_s'))} | {f(e.get('sample_s'))} |"
        )
    lines += [
        f"| s = 2 speed-up over s = 1 | | {f(ts.get('train_speedup_s2_vs_s1'), '.1f')}x | "
        f"{f(ts.get('sample_speedup_s2_vs_s1'), '.1f')}x |",
        "",
    ]
    return lines


def _attention_rows(a: dict, f: Any) -> list[str]:
    lines = [
        f"| generalized causal mask, L = {a.get('seq_len')}, forward | seconds |",
        "|---|---|",
        f"| dense masked SDPA | {f(a.get('sdpa_s'))} |",
        f"| FlexAttention block mask (compiled) | {f(a.get('flex_s'))} |",
        f"| speed-up of flex | {f(a.get('flex_speedup'), '.2f')}x (max abs diff {f(a.get('max_abs_diff'), '.1e')}) |",
    ]
    return lines


def train_width_rows(w: dict, f: Any) -> list[str]:
    """The table of `bench_train_width`: MFU of each width and precision."""
    lines = [
        f"| training by width ({w.get('layers')} layers, heads of {w.get('head_dim')}, batch {w.get('batch')}, "
        f"packed: rows of {PACK_LENGTH} tokens{', compiled' if w.get('compiled') else ''}, {w.get('threads')} "
        f"thread{'s' if w.get('threads') != 1 else ''}) | params | "
        "model GFLOP/step | precision | step s | tokens/s | achieved GFLOP/s | matmul peak | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in w.items():
        if not key.startswith("dim="):
            continue
        for prec in ("fp32", "bf16"):
            p = row.get(prec)
            if not p:
                continue
            head = f"| {key} | {f(row.get('parameters'), ',')} | {f(row.get('model_gflops_per_step'))} | {prec} |"
            if "skipped" in p:
                lines.append(f"{head} skipped: {p['skipped']} | | | | |")
                continue
            lines.append(
                f"{head} {f(p.get('step_s'))} | {f(p.get('tokens_per_s'), '.0f')} | "
                f"{f(p.get('achieved_gflops'), '.0f')} | {f(p.get('matmul_peak_gflops'), '.0f')} | "
                f"{f(p.get('mfu'), '.1%')} |"
            )
    return [*lines, ""]


def pipeline_rows(p: dict, f: Any) -> list[str]:
    """The table of `bench_pipeline`: each path's samples/s and where its step goes."""
    head = (
        f"| the demo's training step, one process ({p.get('batch')} samples, {p.get('threads')} thread, "
        f"{p.get('precision')}{', compiled' if p.get('compiled') else ''}) | samples/s | batch ms | model step ms | "
        "outside forward, backward, optimizer |"
    )
    lines = [head, "|---|---|---|---|---|"]
    names = {"rows": "rows read one by one (warm), laid out per sample", "decoded": "decoded rows, whole-batch layout"}
    for key, name in names.items():
        e = p.get(key, {})
        lines.append(
            f"| {name} | {f(e.get('samples_per_s'), '.0f')} | {f(e.get('batch_ms'), '.3g')} | "
            f"{f(e.get('model_step_ms'), '.3g')} | {f(e.get('outside_share'), '.1%')} |"
        )
    lines += [
        f"| speed-up | {f(p.get('speedup'), '.2f')}x | | | |",
        "",
        f"Decoding the rows once: {f(p.get('decode_s_per_1k_rows'), '.2f')} s per 1,000 rows; reading them one by one "
        f"the first time (the row path's first epoch): {f(p.get('first_read_s_per_1k_rows'), '.2f')} s per 1,000.",
        "",
    ]
    return lines


def finetune_rows(r: dict, f: Any) -> list[str]:
    """The table of `bench_finetune`: each variant's step, and LoRA's two ratios."""
    lines = [
        f"| the fine-tuning step, `{r.get('preset')}` ({r.get('precision')}"
        f"{', compiled' if r.get('compiled') else ''}, packed rows, in turn) | trainable | step s | step / full's |",
        "|---|---|---|---|",
    ]
    for key, name in FINETUNE_VARIANTS.items():
        e = r.get(key, {})
        lines.append(
            f"| {name} | {f(e.get('trainable_parameters'), ',')} | {f(e.get('step_s'), '.3g')} | "
            f"{f(e.get('over_full'), '.2f')}x |"
        )
    lines.append(f"| weight space against peft's forward | | | {f(r.get('lora_speedup'), '.2f')}x as fast |")
    return [*lines, ""]


def _against_target(ratio: Any, limit: float) -> str:
    """A ratio with whether it meets `limit`, or by how much it misses it."""
    if not isinstance(ratio, (int, float)):
        return "n/a"
    return f"{ratio:.2f}x ({'met' if ratio <= limit else f'missed by {ratio / limit - 1:.0%}'})"


def _shape_name(name: str, e: dict) -> str:
    s = e.get("shape", {})
    layers, heads = s.get("num_hidden_layers"), s.get("num_attention_heads")
    return f"{name} ({s.get('hidden_size')} wide, {layers} layers, {heads} heads)"


def _peers_train_rows(p: dict, f: Any) -> list[str]:
    lines = [
        "| training step: mmfusion against transformers' LlamaForCausalLM (same weights, SDPA, full rows of "
        f"{p.get('row_tokens')} text tokens, fused AdamW, {p.get('threads')} threads) | params | tokens/step | "
        "precision | transformers s | mmfusion s | mmfusion / transformers (target <= 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in p.items():
        if not isinstance(e, dict) or "parameters" not in e:
            continue
        for prec in ("fp32", "fp32 compiled", "bf16", "bf16 compiled"):
            if prec in e:
                r = e[prec]
                lines.append(
                    f"| {_shape_name(name, e)} | {f(e['parameters'], ',')} | {e.get('tokens_per_step')} | {prec} | "
                    f"{f(r.get('transformers_s'))} | {f(r.get('mmfusion_s'))} | "
                    f"{_against_target(r.get('ratio'), 1.0)} |"
                )
    return [*lines, ""]


def _peers_decode_rows(p: dict, f: Any) -> list[str]:
    lines = [
        "| greedy decoding with a KV cache: mmfusion's caption loop against transformers' `generate` "
        f"({p.get('rows')} rows, {p.get('prompt')}-token prompts, {p.get('new_tokens')} new tokens, fp32, "
        f"{p.get('threads')} threads) | params | transformers tokens/s | mmfusion tokens/s | "
        "time per token, mmfusion / transformers (target <= 1) | same ids |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in p.items():
        if isinstance(e, dict) and "parameters" in e:
            lines.append(
                f"| {_shape_name(name, e)} | {f(e['parameters'], ',')} | "
                f"{f(e.get('transformers_tokens_per_s'), '.0f')} | {f(e.get('mmfusion_tokens_per_s'), '.0f')} | "
                f"{_against_target(e.get('ratio'), 1.0)} | {'yes' if e.get('same_ids') else 'no'} |"
            )
    return [*lines, ""]


def _peers_sampling_rows(p: dict, f: Any) -> list[str]:
    lines = [
        "| one-step sampling (S = 1, CFG 3): mmfusion's sampler (KV cache for the condition) against the diffusers "
        f"scheduler loop over the whole sequence, same network ({p.get('threads')} threads) | images x tokens | "
        "diffusers s | mmfusion s | mmfusion / diffusers (target <= 1.05) | images: max abs difference (max abs) |",
        "|---|---|---|---|---|---|",
    ]
    names = {"demo": "the demo's model (`small`)", "paper": "256 tokens per image (256 wide, 6 layers)"}
    for case, e in p.items():
        if isinstance(e, dict) and "ratio" in e:
            model, sampler, steps = case.split()
            lines.append(
                f"| {names.get(model, model)}, {sampler.upper()} {steps} steps | {e.get('images')} x "
                f"{e.get('tokens_per_image')} | {f(e.get('diffusers_s'))} | {f(e.get('mmfusion_s'))} | "
                f"{_against_target(e.get('ratio'), 1.05)} | {f(e.get('max_abs_diff'), '.1e')} "
                f"({f(e.get('max_abs'), '.3g')}) |"
            )
    return [*lines, ""]


def _own_decoding(o: dict) -> str:
    """The served model's own caption decoding, as the row names it: "the model's own decoding (beam 3,
    candidates checked by redrawing)"."""
    if not o:
        return "the model's own decoding"
    method = f"beam {o['num_beams']}" if o["method"] == "beam" else o["method"]
    checked = ", candidates checked by redrawing" if o["method"] == "beam" and o.get("rerank_weight") else ""
    return f"the model's own decoding ({method}{checked})"


def _serve_rows(r: dict, f: Any) -> list[str]:
    own = _own_decoding(r.get("own_decoding", {}))
    lines = [
        f"| `mmfusion serve` under load ({r.get('requests')} requests of each kind from {r.get('clients')} "
        f"concurrent clients, loopback; images: S = 1, {r.get('steps')} DDPM steps, CFG 3; captions: 16 tokens, "
        "greedy unless named) | complete | p50 s | p95 s | server / s | API / s | server / API "
        "| API in the clients' batches / s | server / that |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, name in (
        ("t2i_1", "text to image, 1 image a request (the page's API)"),
        ("t2i_4", "text to image, 4 images a request (the page's API)"),
        ("caption", "caption, 1 image a request (the page's API)"),
        ("json_t2i_1", "text to image, 1 image a request (JSON API)"),
        ("json_t2i_4", "text to image, 4 images a request (JSON API)"),
        ("json_caption", "caption, 1 image a request (JSON API)"),
        ("json_caption_4", "caption, 4 images a request (JSON API)"),
        ("caption_own", f"caption, 1 image a request, {own} (the page's API)"),
        ("json_caption_own", f"caption, 1 image a request, {own} (JSON API)"),
    ):
        if case not in r:
            continue
        t = r[case]
        within = t["server_per_s"] / t["api_clients_batch_per_s"] if "api_clients_batch_per_s" in t else None
        lines.append(
            f"| {name} | {t.get('complete')} of {r.get('requests')} | {f(t.get('p50_s'))} | {f(t.get('p95_s'))} | "
            f"{f(t.get('server_per_s'))} | {f(t.get('api_per_s'))} | {f(t.get('ratio'), '.0%')} | "
            f"{f(t.get('api_clients_batch_per_s'))} (batch {t.get('clients_batch')}) | {f(within, '.0%')} |"
        )
    return [*lines, ""]


TABLES = {  # the tables after matmul and training, in their order on the page
    "train_width": train_width_rows,
    "pipeline": pipeline_rows,
    "finetune": finetune_rows,
    "sampling": _sampling_rows,
    "sampling_batch": _sampling_batch_rows,
    "sampling_paper_tokens": _sampling_paper_tokens_rows,
    "caption": _caption_rows,
    "token_shuffle": _token_shuffle_rows,
    "attention": _attention_rows,
    "peers_train": _peers_train_rows,
    "peers_decode": _peers_decode_rows,
    "peers_sampling": _peers_sampling_rows,
    "serve": _serve_rows,
    "compiled": _compiled_rows,
}


def write_doc(results: dict, doc: Path) -> None:
    table = render_markdown(results)
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="mmfusion benchmarks (see module docstring)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=list(BENCHES),
        help="run only these; the others' results are kept from the last run's JSON (same machine), with its date",
    )
    ap.add_argument(
        "--docs",
        default=None,
        help="folder for BENCHMARKS.md and benchmarks.json (default: the repository's docs/, found from this file)",
    )
    ap.add_argument(
        "--json",
        default=None,
        help="where to write the results (default DOCS/benchmarks.json; with --quick DOCS/benchmarks-quick.json)",
    )
    ap.add_argument(
        "--no-doc",
        action="store_true",
        help="do not update BENCHMARKS.md; --quick never does",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.quick)))
        return
    docs = Path(args.docs) if args.docs else DOC.parent
    # quick numbers are a smoke test: they go to their own JSON and never replace the recorded tables
    json_path = Path(args.json or docs / ("benchmarks-quick.json" if args.quick else "benchmarks.json"))
    previous = json.loads(json_path.read_text()) if args.only and json_path.exists() else None
    results = run_all(args.only or list(BENCHES), args.quick, previous)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    if not (args.no_doc or args.quick):
        write_doc(results, docs / DOC.name)
    print(render_markdown(results))


if __name__ == "__main__":
    main()
