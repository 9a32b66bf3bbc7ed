"""`vae train` -> `data encode` -> training on the stored tokens (the VAE never runs in training)."""

import json

import numpy as np
import pytest

from mmfusion.cli.main import main
from mmfusion.errors import UserError
from tests.conftest import TINY_RUN


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    assert main(["data", "shapes", "--out", str(d / "data"), "--n", "32", "--n-val", "4", "--n-test", "4"]) == 0
    return d / "data"


def test_vae_train_encode_and_train_on_tokens(shapes_dir, tmp_path, monkeypatch):
    vae = tmp_path / "vae"
    assert (
        main(
            [
                "vae",
                "train",
                "--data",
                str(shapes_dir),
                "--out",
                str(vae),
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--channels",
                "8",
                "--channels",
                "16",
            ]
        )
        == 0
    )
    cfg = json.loads((vae / "config.json").read_text())
    assert cfg["latent_channels"] == 4 and cfg["scaling_factor"] > 0
    enc = tmp_path / "enc"
    assert (
        main(
            [
                "data",
                "encode",
                "--data",
                str(shapes_dir),
                "--out",
                str(enc),
                "--vae",
                str(vae),
                "--image-size",
                "32",
                "--patch-size",
                "2",
            ]
        )
        == 0
    )
    import datasets

    ds = datasets.load_from_disk(str(enc))
    tokens = np.asarray(ds["train"][0]["tokens"])
    assert tokens.shape == (64, 16)  # (32 / 2 / 2)^2 tokens of 2 * 2 * 4 channels

    # training reads the tokens: the VAE's encoder must never be called
    from diffusers import AutoencoderKL

    def forbidden(*a, **k):
        raise AssertionError("the VAE encoder ran during training")

    monkeypatch.setattr(AutoencoderKL, "encode", forbidden)
    run = [
        *TINY_RUN,
        "train.max_steps=2",
        f"data.source={enc}",
        "image.kind=vae",
        f"image.path={vae}",
        "image.patch_size=2",
        f"train.out={tmp_path / 'run'}",
    ]
    assert main(["train", *run]) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    # a run whose image config differs from the encoded one is refused with one line
    code = main(["train", *run, "image.patch_size=4", f"train.out={tmp_path / 'run2'}"])
    assert code == 2


@pytest.mark.parametrize("quantizer", ["vq", "binary"])
def test_vq_train_then_token_shuffle_end_to_end(shapes_dir, tmp_path, quantizer):
    """`vq train` -> `train` on the discrete path (s = 2) -> generate -> caption, with the tiny config."""
    from mmfusion.pipeline import MMFusion

    vq = tmp_path / "vq"
    assert (
        main(
            [
                "vq",
                "train",
                "--data",
                str(shapes_dir),
                "--out",
                str(vq),
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--channels",
                "8",
                "--channels",
                "16",
                "--channels",
                "16",
                "--quantizer",
                quantizer,
                "--codebook-size",
                "64",
                "--bits",
                "6",
            ]
        )
        == 0
    )
    run = [
        *TINY_RUN,
        "train.max_steps=3",
        f"data.source={shapes_dir}",
        "image.kind=vq",
        f"image.path={vq}",
        "model.shuffle=2",
        f"train.out={tmp_path / 'run'}",
        "objective.bit_flip=0.05",
        "sample.cfg_schedule=cosine",
        "sample.cfg_scale=2.0",
        "sample.top_k=10",
    ]
    assert main(["train", *run]) == 0
    pipe = MMFusion.from_pretrained(tmp_path / "run" / "model")
    assert pipe.model.cfg.discrete and pipe.model.cfg.image_grid == (4, 4)
    assert pipe.model.cfg.code_bits == (6 if quantizer == "binary" else 0)
    a = pipe.generate(["a red circle", "a blue square"], seed=0)
    b = pipe.generate(["a red circle", "a blue square"], seed=0)
    assert a[0].size == (32, 32) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    caps = pipe.caption(a, max_new_tokens=5)
    assert len(caps) == 2
    # the CLI's Token-Shuffle options reach the sampler; CausalFusion's are refused, not ignored
    model, out = ["--model", str(tmp_path / "run" / "model")], str(tmp_path / "gen")
    assert main(["generate", *model, "--prompt", "a red circle", "--out", out, "--top-k", "1", "--cfg", "1"]) == 0
    assert main(["generate", *model, "--prompt", "a red circle", "--out", out, "--ar-steps", "4"]) == 2
    with pytest.raises(UserError, match="^ar_steps: not a setting of Token-Shuffle's .* its settings: temperature"):
        pipe.generate("a red circle", ar_steps=4, sampler="ddim")
    # the model folder refers to the VQ folder by path; copied into MODEL/image_tokenizer it goes along
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run" / "model", moved / "model")
    cfg = json.loads((moved / "model" / "config.json").read_text())
    cfg["image"]["path"] = str(tmp_path / "gone")
    (moved / "model" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="refers to its image tokenizer at .*gone, which does not exist: copy"):
        MMFusion.from_pretrained(moved / "model").generate("a red circle", seed=0)
    shutil.copytree(vq, moved / "model" / "image_tokenizer")
    again = MMFusion.from_pretrained(moved / "model").generate(["a red circle", "a blue square"], seed=0)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, again))
    if quantizer == "vq":  # a softmax over the codebook: top-1 leaves the seed nothing to choose
        greedy = [pipe.generate("a red circle", seed=k, top_k=1, cfg_scale=1.0)[0] for k in (0, 1)]
        assert np.array_equal(np.asarray(greedy[0]), np.asarray(greedy[1]))


def test_encode_says_when_it_enlarges_the_images(shapes_dir, tmp_path, capsys):
    base = ["data", "encode", "--data", str(shapes_dir), "--image-tokenizer", "pixels", "--patch-size", "8"]
    assert main([*base, "--out", str(tmp_path / "a"), "--image-size", "64"]) == 0
    assert "the images are 32x32 px and are enlarged to 64; --image-size 32 keeps their size" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "b"), "--image-size", "32"]) == 0
    assert "enlarged" not in capsys.readouterr().out
