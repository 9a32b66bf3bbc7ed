"""The demo's training at an older revision of mmfusion and at this checkout, in turn on one machine.

    python benchmarks/then_and_now.py --old REV [--minutes 4] [--rounds 2] [--processes 2] [--out DIR]
        [--old-set key=value ...] [--set key=value ...]

Each round trains the demo's configuration (`mmfusion/configs/demo.yaml` of each revision, laid out as
`mmfusion demo` lays it out: `--processes` data-parallel processes of one thread each on a machine of two
cores) for `--minutes` at the old revision and then at this one, and reads the line each run prints at
the end ("trained N steps (S samples, T tokens) in M min: R samples/s"). The old revision runs from a
git worktree of this repository, imported ahead of the installed package. What it prints, and writes to
`OUT/then_and_now.json`: each run's steps, samples and samples a second over its whole budget (compiling
included, as in a demo), the ratio of each round and of the rounds pooled, and the tokens a sample, which
must agree for the ratio to compare the same work (`--old-set` brings an old config to today's recipe).

Why a script and not a `mmfusion bench` item: it needs a git checkout with the old revision's history,
and it times whole training runs, minutes each, rather than steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mmfusion.training.demo import process_layout  # this checkout's rule, for both revisions

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"trained ([\d,]+) steps \(([\d,]+) samples, ([\d,]+) tokens\) in ([\d.]+) (min|s)")


def parse_summary(log: str) -> dict:
    """The numbers of the last "trained ..." line of a training log (`ThroughputMonitor.summary`)."""
    found = SUMMARY.findall(log)
    if not found:
        raise RuntimeError(f"no 'trained N steps ...' line in the run's output; its end:\n{log[-1500:]}")
    steps, samples, tokens, took, unit = found[-1]
    seconds = float(took) * (60 if unit == "min" else 1)
    steps, samples, tokens = (int(x.replace(",", "")) for x in (steps, samples, tokens))
    return {
        "steps": steps,
        "samples": samples,
        "tokens": tokens,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
    }


def train_command(tree: Path, minutes: float, processes: int, out: Path, overrides: list[str]) -> list[str]:
    """`mmfusion train` of `tree`'s demo config, laid out as `mmfusion demo` lays it out."""
    cmd = [sys.executable, "-m", "mmfusion.cli.main", "train", "--config", str(tree / "mmfusion/configs/demo.yaml")]
    budget = [f"train.max_time_minutes={minutes}", f"train.out={out}"]
    return cmd + process_layout(processes, None) + budget + overrides


def run(tree: Path, cmd: list[str], log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    text = log.read_text(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); its end:\n{text[-1500:]}")
    return parse_summary(text)


def compare(old_rev: str, args: argparse.Namespace) -> dict:
    out = Path(args.out or tempfile.mkdtemp(prefix="mmfusion-then-and-now-"))
    out.mkdir(parents=True, exist_ok=True)
    old_tree = out / "old_tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), old_rev], check=True)
    trees = {"old": (old_tree, args.old_set), "new": (REPO, [])}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        for k in range(args.rounds):
            for side, (tree, extra) in trees.items():
                folder = out / f"{side}_{k}"
                cmd = train_command(tree, args.minutes, args.processes, folder, [*args.set, *extra])
                runs[side].append(run(tree, cmd, out / f"{side}_{k}.log"))
                r = runs[side][-1]
                print(f"round {k + 1}, {side}: {r['steps']:,} steps, {r['samples_per_s']:,.0f} samples/s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], check=False)
    result = summarize(old_rev, runs)
    (out / "then_and_now.json").write_text(json.dumps({**result, "args": vars(args)}, indent=2))
    return result


def summarize(old_rev: str, runs: dict[str, list[dict]]) -> dict:
    """Each round's ratio of samples a second, new over old, the rounds pooled, and tokens a sample."""

    def pooled(side: str) -> float:
        return sum(r["samples"] for r in runs[side]) / sum(r["seconds"] for r in runs[side])

    return {
        "old": old_rev,
        "runs": runs,
        "ratios": [n["samples_per_s"] / o["samples_per_s"] for o, n in zip(runs["old"], runs["new"])],
        "pooled_ratio": pooled("new") / pooled("old"),
        "tokens_per_sample": {
            s: sum(r["tokens"] for r in rs) / sum(r["samples"] for r in rs) for s, rs in runs.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", required=True, help="the older revision (a commit, tag or branch of this repository)")
    p.add_argument("--minutes", type=float, default=4.0, help="each run's training budget (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="old, then new, this many times (default 2)")
    p.add_argument("--processes", type=int, default=2, help="data-parallel processes, as `mmfusion demo` (default 2)")
    p.add_argument("--out", help="where the runs and then_and_now.json go (default: a new temporary folder)")
    p.add_argument("--set", nargs="*", default=[], help="overrides for both runs (key=value)")
    p.add_argument("--old-set", nargs="*", default=[], help="overrides for the old run only (key=value)")
    args = p.parse_args(argv)
    result = compare(args.old, args)
    ratios = ", ".join(f"{r:.2f}x" for r in result["ratios"])
    tokens = result["tokens_per_sample"]
    print(
        f"new / old samples a second: {ratios} (pooled {result['pooled_ratio']:.2f}x); tokens a sample: "
        f"old {tokens['old']:.2f}, new {tokens['new']:.2f}"
    )


if __name__ == "__main__":
    main()
