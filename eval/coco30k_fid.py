"""Zero-shot COCO-30k FID (and CLIP score) for text-to-image, distributed with accelerate.

Protocol (as in the CausalFusion / GLIDE / Imagen line of work): draw 30,000 images of COCO val2014,
one random caption each, generate one image per caption, and compute FID between the generated
images and the 30,000 real images (center crop, resized to the model's resolution).

    accelerate launch --num_processes 8 eval/coco30k_fid.py --model MODEL_DIR \
        --captions annotations/captions_val2014.json --images val2014/ \
        --inception inception-2015-12-05.pt [--clip clip-vit-large-patch14/] [--dtype bfloat16] \
        --out results/coco30k

Each rank generates its share of the prompts (`PartialState().split_between_processes`) and writes
its own shard `OUT/images/rank{r}/`; once every rank is done, the main process reads all shards,
computes the metrics once and writes OUT/coco30k_metrics.json. Weights are read from local files only.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from PIL import Image


def sample_pairs(captions_json: str, n: int, seed: int) -> list[dict]:
    data = json.loads(Path(captions_json).read_text())
    caps = defaultdict(list)
    for a in data["annotations"]:
        caps[a["image_id"]].append(a["caption"].strip())
    images = sorted(data["images"], key=lambda im: im["id"])
    rng = random.Random(seed)
    chosen = rng.sample(images, min(n, len(images)))
    return [
        {"index": i, "file_name": im["file_name"], "caption": rng.choice(caps[im["id"]])}
        for i, im in enumerate(chosen)
        if caps[im["id"]]
    ]


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC)


def main(argv: list[str] | None = None) -> None:
    from accelerate import PartialState

    from mmfusion.evaluation.generation import clip_score, frechet_distance
    from mmfusion.pipeline import MMFusion

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--captions", required=True, help="COCO captions_val2014.json")
    ap.add_argument(
        "--images",
        default=None,
        help="folder the JSON's file names are relative to: val2014/ for COCO (default: the JSON's folder)",
    )
    ap.add_argument("--inception", required=True, help="local TorchScript Inception feature extractor")
    ap.add_argument("--clip", default=None, help="local transformers CLIP folder for CLIP score")
    ap.add_argument("--out", required=True)
    # not "--n" alone: torchrun reads an abbreviated option of its own (--nnodes, ...) into it
    ap.add_argument("--num-images", "--n", dest="n", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype (bfloat16: GPUs, AMX CPUs)"
    )
    args = ap.parse_args(argv)

    import torch

    # without a GPU, accelerate sees the processes of a launch as one process each unless told to run
    # on the CPU (then it joins them over gloo): every rank would generate every prompt
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(args.out)
    pairs = sample_pairs(args.captions, args.n, args.seed)
    pipe = MMFusion.from_pretrained(args.model, device=state.device, dtype=args.dtype)
    shard = out / "images" / f"rank{state.process_index}"
    shard.mkdir(parents=True, exist_ok=True)
    with state.split_between_processes(pairs) as mine:
        for start in range(0, len(mine), args.batch_size):
            chunk = mine[start : start + args.batch_size]
            # one seed per prompt index: the images do not depend on the number of processes
            images = pipe.generate(
                [p["caption"] for p in chunk], seeds=[args.seed + p["index"] for p in chunk], batch_size=args.batch_size
            )
            for p, img in zip(chunk, images):
                img.save(shard / f"{p['index']:06d}.png")
    state.wait_for_everyone()
    if state.is_main_process:
        size = pipe.image_cfg.image_size
        fake_files = sorted((out / "images").glob("rank*/*.png"))
        by_index = {int(f.stem): f for f in fake_files}
        fake = [Image.open(by_index[p["index"]]).convert("RGB") for p in pairs]
        root = Path(args.images) if args.images else Path(args.captions).parent
        real = [center_crop(Image.open(root / p["file_name"]).convert("RGB"), size) for p in pairs]
        metrics = {"n": len(pairs), "fid": frechet_distance(real, fake, args.inception)}
        if args.clip:
            metrics["clip_score"] = clip_score(fake, [p["caption"] for p in pairs], args.clip)
        (out / "coco30k_metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics))


if __name__ == "__main__":
    main()
