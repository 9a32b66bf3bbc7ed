"""FID and CLIP score through torchmetrics with weights from local files (tiny models made here)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.errors import UserError
from mmfusion.evaluation.generation import clip_score, frechet_distance


class TinyFeatures(torch.nn.Module):
    """A stand-in Inception: uint8 images -> 8 pooled colour / texture features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # 12
        return torch.cat([pooled[:, :6], x.std(dim=(2, 3))[:, :2]], 1)


def _images(seed: int, n: int = 24, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(np.clip(rng.normal(128 + shift, 40, (16, 16, 3)), 0, 255).astype(np.uint8)) for _ in range(n)
    ]


def test_fid_with_local_feature_extractor(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(TinyFeatures()).save(str(path))
    same = frechet_distance(_images(0), _images(0), path)
    near = frechet_distance(_images(0), _images(1), path)
    far = frechet_distance(_images(0), _images(1, shift=60), path)
    assert abs(same) < 1e-3 and 0 < near < far
    with pytest.raises(UserError, match="not found"):
        frechet_distance(_images(0), _images(1), tmp_path / "missing.pt")


def _tiny_clip(path, seed):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    path.mkdir(exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model, proc


def test_clip_score_equals_direct_computation(tmp_path):
    images = [Image.new("RGB", (32, 32), c) for c in ((220, 40, 40), (40, 80, 220), (40, 170, 60))]
    prompts = ["a red circle", "a blue square", "a green triangle"]
    for seed in range(20):  # a random tiny CLIP; pick one whose score is not floored at zero
        model, proc = _tiny_clip(tmp_path / f"clip{seed}", seed)
        with torch.no_grad():
            img = proc(images=images, return_tensors="pt")["pixel_values"]
            txt = proc(text=prompts, return_tensors="pt", padding=True)
            fi = model.get_image_features(img).pooler_output
            ft = model.get_text_features(txt["input_ids"], txt["attention_mask"]).pooler_output
        cos = torch.nn.functional.cosine_similarity(fi, ft)
        expected = max(100 * cos.mean().item(), 0.0)  # torchmetrics: mean score, floored at 0
        if expected > 0:
            break
    assert expected > 0
    assert clip_score(images, prompts, tmp_path / f"clip{seed}") == pytest.approx(expected, rel=1e-4, abs=1e-4)
    with pytest.raises(UserError, match="CLIP model folder"):
        clip_score(images, prompts, tmp_path / "nope")
