"""`mmfusion demo`: data -> training -> model folder -> samples, captions and metrics, on a CPU."""

# Deferred imports: the command imports torch and the library when it runs, so `--help` stays instant

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mmfusion.errors import UserError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def demo(
    overrides: list[str] = [],  # noqa: B006
    *,
    out: str = "demo",
    minutes: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    processes: int | None = None,
    resume: bool = False,
) -> None:
    """The CPU demo: render the shapes data, train the small joint T2I + captioning model, evaluate it.

    Writes OUT/model (the model folder), OUT/samples (grid.png: fixed prompts sampled in one AR step
    and one token per step in raster order, side by side; index.json), OUT/captions.json (held-out
    test images), OUT/metrics.json (T2I accuracy from the shapes checker at S = 1, S = 4 in random
    order and S = 16 in raster order; caption content accuracy and BLEU-4 / METEOR / ROUGE-L / CIDEr
    from pycocoevalcap) and OUT/eval_grid.png.

    Args:
        overrides: dotted changes to the demo config (configs/demo.yaml), e.g. model.dim=192 train.lr=1e-3
        out: output folder
        minutes: training time budget (default: the demo config's, chosen so that everything takes at
            most 15 minutes on 2 CPU cores)
        seed: random seed of data, training and sampling
        threads: torch CPU threads per training process (default: the cores, shared out between the
            processes)
        processes: training processes (default: 2 on a machine with two or more cores, else 1). Two
            processes train data-parallel (Lightning DDP over gloo). The demo's batch is global
            (data.global_batch_size, 128), so any number of processes trains the same recipe: two
            take 64 samples each, one takes all 128.
        resume: go on with a demo that was stopped (Ctrl-C, SIGTERM) from OUT/checkpoints/last.ckpt, with
            the same options: the rest of its time budget, then the evaluation
    """
    # deferred: `mmfusion --help` imports every command module and should not load torch
    from mmfusion.config import load_config
    from mmfusion.evaluation.demo_eval import evaluate_shapes_model, write_fixed_prompt_grid
    from mmfusion.pipeline import MMFusion
    from mmfusion.sampling.images import make_grid
    from mmfusion.training.run import train

    start = time.perf_counter()
    overrides = [*overrides, f"train.out={out}", f"train.seed={seed}", f"data.shapes_seed={seed}"]
    if minutes is not None:
        overrides.append(f"train.max_time_minutes={minutes}")
    cores = os.cpu_count() or 1
    if processes is None:
        processes = 2 if cores >= 2 else 1
    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}")
    if processes > 1:
        overrides += [f"train.devices={processes}", "train.strategy=ddp", "train.accelerator=cpu"]
    overrides.append(f"train.threads={threads or max(1, cores // processes)}")
    cfg = load_config(DEMO_CONFIG, overrides)
    if resume:
        _check_same_run(Path(out) / "config.json", cfg.to_dict())
    model_dir = train(cfg, resume=resume)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return  # a DDP worker that Lightning launched: rank 0 evaluates
    import torch

    torch.set_num_threads(threads or cores)
    trained = time.perf_counter()
    pipe = MMFusion.from_pretrained(model_dir)
    outdir = Path(out)
    print("evaluating: samples of fixed prompts, the shapes benchmark, captions of the test split")
    write_fixed_prompt_grid(pipe, outdir / "samples", seed)
    import datasets

    test = datasets.load_from_disk(str(outdir / "data"))["test"]
    metrics, eval_images = evaluate_shapes_model(pipe, test, seed=seed, progress=True)
    make_grid(eval_images, cols=16, scale=3).save(outdir / "eval_grid.png")
    (outdir / "captions.json").write_text(json.dumps(metrics.pop("captions"), indent=2))
    metrics["minutes"] = {  # of this invocation: a resumed demo's earlier training is not in them
        "training": (trained - start) / 60,
        "total": (time.perf_counter() - start) / 60,
        "resumed": resume,
    }
    metrics["sampler"] = dict(pipe.sample_defaults.__dict__)
    (outdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(_summary(metrics, outdir))


# what a resumed demo may change: how the same run is laid out on the machine
LAYOUT_KEYS = {"devices", "threads", "strategy", "accelerator", "num_nodes"}


def _check_same_run(recorded: Path, now: dict) -> None:
    """`demo --resume` goes on with the stopped demo: its data, seed, budget and model must be the ones
    recorded in OUT/config.json (another --seed would re-render the data under the checkpoint's weights,
    a missing --minutes would give the default budget). Only the process layout may differ."""
    if not recorded.exists():
        return  # nothing ran there: train names the missing checkpoint
    before, now = json.loads(recorded.read_text()), json.loads(json.dumps(now))
    changed = [
        f"{section}.{key} {before[section].get(key)!r} -> {value!r}"
        for section, values in now.items()
        if isinstance(values, dict) and section in before
        for key, value in values.items()
        if before[section].get(key) != value and not (section == "train" and key in LAYOUT_KEYS)
    ]
    if changed:
        raise UserError(
            f"demo --resume: these settings differ from the stopped demo's ({recorded}): {'; '.join(changed)}. "
            "Give the options it was started with (--seed, --minutes, overrides)"
        )


def _summary(m: dict, outdir: Path) -> str:
    then = " (this invocation, resumed)" if m["minutes"].get("resumed") else ""
    lines = [f"demo finished in {m['minutes']['total']:.1f} min{then}; model in {outdir / 'model'}"]
    from mmfusion.evaluation.demo_eval import summary_lines

    lines += summary_lines(m)
    lines.append(f"samples: {outdir / 'samples' / 'grid.png'}; metrics: {outdir / 'metrics.json'}")
    return "\n".join(lines)
