"""The COCO-30k FID script end to end on a tiny COCO-format fixture (one process, CPU)."""

import importlib.util
import json
from pathlib import Path

import torch

from tests.evaluation.test_generation_metrics import TinyFeatures

SCRIPT = Path(__file__).parent.parent.parent / "eval" / "coco30k_fid.py"


def test_coco30k_script(trained_tiny, tmp_path):
    from mmfusion.cli.main import main as cli

    assert (
        cli(
            [
                "data",
                "export",
                "--data",
                str(trained_tiny.parent / "data"),
                "--out",
                str(tmp_path / "coco"),
                "--format",
                "coco",
            ]
        )
        == 0
    )
    inception = tmp_path / "inception.pt"
    torch.jit.script(TinyFeatures()).save(str(inception))
    spec = importlib.util.spec_from_file_location("coco30k_fid", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(
        [
            "--model",
            str(trained_tiny),
            "--captions",
            str(tmp_path / "coco" / "captions_test.json"),
            "--inception",
            str(inception),
            "--out",
            str(tmp_path / "out"),
            "--n",
            "12",
            "--batch-size",
            "5",
            "--dtype",
            "bfloat16",
        ]
    )
    metrics = json.loads((tmp_path / "out" / "coco30k_metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["fid"] > 0
    assert len(list((tmp_path / "out" / "images" / "rank0").glob("*.png"))) == 12
