"""CausalFusion vs. a Transfusion baseline on shapes, with equal compute (the paper's Table 6a, small).

Both models are the demo recipe (configs/demo.yaml) and differ only in the objective:
  * CausalFusion: dual factorisation (random AR steps, clean copies, generalized causal mask);
    captions read the clean image tokens;
  * Transfusion: one AR step (gamma = 0, no clean copies), image tokens bidirectional, and in
    caption order the text attends to the noised image.
Each trains for the same wall-clock budget on the same machine (equal compute), then is evaluated
with the same sampler: T2I accuracy from the shapes checker, captions on the test split (CIDEr).

    python scripts/compare_transfusion.py --out runs/compare --minutes 12

On a 2-core machine the two runs can train side by side, one thread each (still equal compute), then
a last call without --only writes the table from their saved results:

    python scripts/compare_transfusion.py --only causalfusion train.threads=1 &
    python scripts/compare_transfusion.py --only transfusion train.threads=1 &
    wait; python scripts/compare_transfusion.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmfusion.config import load_config
from mmfusion.evaluation.demo_eval import evaluate_captions, evaluate_t2i
from mmfusion.evaluation.report import write_report
from mmfusion.pipeline import MMFusion
from mmfusion.training.checkpoint import safe_torch_load
from mmfusion.training.run import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run(name: str, baseline: str, out: Path, minutes: float, extra: list[str]) -> dict:
    """Train and evaluate one model, or read its saved result."""
    saved = out / name / "result.json"
    if saved.exists():
        return json.loads(saved.read_text())
    cfg = load_config(
        CONFIG,
        [f"train.out={out / name}", f"objective.baseline={baseline}", f"train.max_time_minutes={minutes}", *extra],
    )
    pipe = MMFusion.from_pretrained(train(cfg))
    t2i, _, _ = evaluate_t2i(pipe)
    import datasets

    test = datasets.load_from_disk(str(out / name / "data"))["test"]
    caps, _ = evaluate_captions(pipe, test)
    steps = safe_torch_load(out / name / "checkpoints" / "last.ckpt")["global_step"]
    result = {
        "t2i_single": t2i["single"]["accuracy"],
        "t2i_pair": t2i["pair"]["accuracy"],
        "cider": caps.get("CIDEr"),
        "bleu4": caps.get("Bleu_4"),
        "train_steps": steps,
        "minutes": minutes,
    }
    saved.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--minutes", type=float, default=12.0, help="training budget of each model")
    ap.add_argument("--only", choices=["causalfusion", "transfusion"], help="train and evaluate one model only")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to both runs")
    args = ap.parse_args()
    out = Path(args.out)
    rows = {
        name: run(name, base, out, args.minutes, args.overrides)
        for name, base in (("causalfusion", "causalfusion"), ("transfusion", "transfusion"))
        if args.only in (None, name)
    }
    if args.only:
        return
    write_report(
        out,
        "comparison",
        rows,
        ["model", "T2I one object", "T2I two objects", "caption CIDEr", "BLEU-4", "train steps"],
        [
            [
                name,
                f"{r['t2i_single']:.1%}",
                f"{r['t2i_pair']:.1%}",
                f"{r['cider']:.3f}",
                f"{r['bleu4']:.3f}",
                r["train_steps"],
            ]
            for name, r in rows.items()
        ],
    )


if __name__ == "__main__":
    main()
