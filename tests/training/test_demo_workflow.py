"""The demo workflow end to end on a tiny model: data, training, model folder, and every judged output."""

import json

from PIL import Image


def test_run_demo_writes_the_model_the_samples_and_the_metrics(tmp_path, capsys):
    import math

    import torch

    from mmfusion.training.demo import run_demo

    threads = torch.get_num_threads()

    out = tmp_path / "demo"
    small = ["data.shapes_n=600", "train.compile=false", "model.preset=tiny", "train.max_steps=4", "sample.steps=2"]
    try:
        metrics = run_demo(small, out=out, threads=2)
    finally:
        torch.set_num_threads(threads)
    for name in ("model/model.safetensors", "samples/grid.png", "eval_grid.png", "captions.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert set(metrics["t2i"]) == {"S=1", "S=4 random", "S=16 raster"}
    assert {"CIDEr", "content"} <= set(metrics["caption"]) and not metrics["minutes"]["resumed"]
    assert all(math.isfinite(v) and v >= 0 for v in metrics["minutes"].values() if not isinstance(v, bool))
    assert 0 <= metrics["caption"]["CIDEr"] < 10
    assert metrics["sampler"]["steps"] == 2  # the demo config's sampling, with the override
    captions = json.loads((out / "captions.json").read_text())
    assert captions and {"image", "caption", "references"} <= set(captions[0])
    assert Image.open(out / "samples" / "grid.png").size[0] > 100
    assert "demo finished in" in capsys.readouterr().out
    card = (out / "model" / "README.md").read_text()  # the model card shows the figures just measured
    assert "library_name: mmfusion" in card and "| T2I S=1: one object, accuracy |" in card and "CIDEr" in card
