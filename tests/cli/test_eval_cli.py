import json
import shutil

import pytest

from mmfusion.cli.main import main


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java (CI installs it)")
def test_eval_caption_on_shapes_test_split(trained_tiny, tmp_path):
    data = trained_tiny.parent / "data"  # the run rendered its shapes data here
    out = tmp_path / "cap"
    assert (
        main(
            [
                "eval",
                "caption",
                "--model",
                str(trained_tiny),
                "--data",
                str(data),
                "--out",
                str(out),
                "--limit",
                "6",
                "--no-spice",
            ]
        )
        == 0
    )
    results = json.loads((out / "captions_results.json").read_text())
    assert [r["image_id"] for r in results] == list(range(6)) and all(isinstance(r["caption"], str) for r in results)
    metrics = json.loads((out / "caption_metrics.json").read_text())
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics) and "SPICE" not in metrics


def test_eval_caption_on_coco_json(trained_tiny, tmp_path):
    """COCO caption JSON + image folder, the format of the Karpathy evaluation."""
    assert (
        main(
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
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap needs Java (CI installs it)")
    assert (
        main(
            [
                "eval",
                "caption",
                "--model",
                str(trained_tiny),
                "--data",
                str(tmp_path / "coco" / "captions_test.json"),  # its file names lead to coco/test/: no root
                "--out",
                str(tmp_path / "out"),
                "--limit",
                "4",
                "--method",
                "beam",
                "--num-beams",
                "2",
                "--no-spice",
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "out" / "captions_results.json").read_text())) == 4


def test_eval_shapes(trained_tiny, tmp_path):
    out = tmp_path / "shapes"
    assert (
        main(
            [
                "eval",
                "shapes",
                "--model",
                str(trained_tiny),
                "--out",
                str(out),
                "--n-single",
                "4",
                "--n-pair",
                "4",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    m = json.loads((out / "shapes_metrics.json").read_text())
    assert m["single"]["n"] == 4 and m["pair"]["n"] == 4 and "position" in m["pair"]
    assert 0 <= m["pair"]["accuracy_ci95"][0] <= m["pair"]["accuracy_ci95"][1] <= 1
    assert (out / "shapes_grid.png").exists()


def test_eval_generation_needs_local_weights(trained_tiny, tmp_path):
    code = main(
        [
            "eval",
            "generation",
            "--model",
            str(trained_tiny),
            "--data",
            str(trained_tiny.parent / "data"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
