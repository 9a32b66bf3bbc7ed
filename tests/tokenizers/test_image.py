import pytest
import torch
from diffusers import AutoencoderKL

from mmfusion.errors import UserError
from mmfusion.tokenizers.config import ImageTokenizerConfig
from mmfusion.tokenizers.image import PixelTokenizer, VAETokenizer, patchify, unpatchify


def test_pixel_tokenizer_round_trip():
    tok = PixelTokenizer(ImageTokenizerConfig(kind="pixels", image_size=32, patch_size=8))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = tok.encode(x)
    assert t.shape == (2, 16, 192) and tok.grid == (4, 4)
    assert torch.equal(tok.decode(t), x)
    # token i is the i-th patch in raster order
    assert torch.equal(t[0, 5].view(8, 8, 3).permute(2, 0, 1), x[0, :, 8:16, 8:16])
    assert torch.equal(unpatchify(patchify(x, 4), 4, (8, 8), 3), x)


def _tiny_vae(path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return vae


def test_vae_tokenizer_from_local_folder(tmp_path):
    vae = _tiny_vae(tmp_path / "vae")
    tok = VAETokenizer(ImageTokenizerConfig(kind="vae", image_size=32, patch_size=2, path=str(tmp_path / "vae")))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = tok.encode(x)
    assert tok.grid == (8, 8) and t.shape == (2, 64, 16)
    z = vae.encode(x).latent_dist.mode() * 0.5  # the scaling factor is applied
    torch.testing.assert_close(t, patchify(z, 2))
    # decoding undoes the scaling: the VAE's own decoder on its own latents
    with torch.no_grad():
        torch.testing.assert_close(tok.decode(t), vae.decode(z / 0.5).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    # an SD-style pipeline folder with a vae/ sub-folder loads too
    _tiny_vae(tmp_path / "pipe" / "vae")
    assert VAETokenizer(ImageTokenizerConfig(kind="vae", patch_size=2, path=str(tmp_path / "pipe"))).grid == (8, 8)


def test_vae_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="needs a model \(`image.path` in a config, `--vae` for `data encode`\)"):
        VAETokenizer(ImageTokenizerConfig(kind="vae"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        VAETokenizer(ImageTokenizerConfig(kind="vae", path=str(tmp_path / "empty")))
