"""The COCO-30k FID script end to end on a tiny COCO-format fixture (CPU): in one process, and in two
processes launched with torchrun, whose shards merge into the one-process result."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.evaluation.test_generation_metrics import TinyFeatures

SCRIPT = Path(__file__).parent.parent.parent / "eval" / "coco30k_fid.py"


@pytest.fixture(scope="module")
def coco(trained_tiny, tmp_path_factory):
    """(captions JSON, TorchScript feature extractor) of a COCO-format export of the tiny run's data."""
    from mmfusion.cli.main import main as cli

    folder = tmp_path_factory.mktemp("coco")
    data = str(trained_tiny.parent / "data")
    assert cli(["data", "export", "--data", data, "--out", str(folder), "--format", "coco"]) == 0
    inception = folder / "inception.pt"
    torch.jit.script(TinyFeatures()).save(str(inception))
    return folder / "captions_test.json", inception


def _args(model, coco, out, *extra):
    captions, inception = coco
    return [
        *("--model", str(model), "--captions", str(captions), "--inception", str(inception)),
        *("--out", str(out), "--num-images", "12", "--batch-size", "5", *extra),
    ]


def _run_here(argv):
    spec = importlib.util.spec_from_file_location("coco30k_fid", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(argv)


def test_coco30k_script(trained_tiny, coco, tmp_path):
    _run_here(_args(trained_tiny, coco, tmp_path / "out", "--dtype", "bfloat16"))
    metrics = json.loads((tmp_path / "out" / "coco30k_metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["fid"] > 0
    assert len(list((tmp_path / "out" / "images" / "rank0").glob("*.png"))) == 12


def test_two_processes_split_the_prompts_and_merge_into_the_one_process_result(trained_tiny, coco, tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, *_args(trained_tiny, coco, tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _run_here(_args(trained_tiny, coco, tmp_path / "one"))
    shards = [sorted(p.name for p in (tmp_path / "two" / "images" / f"rank{r}").glob("*.png")) for r in (0, 1)]
    assert [len(s) for s in shards] == [6, 6] and not set(shards[0]) & set(shards[1])  # each rank its own half
    for name in sorted(shards[0] + shards[1]):  # one seed per prompt: the same image in either launch
        rank = 0 if name in shards[0] else 1
        two = np.asarray(Image.open(tmp_path / "two" / "images" / f"rank{rank}" / name))
        assert np.array_equal(two, np.asarray(Image.open(tmp_path / "one" / "images" / "rank0" / name))), name
    one, two = (json.loads((tmp_path / d / "coco30k_metrics.json").read_text()) for d in ("one", "two"))
    assert two["n"] == one["n"] == 12
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-5)
