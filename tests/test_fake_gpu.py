"""Sampling with the model on a GPU, on a machine without one: the model goes to a stand-in device
(`tests/fake_gpu.py`) that computes on the CPU but refuses every op CUDA would refuse (CPU and GPU
tensors in one op, a CPU generator drawing a GPU tensor, a CPU tensor indexed by a GPU index). Each
path must run there and give exactly what it gives on the CPU: the samplers keep their state and their
seeded generators on the CPU and move only the model's inputs and outputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import sys

import numpy as np
import torch

from tests import fake_gpu
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.pipeline import MMFusion
from mmfusion.generation.settings import TokenSampling
from mmfusion.generation.tokens import ARImageSampler

folder = sys.argv[1]
prompts = ["a red circle", "a blue square above a red circle"]


def runs(pipe):
    out = {}
    out["generate"] = pipe.generate(prompts, seed=3, ar_steps=2, sampler="ddpm", steps=3, cfg_interval=(0.2, 0.8))
    out["uncached"] = pipe.generate_tokens(prompts, [0, 1], pipe.image_settings(ar_steps=3, steps=2), use_cache=False)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16] = 255
    out["edit"] = pipe.edit(out["generate"][0], mask, "a blue square", seed=1, num_images=2, steps=2)
    out["greedy"] = pipe.caption(out["generate"], max_new_tokens=6)
    out["beam"] = pipe.caption(out["generate"], method="beam", num_beams=2, max_new_tokens=6)
    out["nucleus"] = pipe.caption(out["generate"], method="nucleus", max_new_tokens=6, seed=2)
    return out


def shuffle_runs(model):
    sampler = ARImageSampler(model, TokenSampling(temperature=1.0, top_k=8, cfg_scale=2.0, cfg_schedule="linear"))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    conds, unconds = [[1, 5, 6, 3], [1, 7, 3]], [[1, 3], [1, 3]]
    return [sampler(conds, unconds, gens()), sampler(conds, unconds, gens(), use_cache=False)]


def same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if hasattr(a, "size"):  # PIL
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


cpu = runs(MMFusion.from_pretrained(folder))
torch.manual_seed(0)
cfg = ModelConfig.from_name("tiny", image_codebook_size=64, code_bits=6, shuffle=2, image_grid=(4, 4),
                            window_head="autoregressive")
shuffle_model = MMFusionModel(cfg).eval()
shuffle_cpu = shuffle_runs(shuffle_model)
pipe = MMFusion.from_pretrained(folder)
with fake_gpu.FakeGPUMode():
    fake_gpu.to_fake_gpu(pipe.model)
    fake_gpu.to_fake_gpu(shuffle_model)
    assert pipe.model.device.type == "meta" and shuffle_model.device.type == "meta"
    gpu = runs(pipe)
    shuffle_gpu = shuffle_runs(shuffle_model)
for key in cpu:
    assert same(cpu[key], gpu[key]), key

# a latent model: MMFusion built around a model already on the GPU puts its VAE there too, and encodes
# (editing) and decodes there
from diffusers import AutoencoderKL
from mmfusion.diffusion.config import DiffusionConfig
from mmfusion.tokenizers.image import VAETokenizer
from mmfusion.tokenizers.config import ImageTokenizerConfig

torch.manual_seed(0)
vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)
vae.save_pretrained(sys.argv[2])
image = ImageTokenizerConfig(kind="vae", image_size=32, patch_size=2, path=sys.argv[2])
latent_cfg = pipe.model.cfg.replace(image_token_dim=16, image_grid=(8, 8))
latent = MMFusionModel(latent_cfg).eval()


def latent_runs(model, tokenizer):
    p = MMFusion(model, pipe.text_tokenizer, image, DiffusionConfig(), image_tokenizer=tokenizer)
    images = p.generate(prompts, seed=0, ar_steps=2, steps=2)
    return images + p.edit(images[0], np.full((32, 32), 255, dtype=np.uint8), "a red circle", steps=2)


latent_cpu = latent_runs(latent, VAETokenizer(image))
tokenizer = VAETokenizer(image)  # loaded on the CPU; MMFusion moves it to the model's device
with fake_gpu.FakeGPUMode():
    fake_gpu.to_fake_gpu(latent)
    latent_gpu = latent_runs(latent, tokenizer)
    assert tokenizer.vae.decoder.conv_out.weight.device.type == "meta"
assert same(latent_cpu, latent_gpu), "latent"
assert all(isinstance(t, torch.Tensor) and not isinstance(t, fake_gpu.FakeGPU) for t in shuffle_gpu)
assert same(shuffle_cpu, shuffle_gpu), "token-shuffle"
print("ok", sorted(cpu))
"""


def test_sampling_with_the_model_on_a_gpu_matches_the_cpu(trained_tiny, tmp_path):
    root = Path(__file__).parent.parent
    script = tmp_path / "fake_gpu_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), str(trained_tiny), str(tmp_path / "vae")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(proc.stdout[-2000:] + proc.stderr[-4000:])
    assert proc.stdout.strip().startswith("ok")
