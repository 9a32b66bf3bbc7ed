"""End to end on CPU: train -> save -> load -> generate -> caption -> edit, with the tiny config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.errors import UserError
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.pipeline import MMFusion
from tests.helpers import cache_growth


def test_model_folder_round_trip(trained_tiny, tmp_path):
    files = ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in trained_tiny.iterdir()) == files
    pipe = MMFusion.from_pretrained(trained_tiny)
    pipe.save_pretrained(tmp_path / "again")
    again = MMFusion.from_pretrained(tmp_path / "again")
    for (n, a), (_, b) in zip(pipe.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_generate_is_deterministic_and_seeded(trained_tiny):
    pipe = MMFusion.from_pretrained(trained_tiny)
    a = pipe.generate(["a red circle", "a blue square above a red circle"], num_images=2, seed=3, ar_steps=2)
    b = pipe.generate(["a red circle", "a blue square above a red circle"], num_images=2, seed=3, ar_steps=2)
    assert len(a) == 4 and a[0].size == (32, 32)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    c = pipe.generate(["a red circle"], seed=4)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    # batching does not change an image: image 2 alone (seed 3 + 2) equals image 2 of the batch
    alone = pipe.generate(["a blue square above a red circle"], seed=5, ar_steps=2)
    assert np.array_equal(np.asarray(alone[0]), np.asarray(a[2]))


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
def test_caption_is_deterministic(trained_tiny, method):
    pipe = MMFusion.from_pretrained(trained_tiny)
    images = pipe.generate(["a red circle", "a green square"], seed=0)
    a = pipe.caption(images, method=method, seed=1, max_new_tokens=8)
    b = pipe.caption(images, method=method, seed=1, max_new_tokens=8)
    assert a == b and len(a) == 2 and all(isinstance(c, str) for c in a)
    # seeds per image: caption 1 alone, with its seed (1 + 1), is caption 1 of the batch
    assert pipe.caption(images[1], method=method, seeds=[2], max_new_tokens=8) == a[1:]


def test_edit_keeps_unmasked_pixels(trained_tiny):
    pipe = MMFusion.from_pretrained(trained_tiny)
    src = pipe.generate(["a red circle"], seed=0)[0]
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16, :16] = 255  # top-left quarter = 4 of the 16 tokens of 8x8 pixels
    out = pipe.edit(src, Image.fromarray(mask), "a blue square", seed=1, num_images=2)
    for im in out:
        a, b = np.asarray(im), np.asarray(src)
        assert np.array_equal(a[16:], b[16:]) and np.array_equal(a[:, 16:], b[:, 16:])  # pixels: exact
    assert not np.array_equal(np.asarray(out[0])[:16, :16], np.asarray(src)[:16, :16])
    with pytest.raises(UserError, match="mask is 8x8"):
        pipe.edit(src, Image.new("L", (8, 8)), "a red circle")
    with pytest.raises(UserError, match="selects nothing"):
        pipe.edit(src, Image.new("L", (32, 32)), "a red circle")


def test_bf16_weights_generate_and_caption_as_float32(trained_tiny, tmp_path):
    """`dtype="bfloat16"`: the loaded model computes in bf16; its images stay close to the float32 model's
    (deterministic DDIM: mean pixel difference 0.0007 of 255 measured; this 6-step model's images hardly
    depend on the prompt, so the bound of 0.05 catches gross errors only, and the model-level tests the
    rounding) and greedy captions are the same words."""
    full, low = MMFusion.from_pretrained(trained_tiny), MMFusion.from_pretrained(trained_tiny, dtype="bf16")
    assert low.model.dtype == torch.bfloat16 and full.model.dtype == torch.float32
    settings = dict(seed=3, ar_steps=2, sampler="ddim", steps=4)
    a = full.generate(["a red circle", "a blue square above a red circle"], **settings)
    b = low.generate(["a red circle", "a blue square above a red circle"], **settings)
    diff = [np.abs(np.asarray(x, dtype=float) - np.asarray(y, dtype=float)).mean() for x, y in zip(a, b)]
    assert max(diff) < 0.05, diff
    assert full.caption(a, max_new_tokens=8) == low.caption(a, max_new_tokens=8)
    with pytest.raises(UserError, match="float32 or bfloat16"):
        MMFusion.from_pretrained(trained_tiny, dtype="float16")


def test_loaded_tied_embeddings_stay_one_table_in_bf16(trained_tiny, tmp_path):
    """A model folder stores a tied table once; loading (`assign=True`) must tie it again, or `to_dtype`
    would keep a float32 head copy beside a bf16 embedding copy (and LoRA would train two tables)."""
    pipe = MMFusion.from_pretrained(trained_tiny)
    pipe.model = MMFusionModel(pipe.model.cfg.replace(tie_embeddings=True)).eval()
    pipe.save_pretrained(tmp_path / "tied")
    for dtype in (None, "bfloat16"):
        model = MMFusion.from_pretrained(tmp_path / "tied", dtype=dtype).model
        assert model.lm_head.weight is model.embed_tokens.weight
        assert model.lm_head.weight.dtype == torch.float32  # fp32_head keeps the shared table in float32


def test_cli_commands_load_with_the_dtype_asked_for(trained_tiny, tmp_path, monkeypatch):
    from mmfusion.cli.main import main

    seen, load = [], MMFusion.from_pretrained.__func__

    def recording(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(kwargs.get("dtype"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(MMFusion, "from_pretrained", classmethod(recording))
    model, out = ["--model", str(trained_tiny)], tmp_path / "bf16"
    assert main(["generate", *model, "--prompt", "a red circle", "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert main(["caption", str(out / "0000.png"), *model, "--max-new-tokens", "4", "--dtype", "bfloat16"]) == 0
    image = ["--image", str(out / "0000.png"), "--mask", str(out / "0000.png"), "--prompt", "a blue square"]
    assert main(["edit", *model, *image, "--steps", "2", "--out", str(tmp_path / "edit")]) == 0  # default: float32
    shapes = ["--n-single", "2", "--n-pair", "2", "--steps", "2", "--out", str(tmp_path / "ev"), "--dtype", "bfloat16"]
    assert main(["eval", "shapes", *model, *shapes]) == 0
    assert seen[:2] == ["bfloat16", "bfloat16"] and seen[2] == "float32" and seen[3] == "bfloat16"
    assert (tmp_path / "edit").is_dir() and any((tmp_path / "ev").iterdir())  # each command wrote its output


def test_device_choice_and_clear_errors(trained_tiny, capsys, monkeypatch):
    """`auto` is a GPU when there is one, else the CPU; a GPU this machine lacks, or a device name torch
    does not know, is a one-line error (exit code 2), not a crash in the first forward pass. Sampling
    itself keeps its state on the CPU and moves batches to the model's device (`MMFusionModel.forward`);
    with no GPU here that path runs only with model and state both on the CPU."""
    from mmfusion.cli.main import main
    from mmfusion.devices import inference_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device("auto") == inference_device(None) == torch.device("cpu")
    pipe = MMFusion.from_pretrained(trained_tiny, device="auto")
    assert pipe.model.device == torch.device("cpu") and pipe.to("cpu") is pipe
    with pytest.raises(UserError, match="no CUDA GPU"):
        MMFusion.from_pretrained(trained_tiny, device="cuda:1")
    generate = ["generate", "--model", str(trained_tiny), "--prompt", "a red circle", "--out", "x"]
    for device in ("cuda", "gpu"):
        capsys.readouterr()
        code = main([*generate, "--device", device])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and "\n" not in err and "device" in err


def test_missing_model_file_is_a_clear_error(trained_tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="missing tokenizer.json"):
        MMFusion.from_pretrained(broken)
    with pytest.raises(UserError, match="empty"):
        MMFusion.from_pretrained(trained_tiny).generate(["  "])


def test_cli_generate_caption_edit(trained_tiny, tmp_path, capsys):
    from mmfusion.cli.main import main

    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(trained_tiny),
                "--prompt",
                "a red circle",
                "--prompt",
                "a blue square",
                "--num-images",
                "2",
                "--seed",
                "7",
                "--ar-steps",
                "2",
                "--order",
                "raster",
                "--sampler",
                "ddim",
                "--steps",
                "3",
                "--cfg",
                "2.0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    assert [r["prompt"] for r in index] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [r["seed"] for r in index] == [7, 8, 9, 10]
    assert all((out / r["file"]).exists() for r in index) and (out / "grid.png").exists()
    files = [str(out / r["file"]) for r in index[:2]]
    assert main(["caption", "--model", str(trained_tiny), *files, "--json", str(tmp_path / "c.json")]) == 0
    caps = json.loads((tmp_path / "c.json").read_text())
    assert sorted(caps) == sorted(files)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), ((0, 24), (0, 24)))).save(mask)
    assert (
        main(
            [
                "edit",
                "--model",
                str(trained_tiny),
                "--image",
                files[0],
                "--mask",
                str(mask),
                "--prompt",
                "a green circle",
                "--out",
                str(tmp_path / "edit"),
                "--steps",
                "3",
            ]
        )
        == 0
    )
    assert (tmp_path / "edit" / "grid.png").exists() and (tmp_path / "edit" / "0000.png").exists()
    # a bad request: one line, non-zero exit, nothing written
    code = main(
        [
            "edit",
            "--model",
            str(trained_tiny),
            "--image",
            files[0],
            "--mask",
            files[0] + ".nope",
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert code == 2 and not (tmp_path / "bad").exists()


def test_class_conditional_model(tmp_path):
    from mmfusion.config import load_config
    from mmfusion.training.run import train
    from tests.conftest import TINY_RUN

    cfg = load_config(
        None,
        [
            *TINY_RUN,
            "objective.condition=class",
            "model.num_classes=12",
            "model.class_repeat=2",
            "data.shapes_pair_fraction=0.0",
            "train.max_steps=3",
            f"train.out={tmp_path}",
        ],
    )
    pipe = MMFusion.from_pretrained(train(cfg))
    assert pipe.class_names[0] == "red circle" and len(pipe.class_names) == 12
    by_name = pipe.generate(["a red circle", "blue square"], seed=1)
    by_index = pipe.generate([0, pipe.class_names.index("blue square")], seed=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(by_name, by_index))
    with pytest.raises(UserError, match="unknown class"):
        pipe.generate(["a purple circle"])
    with pytest.raises(UserError, match="no captioning"):
        pipe.caption(by_name)


def test_readme_python_snippet_runs_as_written(trained_tiny, tmp_path, monkeypatch):
    """The README's Python API block, run unchanged against a tiny model saved as demo/model."""
    import re
    import shutil
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(trained_tiny, tmp_path / "demo" / "model")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert len(scope["images"]) == 4 and all(isinstance(x, Image.Image) for x in scope["images"])
    assert len(scope["captions"]) == 4 and all(isinstance(c, str) for c in scope["captions"])
    edits = scope["edits"]
    assert len(edits) == 2 and edits[0].size == scope["images"][0].size
    # the right half, not under the mask, is kept (up to the image tokenizer's round trip)
    right = np.s_[:, edits[0].width // 2 :]
    original = np.asarray(scope["images"][0])[right].astype(int)
    assert np.abs(np.asarray(edits[0])[right].astype(int) - original).max() <= 2


def test_progress_bars_tick_per_denoising_pass_and_per_caption_batch(trained_tiny, monkeypatch):
    """S = 1 runs all its denoising passes in one AR step: the bar counts the passes, not AR steps (it
    stood still, then jumped to 1/1); captioning more than one batch shows a bar over the images."""
    from mmfusion.generation import common
    from mmfusion.generation import diffusion as sampler

    bars = []

    class Bar:
        def __init__(self, total=None, desc="", disable=False, **kwargs):
            self.total, self.desc, self.disable, self.n = total, desc, disable, 0
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def set_postfix_str(self, *args, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(sampler, "tqdm", Bar)
    monkeypatch.setattr(common, "tqdm", Bar)
    pipe = MMFusion.from_pretrained(trained_tiny)
    for ar_steps in (1, 2):
        pipe.generate("a red circle", progress=True, ar_steps=ar_steps, steps=3)
        bar = next(b for b in reversed(bars) if b.desc == "denoising")
        assert not bar.disable and bar.total == bar.n == 3 * ar_steps
    images = pipe.generate(["a red circle"] * 3, steps=2)
    pipe.caption(images, batch_size=2, progress=True, max_new_tokens=2)
    assert [(b.total, b.n, b.disable) for b in bars if b.desc == "captions"] == [(3, 3, False)]


def test_a_local_image_tokenizer_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """A model trained with image.path=vq (relative) must find its VQ folder from anywhere: a relative
    path that is not found is looked up on the hub."""
    from mmfusion.hub import absolute_local_path, image_tokenizer_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "vq").mkdir()
    assert absolute_local_path({"kind": "vq", "path": "vq"})["path"] == str(tmp_path / "vq")
    assert absolute_local_path({"kind": "vae", "path": "org/hub-id"})["path"] == "org/hub-id"  # not local
    assert absolute_local_path({"kind": "pixels", "path": None})["path"] is None
    (tmp_path / "model" / "image_tokenizer").mkdir(parents=True)  # a copy inside wins, by absolute path
    assert image_tokenizer_path(Path("model"), "/elsewhere/vq") == str(tmp_path / "model" / "image_tokenizer")


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_the_diffusers_style_call_equals_generate(trained_tiny):
    """`pipe(prompt, ...)` as a diffusers user writes it: the same images as `generate` for the same seeds,
    its options mapped onto the model's sampler settings, and a generator that advances as diffusers' do."""
    pipe = MMFusion.from_pretrained(trained_tiny)
    prompts = ["a red circle", "a blue square above a red circle"]
    kw = dict(num_inference_steps=3, guidance_scale=2.0, num_images_per_prompt=2, ar_steps=2, order="raster")
    out = pipe(prompts, seed=5, **kw)
    assert out.seeds == [5, 6, 7, 8] and out.prompts == [prompts[0]] * 2 + [prompts[1]] * 2
    assert _same(
        out.images, pipe.generate(prompts, num_images=2, seed=5, steps=3, cfg_scale=2.0, ar_steps=2, order="raster")
    )
    gen = torch.Generator().manual_seed(1)
    first, second = pipe(prompts, generator=gen, **kw), pipe(prompts, generator=gen, **kw)
    assert first.seeds != second.seeds  # the generator's state moved on
    again = pipe(prompts, generator=torch.Generator().manual_seed(1), **kw)
    assert again.seeds == first.seeds and _same(again.images, first.images)
    replay = pipe.generate(first.prompts, seeds=first.seeds, steps=3, cfg_scale=2.0, ar_steps=2, order="raster")
    assert _same(replay, first.images)
    with pytest.raises(UserError, match="got 3 generators for 4 images"):
        pipe(prompts, generator=[torch.Generator()] * 3, **kw)
    with pytest.raises(UserError, match="^top_k: not a setting of CausalFusion"):
        pipe(prompts, top_k=5)


def test_a_negative_prompt_replaces_the_unconditional_stream(trained_tiny):
    """Guidance steers away from the negative prompt: it changes the images (and edits), and an empty one
    is no negative prompt at all; without guidance it has nothing to act on."""
    pipe = MMFusion.from_pretrained(trained_tiny)
    kw = dict(seed=2, steps=3, cfg_scale=3.0, num_images=2)
    plain = pipe.generate("a red circle", **kw)
    assert _same(pipe.generate("a red circle", negative_prompt="", **kw), plain)
    away = pipe.generate("a red circle", negative_prompt="a blue square", **kw)
    assert not _same(away, plain)
    per_prompt = pipe.generate(
        ["a red circle", "a red circle"],
        negative_prompt=["", "a blue square"],
        seed=2,
        steps=3,
        cfg_scale=3.0,
        seeds=[2, 3],
    )
    assert _same(per_prompt[:1], plain[:1]) and _same(per_prompt[1:], away[1:])
    unguided = dict(seed=2, steps=3, cfg_scale=1.0)
    assert _same(
        pipe.generate("a red circle", negative_prompt="a blue square", **unguided),
        pipe.generate("a red circle", **unguided),
    )
    with pytest.raises(UserError, match="got 3 negative prompts for 1 prompts"):
        pipe.generate("a red circle", negative_prompt=["a", "b", "c"])
    image, mask = plain[0], np.zeros((32, 32), dtype=np.uint8)
    mask[:16] = 255
    edit = dict(seed=1, num_images=1, steps=3, cfg_scale=3.0)
    base = pipe.edit(image, mask, "a red circle", **edit)
    assert _same(pipe.edit(image, mask, "a red circle", negative_prompt="", **edit), base)
    assert not _same(pipe.edit(image, mask, "a red circle", negative_prompt="a blue square", **edit), base)


def test_cli_negative_prompt_reaches_the_sampler(trained_tiny, tmp_path):
    from mmfusion.cli.main import main

    args = ["--model", str(trained_tiny), "--prompt", "a red circle", "--seed", "4", "--steps", "2", "--cfg", "3"]
    assert main(["generate", *args, "--negative-prompt", "a blue square", "--out", str(tmp_path / "n")]) == 0
    pipe = MMFusion.from_pretrained(trained_tiny)
    want = pipe.generate("a red circle", seed=4, steps=2, cfg_scale=3.0, negative_prompt="a blue square")
    assert _same([Image.open(tmp_path / "n" / "0000.png")], want)
    assert not _same(
        [Image.open(tmp_path / "n" / "0000.png")], pipe.generate("a red circle", seed=4, steps=2, cfg_scale=3.0)
    )


def test_user_images_are_made_square_by_the_models_resize_policy(tmp_path):
    """Captioning and editing turn an image into the model's input as its training did (`data.resize`,
    saved in the model folder); a folder from before the setting squashes, as then."""
    from mmfusion.image_io import to_tensor

    pipe = MMFusion.from_pretrained(Path(__file__).parent / "fixtures" / "model_2026_12_05", device="cpu")
    assert pipe.resize == "squash"
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    size = pipe.image_cfg.image_size
    for policy in ("squash", "center_crop", "pad"):
        pipe.resize = policy
        want = pipe.image_tokenizer.encode(to_tensor(image, size, policy)[None])
        assert torch.equal(pipe.encode_images([image]), want), policy
    pipe.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["resize"] == "pad"
    assert MMFusion.from_pretrained(tmp_path / "model", device="cpu").resize == "pad"


def test_cli_generate_lookahead_draws_what_the_api_draws(trained_tiny, tmp_path):
    """`--lookahead` and `--temperature` reach the sampler: the PNGs are the API's images with the same
    settings, and not the images without lookahead."""
    from mmfusion.cli.main import main

    out = tmp_path / "gen"
    flags = ["--ar-steps", "4", "--steps", "3", "--temperature", "0.5", "--lookahead", "4", "--seed", "3"]
    assert main(["generate", "--model", str(trained_tiny), "--prompt", "a red circle", *flags, "--out", str(out)]) == 0
    written = np.asarray(Image.open(out / json.loads((out / "index.json").read_text())[0]["file"]))
    pipe = MMFusion.from_pretrained(trained_tiny)
    kwargs = dict(seed=3, ar_steps=4, steps=3, temperature=0.5)
    assert np.array_equal(written, np.asarray(pipe.generate(["a red circle"], lookahead=4, **kwargs)[0]))
    assert not np.array_equal(written, np.asarray(pipe.generate(["a red circle"], lookahead=0, **kwargs)[0]))


def test_no_sampler_grows_the_cache_inside_the_backbone(trained_tiny, monkeypatch):
    """Room for a pass's keys is made before the pass (`KVCache.reserve`), so `attend`, which a compiled
    backbone traces, never allocates: generation by several AR steps with guidance over part of the
    steps (passes over the conditional rows alone), editing, and greedy, beam and nucleus captions."""
    grown = cache_growth(monkeypatch)
    pipe = MMFusion.from_pretrained(trained_tiny)
    images = pipe.generate(["a red circle", "a blue square"], ar_steps=4, steps=6, cfg_interval=(0.3, 0.7))
    mask = Image.new("L", images[0].size)
    mask.paste(255, (0, 0, images[0].width // 2, images[0].height))
    pipe.edit(images[0], mask, "a green triangle", num_images=2, steps=4)
    for method in ("greedy", "beam", "nucleus"):
        pipe.caption(images, method=method)
    assert grown == []


def test_a_compiled_pipeline_samples_and_captions_as_the_eager_one(trained_tiny):
    """`pipe.compile()`: the same images (to a level of rounding) and captions (greedy and beam) as the
    eager model, at batches of 1, 3 and 8, by one AR step and by several, without reaching dynamo's
    recompile limit (past it a call would run eager)."""
    import torch._dynamo.utils

    from mmfusion.model.transformer import INFERENCE_RECOMPILE_LIMIT, can_compile

    if not can_compile():
        pytest.skip("no C++ compiler for inductor")
    eager, compiled = MMFusion.from_pretrained(trained_tiny), MMFusion.from_pretrained(trained_tiny).compile()
    assert compiled.model.backbone._compiled_call_impl is not None and eager.model.backbone._compiled_call_impl is None
    prompts = ["a red circle", "a blue square above a green triangle", "a yellow circle"] * 3
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n, changes in ((1, {}), (3, {}), (8, {}), (3, {"ar_steps": 4, "order": "raster", "steps": 6})):
        want = eager.generate(prompts[:n], seed=5, **changes)
        got = compiled.generate(prompts[:n], seed=5, **changes)
        diff = max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(want, got))
        assert diff <= 1, (n, changes, diff)
        for method in ("greedy", "beam"):
            assert compiled.caption(want, method=method) == eager.caption(want, method=method)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs <= 16 < INFERENCE_RECOMPILE_LIMIT, graphs  # a few per kind of pass, not one per size
