import copy

import pytest
import torch

from mmfusion.model.config import ModelConfig
from mmfusion.model.masks import NOISY
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import SequenceBuilder, collate
from tests.helpers import cache_growth, fusion_sample, text_batch


@pytest.mark.parametrize("sandwich,gqa", [(False, None), (True, 2)])
def test_shapes(tiny_cfg, sandwich, gqa):
    cfg = tiny_cfg.replace(sandwich_norm=sandwich, n_kv_heads=gqa)
    model = MMFusionModel(cfg)
    batch = collate(
        [fusion_sample(cfg, [1, 5, 6], [3, 2, 4], caption=[4, 9, 10, 2]), fusion_sample(cfg, [1, 7], [9], seed=1)]
    )
    h = model(batch)
    assert h.shape == (2, batch.kind.shape[1], cfg.dim)
    assert model.text_logits(h).shape == (2, batch.kind.shape[1], cfg.vocab_size)
    assert model.image_output(h).shape == (2, batch.kind.shape[1], cfg.image_token_dim)
    assert torch.isfinite(h).all()


def test_no_biases_and_llama_names(tiny_cfg):
    names = dict(MMFusionModel(tiny_cfg).backbone.named_parameters())
    assert not [n for n in names if n.endswith("bias")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{proj}.weight" in n for n in names), proj


def test_masked_token_never_changes_other_outputs(tiny_cfg):
    """Perturb each input token in turn: outputs change exactly where the mask lets it be seen."""
    model = MMFusionModel(tiny_cfg).eval()
    batch = collate([fusion_sample(tiny_cfg, [1, 5, 6], [2, 3, 2], caption=[4, 9, 10, 2])])
    mask = batch.mask()[0]
    base = model(batch)[0]
    for k in range(batch.kind.shape[1]):
        x = model.embed(batch).clone()
        x[0, k] += torch.randn(tiny_cfg.dim)
        out = model.backbone(x, batch.position_ids, batch.mask())[0]
        changed = (out - base).abs().amax(-1) > 1e-6
        assert torch.equal(changed, mask[:, k]), f"token {k}"


def test_kv_cache_decoding_equals_full_recomputation(tiny_cfg):
    model = MMFusionModel(tiny_cfg).eval()
    ids = torch.randint(5, tiny_cfg.vocab_size, (2, 12)).tolist()
    full = model.text_logits(model(text_batch(ids)))
    cache = model.new_cache()
    prefix = text_batch([r[:5] for r in ids])
    steps = [model.text_logits(model(prefix, cache, store=True))]
    for i in range(5, 12):
        step = collate([SequenceBuilder(48, start_position=i).text([r[i]]).tensors() for r in ids])
        steps.append(model.text_logits(model(step, cache, store=True)))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_a_pass_never_grows_the_cache_inside_the_backbone(tiny_cfg, monkeypatch):
    """The model makes room for a pass's keys before it (`KVCache.reserve`), so `attend`, inside what a
    compiled backbone traces, only writes: a decode of many steps and rows allocates nothing there, and
    equals the recomputation as before."""
    model = MMFusionModel(tiny_cfg.replace(n_kv_heads=2)).eval()
    grown = cache_growth(monkeypatch)
    ids = torch.randint(5, tiny_cfg.vocab_size, (3, 40)).tolist()
    cache = model.new_cache()
    steps = [model.text_logits(model(text_batch([r[:3] for r in ids]), cache, store=True))]
    for i in range(3, 40):  # past 16 and 32 stored tokens: the buffers double twice
        step = collate([SequenceBuilder(48, start_position=i).text([r[i]]).tensors() for r in ids])
        steps.append(model.text_logits(model(step, cache, store=True)))
    assert grown == [] and cache.keys[0].shape[2] >= 40 and cache.keys[0].shape[1] == 2
    full = model.text_logits(model(text_batch(ids)))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_embeddings_by_row_index_equal_boolean_indexing(tiny_cfg):
    """`embed` gathers image rows and position / timestep embeddings with index_select and writes them
    with index_copy (faster backward on CPU): the same values and gradients as boolean indexing."""
    model = MMFusionModel(tiny_cfg.replace(image_pos_embed="learned"))
    torch.nn.init.normal_(model.pos_embed, std=0.5)
    batch = collate(
        [fusion_sample(tiny_cfg, [1, 5, 6], [3, 2, 4], caption=[4, 9, 2]), fusion_sample(tiny_cfg, [1, 7], [9], seed=1)]
    )
    is_image = batch.is_image()
    ref = model.embed_tokens(batch.ids.clamp(0, tiny_cfg.vocab_size - 1))
    steps, which = torch.unique(batch.t[is_image], return_inverse=True)
    img = model.image_in(batch.values[is_image]) + model.pos_embed[batch.image_pos[is_image]]
    ref = ref.index_put((is_image,), img + model.time_embed(steps)[which])
    out = model.embed(batch)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    grad = torch.randn_like(ref)
    params = [model.pos_embed, model.image_in.weight, model.embed_tokens.weight, *model.time_embed.parameters()]
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_precomputed_mask_rope_and_image_embedding_equal_the_plain_pass(tiny_cfg):
    """What the sampler reuses over denoising steps (the mask joined with the cache, the rotary tables,
    one timestep embedding for all image tokens) gives the same hidden states as a plain pass."""
    cfg = tiny_cfg.replace(image_rope=True)
    model = MMFusionModel(cfg).eval()
    cache = model.new_cache()
    model(text_batch([[1, 5, 6, 3], [1, 7, 3]], cfg.image_token_dim), cache, store=True)
    rows = [SequenceBuilder(cfg.image_token_dim, start_position=4) for _ in range(2)]
    values, pos = torch.randn(2, 3, cfg.image_token_dim), torch.tensor([[0, 5, 2], [7, 1, 3]])
    for b, v, p in zip(rows, values, pos):
        b.image(v, p, kind=NOISY, group=torch.zeros(3, dtype=torch.long), t=torch.full((3,), 250))
    batch = collate([b.tensors() for b in rows])
    plain = model(batch, cache)
    emb = model.image_embedding(batch.values, batch.image_pos, torch.tensor([250]))
    rope = model.backbone.rotary(model.rotary_positions(batch), emb.dtype)
    mask = model.backbone.full_mask(batch.mask(), cache)
    assert mask.shape == (2, 3, len(cache) + 3)
    reused = model.backbone(emb, batch.position_ids, mask, cache, rope=rope)
    torch.testing.assert_close(reused, plain, atol=1e-6, rtol=1e-5)


def test_cached_prefix_with_padding_equals_unpadded(tiny_cfg):
    """A right-padded batched prefix in the cache gives the same next-token logits as one row alone."""
    model = MMFusionModel(tiny_cfg).eval()
    rows = [[1, 8, 9], [1, 8, 9, 10, 11, 12]]
    cache = model.new_cache()
    model(text_batch(rows), cache, store=True)
    nxt = collate([SequenceBuilder(48, start_position=len(r)).text([20]).tensors() for r in rows])
    batched = model.text_logits(model(nxt, cache, store=True))[:, -1]
    for i, r in enumerate(rows):
        alone = model.text_logits(model(text_batch([r + [20]])))[0, -1]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-4)


def test_fp32_head_under_bf16_autocast(tiny_cfg):
    model = MMFusionModel(tiny_cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(text_batch([[1, 2, 3]]))
        assert model.text_logits(h).dtype == torch.float32
    model16 = MMFusionModel(tiny_cfg.replace(fp32_head=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model16.text_logits(model16(text_batch([[1, 2, 3]]))).dtype == torch.bfloat16


def _relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_weights_for_inference(tiny_cfg, tied):
    """`to_dtype(bfloat16)`: every weight in bf16 but the fp32 heads (and with tied embeddings the
    shared table), the rotary frequencies untouched; hidden states and heads within bf16 rounding of the
    float32 model (unit roundoff 2^-9: 0.5% relative error measured after the embeddings and two blocks;
    1% allowed, which dropping the timestep embedding in bf16 exceeds)
    and in the same dtypes as training under autocast; the KV cache holds bf16."""
    cfg = tiny_cfg.replace(tie_embeddings=tied)
    model = MMFusionModel(cfg).eval()
    with torch.no_grad():
        model.image_head.weight.normal_(std=0.05)  # zero at init: make the image output say something
    batch = collate(
        [fusion_sample(cfg, [1, 5, 6], [3, 2, 4], caption=[4, 9, 10, 2]), fusion_sample(cfg, [1, 7], [9], seed=1)]
    )
    with torch.no_grad():
        ref = model(batch)
        ref_text, ref_image = model.text_logits(ref), model.image_output(ref)
        bf = copy.deepcopy(model).to_dtype(torch.bfloat16)
        kept = {id(p) for head in bf.output_heads() for p in head.parameters()}
        for name, p in bf.named_parameters():
            assert p.dtype == (torch.float32 if id(p) in kept else torch.bfloat16), name
        assert torch.equal(bf.backbone.rotary.inv_freq, model.backbone.rotary.inv_freq)
        assert bf.backbone.rotary.inv_freq.dtype == torch.float32
        cache = bf.new_cache()
        h = bf(batch, cache, store=True)
        text, image = bf.text_logits(h), bf.image_output(h)
    assert h.dtype == torch.bfloat16 and text.dtype == image.dtype == torch.float32
    assert all(k.dtype == torch.bfloat16 for k in cache.keys + cache.values)
    assert _relative_error(h, ref) < 0.01
    assert _relative_error(text, ref_text) < 0.01 and _relative_error(image, ref_image) < 0.01


def test_presets():
    for name in ("tiny", "small", "L", "XL"):
        cfg = ModelConfig.from_name(name)
        assert cfg.dim % cfg.n_heads == 0
    assert (
        ModelConfig.from_name("L").dim,
        ModelConfig.from_name("L").n_heads,
        ModelConfig.from_name("L").n_layers,
    ) == (1024, 16, 24)
    assert (
        ModelConfig.from_name("XL").dim,
        ModelConfig.from_name("XL").n_heads,
        ModelConfig.from_name("XL").n_layers,
    ) == (1280, 20, 32)
    with pytest.raises(ValueError, match="^preset: must be one of tiny, small, L, XL, got .huge.$"):
        ModelConfig.from_name("huge")


def test_image_rope_leaves_text_alone_and_sees_image_layout(tiny_cfg):
    """Multimodal rotary equals 1-D rotary on text; on images it makes attention depend on rows / columns."""
    plain = MMFusionModel(tiny_cfg).eval()
    mrope = MMFusionModel(tiny_cfg.replace(image_rope=True)).eval()
    mrope.load_state_dict(plain.state_dict())
    text = text_batch([[1, 5, 9, 3, 7]])
    torch.testing.assert_close(mrope(text), plain(text))
    batch = collate([fusion_sample(tiny_cfg, [1, 5], [4, 4])])
    assert not torch.allclose(mrope(batch), plain(batch))
    assert mrope.rotary_positions(batch).shape == (*batch.kind.shape, 3)


def test_activation_checkpointing_gives_the_same_gradients(tiny_cfg):
    model = MMFusionModel(tiny_cfg)
    torch.nn.init.normal_(model.image_head.weight, std=0.02)
    batch = collate([fusion_sample(tiny_cfg, [1, 5, 6], [3, 2, 4], caption=[4, 9, 10, 2])])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.backbone.gradient_checkpointing = ckpt
        model.image_output(model(batch)).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
