"""The downstream benchmark: carry a trained shapes model to domains it has never seen, with LoRA at the
`mmfusion finetune` defaults, against full fine-tuning and a model trained from scratch for the same
wall time, judged on the new domain and on the old task.

    python scripts/downstream.py --base 'runs/demo_s{seed}/model' --out runs/downstream \\
        [--domains new_shapes,digits] [--seeds 0,1,2] [--minutes 5] [--parallel 2]

Domains (`mmfusion.data.shapes.DOMAINS`): `new_shapes` (crosses, diamonds and rings in the old colours)
and `digits` (the glyphs two, three, five and seven in purple and orange): new words in every caption.
Per domain and seed, four adaptations run as their own processes, one thread each, `--parallel` at a
time, each for `--minutes` of training:

- `lora`: `mmfusion finetune --task joint` with every other option at its default;
- `lora_replay`: the same with `--replay 0.2 --replay-data OUT/data_shapes` (a fifth of the rows the
  base's own kind of data, against forgetting);
- `full`: `mmfusion finetune --full`, the same data, task and learning rate;
- `scratch`: `mmfusion train` with the demo's recipe on the domain's data alone (its own tokenizer).

Each result is judged on the domain (T2I accuracy on 96 one-object and 96 two-object prompts at S = 1,
the model's own sampling settings, the analytic checker, with what a two-object scene got right:
`t2i_pair_shape`, `_colour`, `_position`; caption content accuracy on 300 test images,
decoded greedily and with the model's own caption settings, `*_model`) and on the old task (the shapes
benchmark's T2I at S = 1 and caption content, the same sizes). Results judged before the model's own
caption decoding was recorded get it added (new domain) when the script runs again. Writes OUT/results.json
and OUT/grid_{domain}.png (prompts in rows: the base model, LoRA, full fine-tuning, scratch).
`--temperature T` judges the images of every model sampled at that temperature (results_tT.json); the
adaptations already trained are not run again. `--finetune-args "..."` adds options to every fine-tuning
(another rank, other targets) without changing the defaults it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets

from mmfusion.data.shapes import DOMAINS, build_shapes
from mmfusion.evaluation.caption_content import caption_content
from mmfusion.evaluation.shapes import benchmark_prompts, check_image, domain_prompts, summarize
from mmfusion.image_io import make_grid
from mmfusion.pipeline import MMFusion
from mmfusion.training.demo import DEMO_CONFIG

METHODS = ("lora", "lora_replay", "full", "scratch")
N_PROMPTS, N_CAPTIONS = 96, 300


def domain_data(domain: str, out: Path, n: int) -> Path:
    """The domain's data set (train / validation / test), rendered once."""
    path = out / f"data_{domain}"
    if not (path / "dataset_dict.json").exists():
        spec = DOMAINS[domain]
        build_shapes(n=n, seed=11, colours=spec["colours"], shapes=spec["shapes"], n_test=N_CAPTIONS).save_to_disk(
            str(path)
        )
    return path


def command(
    method: str, base: str, data: Path, run: Path, seed: int, minutes: float, extra_args: str = ""
) -> list[str]:
    """The adaptation's command line (replay reads the shapes data beside the domains' data); `extra_args`
    are added to the fine-tunings' (`mmfusion finetune`) command lines."""
    cli = [sys.executable, "-m", "mmfusion.cli.main"]
    if method == "scratch":
        overrides = [f"data.source={data}", f"train.out={run}", f"train.max_time_minutes={minutes}", "train.threads=1"]
        return [*cli, "train", "--config", str(DEMO_CONFIG), *overrides, f"train.seed={seed}"]
    replay = ["--replay", "0.2", "--replay-data", str(data.parent / "data_shapes")]
    extra = {"lora": [], "lora_replay": replay, "full": ["--full"]}[method]
    budget = ["--minutes", str(minutes), "--steps", "1000000", "--seed", str(seed)]
    finetune = [*cli, "finetune", "--model", base, "--data", str(data), "--out", str(run)]
    return [*finetune, *budget, *extra, *shlex.split(extra_args)]


def adapt(job: tuple[str, str, str, Path, Path, int, float, str]) -> None:
    """Run one adaptation unless its result is there (its log beside it)."""
    domain, method, base, data, run, seed, minutes, extra_args = job
    done = run / ("model" if method == "scratch" else "finetune_report.json")
    if done.exists():
        return
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (run.parent / f"{run.name}.log").open("w") as log:
        subprocess.run(
            command(method, base, data, run, seed, minutes, extra_args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=True,
        )


def load(method: str, base: str, run: Path) -> MMFusion:
    if method == "scratch":
        return MMFusion.from_pretrained(run / "model")
    if method == "full":
        return MMFusion.from_pretrained(run)
    return MMFusion.from_pretrained(base, adapters=[str(run)])


def judge(pipe: MMFusion, prompts: list[str], test: datasets.Dataset, seed: int, temperature: float | None) -> dict:
    """T2I accuracy (one / two objects) on `prompts` at the sampler `temperature` (None: the model's) and
    caption content accuracy on `test`. Shapes are told apart by template matching for every prompt, old
    ones included: the old task's geometric classifier would take a drawn ring for a circle."""
    images = pipe.generate(prompts, seed=seed, batch_size=48, temperature=temperature)
    t2i = summarize([check_image(im, p, templates=True) for im, p in zip(images, prompts)], prompts)
    # what a two-object scene got right: both shapes, both colours, the relation (each judged on its own)
    parts = {f"t2i_pair_{part}": t2i["pair"][part] for part in ("shape", "colour", "position")}
    t2i = {"t2i_single": t2i["single"]["accuracy"], "t2i_pair": t2i["pair"]["accuracy"], **parts}
    return {**t2i, **judge_captions(pipe, test)}


def judge_captions(pipe: MMFusion, test: datasets.Dataset) -> dict:
    """Caption content accuracy (one / two objects) on `test`'s first N_CAPTIONS images, decoded greedily
    (one decoding for every model) and with the model's own caption settings (`_model`: what
    `mmfusion caption` and `pipe.caption` give a user; a demo model's are beam search checked by redrawing)."""
    rows = [test[i] for i in range(min(N_CAPTIONS, len(test)))]
    images = [r["image"] for r in rows]
    out = {}
    for suffix, method in (("", "greedy"), ("_model", None)):
        content = caption_content(pipe.caption(images, batch_size=64, method=method), rows)
        out[f"caption_single{suffix}"] = content["single"]["accuracy"]
        out[f"caption_pair{suffix}"] = content.get("pair", {}).get("accuracy")
    return out


def evaluate(args: argparse.Namespace, out: Path) -> dict:
    path = out / ("results.json" if args.temperature is None else f"results_t{args.temperature:g}.json")
    results = json.loads(path.read_text()) if path.exists() else {}
    old_test = build_shapes(n=20, seed=11, n_test=N_CAPTIONS)["test"]
    old_prompts = benchmark_prompts(N_PROMPTS, N_PROMPTS, seed=0)
    for domain in args.domains:
        test = datasets.load_from_disk(str(out / f"data_{domain}"))["test"]
        prompts = domain_prompts(domain, N_PROMPTS, N_PROMPTS, seed=0)
        for seed in args.seeds:
            base = args.base.format(seed=seed)
            for method in ("base", *args.methods):
                key = f"{domain}/{seed}/{method}"
                if key in results and "caption_pair_model" in results[key]["new"]:
                    continue
                run = out / domain / f"s{seed}_{method}"
                pipe = MMFusion.from_pretrained(base) if method == "base" else load(method, base, run)
                if key in results:  # judged before captions were decoded the model's way too: add them (new domain)
                    results[key]["new"].update(judge_captions(pipe, test))
                else:
                    report = (
                        {} if method in ("base", "scratch") else json.loads((run / "finetune_report.json").read_text())
                    )
                    new = judge(pipe, prompts, test, seed, args.temperature)
                    old = None if method == "scratch" else judge(pipe, old_prompts, old_test, seed, args.temperature)
                    results[key] = {
                        "new": new,
                        "old": old,
                        "steps": report.get("steps"),
                        "trainable_parameters": report.get("trainable_parameters"),
                    }
                print(key, json.dumps(results[key]), flush=True)
                path.write_text(json.dumps(results, indent=2))
    return results


def grids(args: argparse.Namespace, out: Path) -> None:
    """Per domain, four prompts in rows; columns: the base, LoRA, full fine-tuning, scratch (seed 0)."""
    seed = args.seeds[0]
    base = args.base.format(seed=seed)
    for domain in args.domains:
        prompts = domain_prompts(domain, 2, 2, seed=0)
        pipes = [MMFusion.from_pretrained(base)] + [
            load(m, base, out / domain / f"s{seed}_{m}") for m in ("lora", "full", "scratch")
        ]
        columns = [p.generate(prompts, seed=seed) for p in pipes]
        images = [columns[c][r] for r in range(len(prompts)) for c in range(len(pipes))]
        make_grid(images, cols=len(pipes), scale=4).save(out / f"grid_{domain}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the base model folder; {seed} is replaced by each seed")
    ap.add_argument("--out", default="runs/downstream")
    ap.add_argument("--domains", default="new_shapes,digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=5.0, help="training time of every adaptation")
    ap.add_argument("--parallel", type=int, default=2, help="adaptations trained at once (one thread each)")
    ap.add_argument("--n", type=int, default=5000, help="training images per domain")
    ap.add_argument("--methods", default=",".join(METHODS), help="the adaptations to run")
    ap.add_argument(
        "--temperature",
        type=float,
        help="judge every model's images at this sampler temperature (default: each model's own); results "
        "then go to OUT/results_t{temperature}.json",
    )
    ap.add_argument("--finetune-args", default="", help="more options for every fine-tuning (e.g. '--batch-size 64')")
    ap.add_argument("--no-grids", action="store_true", help="judge only: no grids")
    args = ap.parse_args()
    args.domains = args.domains.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data_shapes" / "dataset_dict.json").exists():  # the base's kind of data, for replay
        build_shapes(n=args.n, seed=12).save_to_disk(str(out / "data_shapes"))
    jobs = []
    for domain in args.domains:
        data = domain_data(domain, out, args.n)
        for seed in args.seeds:
            for method in args.methods:
                jobs.append(
                    (
                        domain,
                        method,
                        args.base.format(seed=seed),
                        data,
                        out / domain / f"s{seed}_{method}",
                        seed,
                        args.minutes,
                        args.finetune_args,
                    )
                )
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(adapt, jobs))
    evaluate(args, out)
    if not args.no_grids:
        grids(args, out)


if __name__ == "__main__":
    main()
