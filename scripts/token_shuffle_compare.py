"""Token-Shuffle s = 1, 2, 4 on shapes after the same number of training steps: accuracy from the shapes
checker, training time and sampling time (the issue's target: s = 2 within 10 points of s = 1).

    python scripts/token_shuffle_compare.py --out runs/token_shuffle [--steps 8000] [--top-k 5 50] \
        [--window-heads independent autoregressive] [overrides ...]

Steps: train a small VQ tokenizer on the shapes set once (f4: 8 x 8 codes at 32 px, 256 codes), then
train the same small joint model on its codes with s = 1, 2 and 4 for the same number of steps, and
judge each model at each top-k given: one-object accuracy over 4 x 192 prompts (sampling seeds
0-3), two-object accuracy over 96 prompts. For s > 1 each window head given is trained
(`model.window_head`: the paper's independent slots, or mmfusion's autoregressive window head); s = 1
has one code per token, so the head does not matter there. A trained model folder is judged again
rather than retrained, and finished judgements are read from result.json, so an interrupted
comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmfusion.config import load_config
from mmfusion.data.shapes import build_shapes
from mmfusion.evaluation.demo_eval import evaluate_t2i
from mmfusion.evaluation.report import write_report
from mmfusion.pipeline import MMFusion
from mmfusion.training.run import train
from mmfusion.training.vae import VQConfig, train_vq


def run_one(run: Path, s: int, head: str, data: Path, vq: Path, args: argparse.Namespace) -> dict:
    """Train one Token-Shuffle model (or load it, if trained before) and judge it at each top-k."""
    saved = run / "result.json"
    if saved.exists():
        return json.loads(saved.read_text())
    timing = run / "train.json"
    if not (run / "model" / "config.json").exists():
        cfg = load_config(
            None,
            [
                "model.preset=small",
                f"model.shuffle={s}",
                f"model.window_head={head}",
                f"data.source={data}",
                "image.kind=vq",
                f"image.path={vq}",
                f"train.out={run}",
                f"train.max_steps={args.steps}",
                "train.lr=3e-3",
                "data.batch_size=32",
                "train.warmup_steps=100",
                "sample.cfg_scale=3.0",
                "sample.cfg_schedule=linear",
                f"sample.top_k={args.top_k[0]}",
                *args.overrides,
            ],
        )
        start = time.perf_counter()
        train(cfg)
        timing.write_text(json.dumps({"train_seconds": time.perf_counter() - start, "steps": args.steps}))
    pipe = MMFusion.from_pretrained(run / "model")
    result = {"tokens_per_image": pipe.model.cfg.num_image_tokens, **json.loads(timing.read_text())}
    for k in args.top_k:
        start = time.perf_counter()
        single = [evaluate_t2i(pipe, n_single=192, n_pair=0, seed=i, top_k=k)[0]["single"] for i in range(4)]
        result[f"sample_seconds_768_images_top_k{k}"] = time.perf_counter() - start
        result[f"single_top_k{k}"] = sum(r["accuracy"] for r in single) / len(single)
        result[f"pair_top_k{k}"] = evaluate_t2i(pipe, n_single=0, n_pair=96, top_k=k)[0]["pair"]["accuracy"]
    saved.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/token_shuffle")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument(
        "--top-k",
        type=int,
        nargs="+",
        default=[5, 50],
        help="top-k values to judge at (the first is saved as the model's default)",
    )
    ap.add_argument("--vq-steps", type=int, default=1500)
    ap.add_argument("--shuffles", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--window-heads", nargs="*", default=["independent"], choices=["independent", "autoregressive"])
    ap.add_argument("--tag", default="", help="suffix of the run folders, for variants given as overrides")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. model.code_dim=128")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "dataset_dict.json").exists():
        build_shapes(n=20000, seed=0).save_to_disk(str(data))
    vq = out / "vq"
    if not (vq / "config.json").exists():
        train_vq(
            str(data),
            vq,
            VQConfig(
                channels=(32, 64, 64), codebook_size=256, embed_dim=8, steps=args.vq_steps, batch_size=32, lr=1e-3
            ),
        )
    results = {}
    for s in args.shuffles:
        for head in args.window_heads if s > 1 else ["independent"]:
            name = f"s={s}" + (f", {head}" if s > 1 and len(args.window_heads) > 1 else "") + args.tag
            folder = (f"s{s}" if head == "independent" else f"s{s}_{head}") + args.tag.replace(" ", "_")
            results[name] = run_one(out / folder, s, head, data, vq, args)
            print(name, results[name], flush=True)
    k = args.top_k
    write_report(
        out,
        "token_shuffle_results",
        results,
        ["s", "tokens / image", "train s", f"sampling s (768 images, top-k {k[0]})"]
        + [f"one object (top-k {x})" for x in k]
        + [f"two objects (top-k {x})" for x in k],
        [
            [
                key[2:],
                r["tokens_per_image"],
                f"{r['train_seconds']:.0f}",
                f"{r[f'sample_seconds_768_images_top_k{k[0]}']:.1f}",
                *[f"{r[f'single_top_k{x}']:.1%}" for x in k],
                *[f"{r[f'pair_top_k{x}']:.1%}" for x in k],
            ]
            for key, r in results.items()
        ],
    )


if __name__ == "__main__":
    main()
