"""Bad requests, non-finite losses, safe loading and determinism."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.cli.main import main
from tests.conftest import TINY_RUN


def _one_line_error(capsys, code):
    """The failure ends with exactly one `error:` line (library progress output may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0, "expected a failure"
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-3:]
    return errors[0]


def test_bad_requests_fail_with_one_line_and_write_nothing(trained_tiny, tmp_path, capsys):
    model = str(trained_tiny)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    err = _one_line_error(capsys, main(["caption", "--model", model, str(garbage), "--json", str(tmp_path / "c.json")]))
    assert "cannot read image" in err and "PNG, JPEG" in err
    assert not (tmp_path / "c.json").exists()
    huge = tmp_path / "huge.png"
    Image.new("RGB", (2000, 1000), "white").save(huge)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)  # PIL's decompression-bomb limit, lowered
        err = _one_line_error(capsys, main(["caption", "--model", model, str(huge)]))
    assert f"image {huge} is too large to open" in err

    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "white").save(img)
    mask = tmp_path / "mask.png"
    Image.new("L", (20, 20), 255).save(mask)
    err = _one_line_error(
        capsys,
        main(
            [
                "edit",
                "--model",
                model,
                "--image",
                str(img),
                "--mask",
                str(mask),
                "--prompt",
                "a red circle",
                "--out",
                str(tmp_path / "e"),
            ]
        ),
    )
    assert "mask is 20x20 pixels" in err and "give a mask of the image's size" in err
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())

    err = _one_line_error(capsys, main(["generate", "--model", model, "--prompt", " ", "--out", str(tmp_path / "g")]))
    assert "prompt is empty" in err
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())

    # bad sampling requests: one line each, before any sampling, nothing written
    for option, value, message in [
        ("--num-images", "0", "num_images and batch_size must be at least 1"),
        ("--steps", "0", "steps: (denoising steps per AR step) must be at least 1, got 0"),
        ("--ar-steps", "100", "ar_steps=100 exceeds the"),
    ]:
        args = ["generate", "--model", model, "--prompt", "a red circle", "--out", str(tmp_path / "g"), option, value]
        assert message in _one_line_error(capsys, main(args))
        assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())

    err = _one_line_error(capsys, main(["train", *TINY_RUN, "train.learning_rate=1", f"train.out={tmp_path / 't'}"]))
    assert "train.learning_rate: unknown key; the keys of train: " in err
    err = _one_line_error(capsys, main(["train", *TINY_RUN, "data.batch_size=eight", f"train.out={tmp_path / 't'}"]))
    assert "data.batch_size: must be of type int, got 'eight'" in err
    ddp = ["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu"]  # refused before any launch
    err = _one_line_error(
        capsys, main(["train", *TINY_RUN, *ddp, "data.global_batch_size=3", f"train.out={tmp_path / 't'}"])
    )
    assert "data.global_batch_size: 3 does not split into 2" in err

    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny, broken)
    (broken / "model.safetensors").unlink()
    err = _one_line_error(
        capsys, main(["generate", "--model", str(broken), "--prompt", "a red circle", "--out", str(tmp_path / "g2")])
    )
    assert "missing model.safetensors" in err


def _nan_after(step_limit):
    from mmfusion.training.objective import JointObjective

    real = JointObjective.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        out = real(self, model, batch)
        calls["n"] += 1
        if step_limit(calls["n"]):
            out["loss"] = out["loss"] * float("nan")
        return out

    return loss


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    from mmfusion.training.objective import JointObjective

    monkeypatch.setattr(JointObjective, "loss", _nan_after(lambda n: n in (3, 4, 7)))
    assert main(["train", *TINY_RUN, "train.max_steps=10", f"train.out={tmp_path}"]) == 0
    assert "skipped 3 steps with a non-finite loss" in capsys.readouterr().out


def test_divergence_stops_with_checkpoint_intact(tmp_path, monkeypatch, capsys):
    from mmfusion.training.objective import JointObjective

    monkeypatch.setattr(JointObjective, "loss", _nan_after(lambda n: n > 5))
    code = main(
        [
            "train",
            *TINY_RUN,
            "train.max_steps=40",
            "train.max_nonfinite=4",
            "train.checkpoint_every_n_steps=2",
            f"train.out={tmp_path}",
        ]
    )
    err = _one_line_error(capsys, code)
    assert "not finite for 4 steps in a row" in err and "--resume" in err
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] < 10  # skipped steps leave the weights as they were
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_pickle_checkpoint_does_not_execute(trained_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_tiny.parent / "config.json", run / "config.json")
    shutil.copy(trained_tiny.parent / "tokenizer.json", run / "tokenizer.json")
    with open(run / "checkpoints" / "last.ckpt", "wb") as f:
        pickle.dump({"state_dict": _Exploit()}, f)
    from mmfusion.errors import UserError
    from mmfusion.training.checkpoint import load_run_checkpoint

    with pytest.raises(UserError, match="not a weights-only checkpoint"):
        load_run_checkpoint(run / "checkpoints" / "last.ckpt")
    err = _one_line_error(capsys, main(["train", *TINY_RUN, f"train.out={run}", "--resume"]))
    assert "refused to load" in err
    # a model folder whose weights file is a pickle is refused too
    bad = tmp_path / "model"
    shutil.copytree(trained_tiny, bad)
    with open(bad / "model.safetensors", "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses the header; nothing is unpickled
        from mmfusion.pipeline import MMFusion

        MMFusion.from_pretrained(bad)
    assert not (tmp_path / "PWNED").exists()


def test_samples_and_captions_are_bit_identical_across_processes(trained_tiny, tmp_path):
    def run(i):
        out = tmp_path / f"g{i}"
        cmd = [
            sys.executable,
            "-m",
            "mmfusion.cli.main",
            "generate",
            "--model",
            str(trained_tiny),
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square above a green triangle",
            "--num-images",
            "2",
            "--seed",
            "5",
            "--ar-steps",
            "2",
            "--steps",
            "4",
            "--out",
            str(out),
        ]
        assert subprocess.run(cmd, capture_output=True).returncode == 0
        files = sorted(out.glob("0*.png"))
        cap = tmp_path / f"c{i}.json"
        cmd = [
            sys.executable,
            "-m",
            "mmfusion.cli.main",
            "caption",
            "--model",
            str(trained_tiny),
            *map(str, files),
            "--method",
            "nucleus",
            "--json",
            str(cap),
        ]
        assert subprocess.run(cmd, capture_output=True).returncode == 0
        return [np.asarray(Image.open(f)) for f in files], list(json.loads(cap.read_text()).values())

    (imgs_a, caps_a), (imgs_b, caps_b) = run(0), run(1)
    assert len(imgs_a) == 4 and all(np.array_equal(a, b) for a, b in zip(imgs_a, imgs_b))
    assert caps_a == caps_b
