"""The CPU demo as a workflow: render the shapes data, train the small joint T2I + captioning model
with the demo config, then judge the model it wrote. `mmfusion demo` calls `run_demo`."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from mmfusion.config import RunConfig, load_config
from mmfusion.errors import UserError
from mmfusion.evaluation.demo_eval import evaluate_shapes_model, summary_lines, write_fixed_prompt_grid
from mmfusion.evaluation.report import write_json
from mmfusion.hub import write_model_card
from mmfusion.image_io import make_grid
from mmfusion.pipeline import MMFusion
from mmfusion.training.run import train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
# what a resumed demo may change: how the same run is laid out on the machine
LAYOUT_KEYS = {"devices", "threads", "strategy", "accelerator", "num_nodes"}


def run_demo(
    overrides: Sequence[str] = (),
    *,
    out: str | Path = "demo",
    minutes: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    processes: int | None = 1,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Train the demo model into OUT and judge it (see `mmfusion demo --help` for what it writes).
    One training process by default; `processes=None` takes two data-parallel ones where there are two
    cores (what `mmfusion demo` does: Lightning then starts the second by running the caller's script
    again, so a library caller that wants it needs a script guarded by `if __name__ == "__main__"`).
    Returns the metrics, or None in a data-parallel worker process (rank 0 judges)."""
    start = time.perf_counter()
    cfg = demo_config(overrides, out, minutes, seed, threads, processes)
    if resume:
        check_same_run(Path(out) / "config.json", cfg.to_dict())
    model_dir = train(cfg, resume=resume)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None  # a DDP worker that Lightning launched
    torch.set_num_threads(threads or os.cpu_count() or 1)
    trained = time.perf_counter()
    metrics = judge(model_dir, Path(out), seed)
    metrics["minutes"] = {  # of this invocation: a resumed demo's earlier training is not in them
        "training": (trained - start) / 60,
        "total": (time.perf_counter() - start) / 60,
        "resumed": resume,
    }
    write_json(Path(out) / "metrics.json", metrics)
    write_model_card(model_dir, card_metrics(metrics))  # the model card shows the figures just measured
    print(summary(metrics, Path(out)))
    return metrics


def demo_config(
    overrides: Sequence[str],
    out: str | Path,
    minutes: float | None,
    seed: int,
    threads: int | None,
    processes: int | None,
) -> RunConfig:
    """The demo config with the run's folder, seed, time budget and process layout (`process_layout`)."""
    overrides = [*overrides, f"train.out={out}", f"train.seed={seed}", f"data.shapes_seed={seed}"]
    if minutes is not None:
        overrides.append(f"train.max_time_minutes={minutes}")
    return load_config(DEMO_CONFIG, [*overrides, *process_layout(processes, threads)])


def process_layout(processes: int | None, threads: int | None) -> list[str]:
    """The overrides that lay the demo's training out on this machine: by default two data-parallel
    processes on a machine with two or more cores, the cores shared out between them."""
    cores = os.cpu_count() or 1
    if processes is None:
        processes = 2 if cores >= 2 else 1
    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}")
    layout = [f"train.devices={processes}", "train.strategy=ddp", "train.accelerator=cpu"] if processes > 1 else []
    return [*layout, f"train.threads={threads or max(1, cores // processes)}"]


def judge(model_dir: Path, outdir: Path, seed: int) -> dict[str, Any]:
    """Samples of the fixed prompts, the shapes benchmark and the captions of the test split, written
    into `outdir`; returns the metrics (without the captions, which go to captions.json)."""
    pipe = MMFusion.from_pretrained(model_dir)
    print("evaluating: samples of fixed prompts, the shapes benchmark, captions of the test split")
    write_fixed_prompt_grid(pipe, outdir / "samples", seed)
    test = datasets.load_from_disk(str(outdir / "data"))["test"]
    metrics, eval_images = evaluate_shapes_model(pipe, test, seed=seed, progress=True)
    make_grid(eval_images, cols=16, scale=3).save(outdir / "eval_grid.png")
    write_json(outdir / "captions.json", metrics.pop("captions"))
    metrics["sampler"] = dataclasses.asdict(pipe.image_settings())
    return metrics


def card_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The demo's headline figures for the model card: the shapes benchmark's accuracy of each sampling
    mode, how often captions name the right content, and the caption metrics when they were computed."""
    out = {}
    for mode, t2i in metrics.get("t2i", {}).items():
        for part, what in (("single", "one object"), ("pair", "two objects + relation")):
            if part in t2i:
                out[f"T2I {mode}: {what}, accuracy"] = t2i[part]["accuracy"]
    caption = metrics.get("caption") or {}
    for part, c in caption.get("content", {}).items():
        what = "one object" if part == "single" else "two objects"
        out[f"captions naming the right content: {what}"] = c["accuracy"]
    out.update({f"captions: {k}": caption[k] for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr") if k in caption})
    return out


def check_same_run(recorded: Path, now: dict) -> None:
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


def summary(m: dict, outdir: Path) -> str:
    then = " (this invocation, resumed)" if m["minutes"].get("resumed") else ""
    lines = [f"demo finished in {m['minutes']['total']:.1f} min{then}; model in {outdir / 'model'}"]
    lines += summary_lines(m)
    lines.append(f"samples: {outdir / 'samples' / 'grid.png'}; metrics: {outdir / 'metrics.json'}")
    return "\n".join(lines)
