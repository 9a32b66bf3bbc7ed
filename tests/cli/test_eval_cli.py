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


def test_eval_shapes_reports_every_ar_mode_and_caption_content(trained_tiny, tmp_path):
    """By default: T2I at S = 1, S = 4 in random order and one token per step in raster order (S = 16 for
    this model's 16 tokens), each from the same prompts; captions of rendered test images judged by
    content, equal to the judge called on the captions written."""
    from mmfusion.evaluation.caption_content import caption_content
    from mmfusion.evaluation.demo_eval import shapes_test_rows

    out = tmp_path / "shapes"
    args = ["--model", str(trained_tiny), "--out", str(out), "--n-single", "4", "--n-pair", "4", "--steps", "2"]
    assert main(["eval", "shapes", *args, "--captions", "6", "--seed", "3"]) == 0
    m = json.loads((out / "shapes_metrics.json").read_text())
    assert list(m["t2i"]) == ["S=1", "S=4 random", "S=16 raster"]
    for t in m["t2i"].values():
        assert t["single"]["n"] == 4 and t["pair"]["n"] == 4 and "position" in t["pair"]
        assert 0 <= t["pair"]["accuracy_ci95"][0] <= t["pair"]["accuracy_ci95"][1] <= 1
    written = json.loads((out / "captions.json").read_text())
    rows = shapes_test_rows(6, seed=3)
    assert [r["references"] for r in written] == [r["captions"] for r in rows]
    assert m["caption"]["content"] == caption_content([r["caption"] for r in written], rows)
    assert (out / "shapes_grid.png").exists()
    # one mode when asked for it, and no captions with --captions 0
    one = tmp_path / "one"
    assert main(["eval", "shapes", *args[:2], "--out", str(one), "--n-single", "2", "--n-pair", "0",
                 "--ar-steps", "2", "--order", "raster", "--captions", "0"]) == 0  # fmt: skip
    m = json.loads((one / "shapes_metrics.json").read_text())
    assert list(m["t2i"]) == ["S=2 raster"] and "caption" not in m and "pair" not in m["t2i"]["S=2 raster"]


def test_eval_shapes_order_needs_ar_steps(trained_tiny, tmp_path, capsys):
    args = ["--model", str(trained_tiny), "--out", str(tmp_path / "x"), "--order", "raster"]
    assert main(["eval", "shapes", *args]) == 2
    assert "--order needs --ar-steps" in capsys.readouterr().err


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


def test_eval_generation_end_to_end_equals_the_metrics_computed_directly(trained_tiny, tmp_path):
    """`eval generation` with local weights (a tiny TorchScript feature extractor and a tiny CLIP):
    its FID and CLIP score are those of the same images and prompts given to the metric functions."""
    import torch

    from mmfusion.data.datasets import load_captioned
    from mmfusion.evaluation.generation import clip_score, frechet_distance
    from mmfusion.image_io import to_pil, to_tensor
    from mmfusion.pipeline import MMFusion
    from tests.evaluation.test_generation_metrics import TinyFeatures, _tiny_clip

    inception, clip = tmp_path / "inception.pt", tmp_path / "clip"
    torch.jit.script(TinyFeatures()).save(str(inception))
    _tiny_clip(clip, 0)
    data, out = trained_tiny.parent / "data", tmp_path / "out"
    args = ["--model", str(trained_tiny), "--data", str(data), "--out", str(out), "--split", "test"]
    extra = ["--inception", str(inception), "--clip", str(clip), "--n", "10", "--batch-size", "4", "--seed", "3"]
    assert main(["eval", "generation", *args, *extra]) == 0
    metrics = json.loads((out / "generation_metrics.json").read_text())
    rows = load_captioned(data)["test"].select(range(10))
    prompts = [caps[0] for caps in rows["captions"]]
    pipe = MMFusion.from_pretrained(trained_tiny)
    fake = pipe.generate(prompts, seed=3, batch_size=4)
    real = [to_pil(to_tensor(im, pipe.image_cfg.image_size)) for im in rows["image"]]
    assert metrics["n"] == 10
    assert metrics["fid"] == pytest.approx(frechet_distance(real, fake, inception), rel=1e-6)
    assert metrics["clip_score"] == pytest.approx(clip_score(fake, prompts, clip), rel=1e-6)


def test_eval_generation_reads_the_columns_it_is_told(trained_tiny, tmp_path, capsys):
    """Images and captions in columns no usual name finds: refused by name without the options, scored
    with --image-column / --caption-column (the same CLIP score as the usual columns give)."""
    import datasets
    import torch

    from tests.evaluation.test_generation_metrics import _tiny_clip

    clip = tmp_path / "clip"
    _tiny_clip(clip, 0)
    data = datasets.load_from_disk(str(trained_tiny.parent / "data"))
    renamed = data.rename_columns({"image": "picture", "captions": "words"}).remove_columns(["text"])
    renamed.save_to_disk(str(tmp_path / "data"))
    common = ["--model", str(trained_tiny), "--clip", str(clip), "--n", "4", "--batch-size", "4", "--split", "test"]
    assert main(["eval", "generation", *common, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "a")]) == 2
    assert "column" in capsys.readouterr().err
    told = ["--image-column", "picture", "--caption-column", "words"]
    assert (
        main(["eval", "generation", *common, *told, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "b")])
        == 0
    )
    assert (
        main(["eval", "generation", *common, "--data", str(trained_tiny.parent / "data"), "--out", str(tmp_path / "c")])
        == 0
    )
    scores = [json.loads((tmp_path / d / "generation_metrics.json").read_text())["clip_score"] for d in "bc"]
    assert torch.isclose(torch.tensor(scores[0]), torch.tensor(scores[1]))
