"""CausalFusion vs. a Transfusion baseline on shapes, with equal compute (the paper's Table 6a, small).

Both models are the demo recipe (configs/demo.yaml) and differ only in the objective:
  * CausalFusion: dual factorisation (random AR steps, clean copies, generalized causal mask);
    captions read the clean image tokens;
  * Transfusion: one AR step (gamma = 0, no clean copies), image tokens bidirectional, and in
    caption order the text attends to the noised image.
Each trains for the same wall-clock budget on the same machine (equal compute), then is judged the same
way: T2I accuracy from the shapes checker (sampled in one AR step, and in the AR modes, which only
CausalFusion is trained for), caption content accuracy and pycocoevalcap's scores on the test split.

    python scripts/compare_transfusion.py --out runs/compare --minutes 12 --seeds 0 1 2

On a 2-core machine the two runs of a seed train side by side, one thread each (still equal compute),
then a last call without --only writes the table from their saved results:

    for s in 0 1 2; do
      python scripts/compare_transfusion.py --seeds $s --only causalfusion train.threads=1 &
      python scripts/compare_transfusion.py --seeds $s --only transfusion train.threads=1 &
      wait
    done
    python scripts/compare_transfusion.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets

from mmfusion.config import load_config
from mmfusion.evaluation.demo_eval import evaluate_shapes_model
from mmfusion.evaluation.report import write_report
from mmfusion.pipeline import MMFusion
from mmfusion.training.checkpoint import safe_torch_load
from mmfusion.training.run import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MODELS = {"causalfusion": "causalfusion", "transfusion": "transfusion"}


def run(name: str, seed: int, out: Path, minutes: float, extra: list[str]) -> dict:
    """Train and evaluate one model at one seed, or read its saved result."""
    folder = out / f"{name}_seed{seed}"
    saved = folder / "result.json"
    if saved.exists():
        return json.loads(saved.read_text())
    cfg = load_config(
        CONFIG,
        [
            f"train.out={folder}",
            f"objective.baseline={MODELS[name]}",
            f"train.max_time_minutes={minutes}",
            f"train.seed={seed}",
            f"data.shapes_seed={seed}",
            *extra,
        ],
    )
    pipe = MMFusion.from_pretrained(train(cfg))
    test = datasets.load_from_disk(str(folder / "data"))["test"]
    metrics, _ = evaluate_shapes_model(pipe, test, seed=seed)
    metrics.pop("captions")
    metrics["train_steps"] = safe_torch_load(folder / "checkpoints" / "last.ckpt")["global_step"]
    metrics["minutes"] = minutes
    saved.write_text(json.dumps(metrics, indent=2))
    return metrics


def row(name: str, seed: int, m: dict) -> list[str]:
    s1, content = m["t2i"]["S=1"], m["caption"].get("content", {})
    return [
        name,
        str(seed),
        f"{s1['single']['accuracy']:.1%}",
        f"{s1['pair']['accuracy']:.1%}",
        f"{content['single']['accuracy']:.1%}" if content else "-",
        f"{content['pair']['accuracy']:.1%}" if content else "-",
        f"{m['caption']['CIDEr']:.2f}" if "CIDEr" in m["caption"] else "-",
        str(m["train_steps"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--minutes", type=float, default=12.0, help="training budget of each model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", choices=list(MODELS), help="train and evaluate one model only")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to both models")
    args = ap.parse_args()
    out = Path(args.out)
    results = {
        f"{name}_seed{seed}": run(name, seed, out, args.minutes, args.overrides)
        for seed in args.seeds
        for name in MODELS
        if args.only in (None, name)
    }
    if args.only:
        return
    header = ["model", "seed", "T2I one object", "T2I two objects", "captions right: one", "two", "CIDEr", "steps"]
    rows = [row(name, seed, results[f"{name}_seed{seed}"]) for name in MODELS for seed in args.seeds]
    write_report(out, "comparison", results, header, rows)


if __name__ == "__main__":
    main()
