"""COCO captioning on the Karpathy test split (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE if installed).

    python eval/coco_caption.py --model MODEL_DIR --karpathy dataset_coco.json --images /data/coco --out results/

`--images` is the folder holding `val2014/` and `train2014/` (the Karpathy file's `filepath`s).
The same as `mmfusion eval caption --data dataset_coco.json --image-root /data/coco --split test`.
"""

from __future__ import annotations

import argparse

from mmfusion.evaluation.captions import caption_split, run_caption_benchmark
from mmfusion.pipeline import MMFusion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--karpathy", required=True, help="dataset_coco.json of Karpathy & Fei-Fei")
    ap.add_argument("--images", required=True, help="COCO image root (with val2014/, train2014/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--method", default="beam", choices=["greedy", "beam", "nucleus"])
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    args = ap.parse_args()
    rows = caption_split(args.karpathy, args.split, args.images, args.limit)
    pipe = MMFusion.from_pretrained(args.model, dtype=args.dtype)
    settings = pipe.caption_settings(method=args.method, num_beams=args.num_beams)
    metrics = run_caption_benchmark(pipe, rows, args.out, settings)
    print(" ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
