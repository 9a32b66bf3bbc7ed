"""LoRA downstream demo: teach the demo model a colour it has never seen (purple), measure the new
concept and the old ones (forgetting) before and after, and compare LoRA with full fine-tuning on
trainable parameters, peak memory and time.

    python scripts/lora_downstream.py --model demo/model --out runs/lora_purple [--steps 600]

Both fine-tunings run as `mmfusion finetune` in their own process (so each peak-memory figure is its
own), on the same shifted data (purple shapes only), for the same number of steps and learning rate.
With --replay the fine-tuning data mixes purple with the old colours (purple is then one colour in
five), the usual cure for forgetting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mmfusion.data.shapes import COLOURS, SHAPES, build_shapes
from mmfusion.evaluation.demo_eval import evaluate_t2i
from mmfusion.evaluation.report import write_report
from mmfusion.evaluation.shapes import check_image, summarize
from mmfusion.pipeline import MMFusion


def new_concept(pipe: MMFusion, per_shape: int = 16, seed: int = 0) -> float:
    prompts = [f"a purple {s}" for s in SHAPES for _ in range(per_shape)]
    images = pipe.generate(prompts, seed=seed, batch_size=48)
    verdicts = [check_image(im, p) for im, p in zip(images, prompts)]
    return summarize(verdicts, prompts)["single"]["accuracy"]


def evaluate(model: str, adapters: list[str] | None = None) -> dict:
    pipe = MMFusion.from_pretrained(model, adapters=adapters)
    old, _, _ = evaluate_t2i(pipe, n_single=48, n_pair=48)
    return {"purple": new_concept(pipe), "old_single": old["single"]["accuracy"], "old_pair": old["pair"]["accuracy"]}


def finetune(model: str, data: Path, out: Path, full: bool, steps: int, lr: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "mmfusion.cli.main",
        "finetune",
        "--model",
        model,
        "--data",
        str(data),
        "--task",
        "t2i",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--target",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--lr",
        str(lr),
        "--batch-size",
        "32",
    ] + (["--full"] if full else [])
    subprocess.run(cmd, check=True)
    return json.loads((out / "finetune_report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo/model")
    ap.add_argument("--out", default="runs/lora_purple")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--replay", action="store_true", help="mix the old colours into the fine-tuning data")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "purple_data"
    if not (data / "dataset_dict.json").exists():
        colours = (*COLOURS, "purple") if args.replay else ("purple",)
        build_shapes(n=2000, seed=7, colours=colours).save_to_disk(str(data))
    results = {"before": evaluate(args.model)}
    lora = finetune(args.model, data, out / "lora", full=False, steps=args.steps, lr=args.lr)
    results["lora"] = {**lora, **evaluate(args.model, [str(out / "lora")])}
    full = finetune(args.model, data, out / "full", full=True, steps=args.steps, lr=args.lr)
    results["full"] = {**full, **evaluate(str(out / "full"))}
    b = results["before"]
    table = [["before", f"{b['purple']:.1%}", f"{b['old_single']:.1%}", f"{b['old_pair']:.1%}", "", "", ""]]
    for name in ("lora", "full"):
        r = results[name]
        table.append(
            [
                name,
                f"{r['purple']:.1%}",
                f"{r['old_single']:.1%}",
                f"{r['old_pair']:.1%}",
                f"{r['trainable_parameters']:,} of {r['total_parameters']:,}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['seconds']:.0f}",
            ]
        )
    write_report(
        out,
        "lora_results",
        results,
        ["", "purple (new)", "old: one object", "old: two objects", "trainable params", "peak RSS MB", "time s"],
        table,
    )


if __name__ == "__main__":
    main()
