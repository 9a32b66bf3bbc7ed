"""`mmfusion plan`: a run on paper. The figures of a tiny config worked out by hand, the parameter count
against the real model, the layout against the objective's batches, the activation estimate against
the tensors autograd saves, and the command."""

from pathlib import Path

import pytest
import torch

from mmfusion.cli.main import main
from mmfusion.config import load_config
from mmfusion.errors import ConfigError
from mmfusion.model.config import ModelConfig
from mmfusion.model.layers import RotaryEmbedding
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.transformer import Block
from mmfusion.training import plan as planning
from mmfusion.training.objective import JointObjective

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.preset=tiny",  # dim 64, 2 layers, 4 heads (head_dim 16), SwiGLU 128, vocab 512, tokens of 48
    "model.image_grid=[4,4]",  # N = 16 image tokens
    "data.max_text_len=12",
    "data.global_batch_size=32",
    "train.precision=bf16-mixed",
    "train.max_steps=1000",
]


def test_a_tiny_config_worked_out_by_hand():
    cfg = load_config(None, TINY)
    p = planning.plan(cfg, gpus=4, gpu_memory_gb=1.0, gpu_tflops=1.0, mfu=0.5)
    # parameters: embedding 512*64 = 32,768; image_in 48*64 + 64 = 3,136; timestep MLP 256*64 + 64 +
    # 64*64 + 64 = 20,608; a block: q, k, v, o 4 * 64*64 = 16,384, q / k norms 2 * 16, two norms 2 * 64,
    # SwiGLU 3 * 64*128 = 24,576 -> 41,120, two of them 82,240; final norm 64; lm_head 32,768; image
    # head 64*48 + 48 = 3,120
    assert p.parameter_count == 32_768 + 3_136 + 20_608 + 82_240 + 64 + 32_768 + 3_120 == 174_704
    # the longest sample: <bos> <boi> 16 clean, 16 noisy <eoi> 12 caption tokens <eos> = 48 tokens
    assert (p.layout.length, p.layout.image, p.layout.noisy) == (48, 32, 16)
    assert (p.micro_batch, p.global_batch) == (8, 32)
    # FLOPs of one sample: blocks 6 * 2 layers * 40,960 matmul weights * 48 tokens = 23,592,960;
    # attention 12 * 2 * 64 * 48 * 48 = 3,538,944; image in 4 * 48*64 * 32 = 393,216; image head
    # 6 * 64*48 * 16 = 294,912; text head 6 * 64*512 * (0.1 * 13 expected targets) = 255,590.4
    per_sample = 23_592_960 + 3_538_944 + 393_216 + 294_912 + 255_590.4
    assert p.flops_per_step == pytest.approx(32 * per_sample) == pytest.approx(898_419_916.8)
    # 1,000 steps at 4 GPUs x 1 TFLOP/s x 50%: 898,419,916,800 / 2e12 s
    assert p.seconds == pytest.approx(0.4492099584)
    # DDP: fp32 weights, gradients and EMA 4 * 174,704 = 698,816 bytes each, AdamW twice that
    ddp, fsdp = p.ddp, p.fsdp
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.ema) == (698_816, 698_816, 1_397_632, 698_816)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer, fsdp.ema) == (174_704, 174_704, 349_408, 174_704)
    # activations of 8 samples = 384 tokens; a block keeps 26*64 + 8*128 + 14*64 + 6*64 = 3,968 bytes a
    # token plus rsqrt / logsumexp scalars 4 * (2 + 4) + 4 * (4 + 4) = 56: 4,024; two blocks 3,090,432.
    # Outside: 384 * (8*16 + 8*64) = 245,760, the mask 8 * 48^2 = 18,432, the logits 8 * 512 * 8 * 1.3
    # = 42,598.4
    outside = 245_760 + 18_432 + 42_598.4
    assert ddp.activations == fsdp.activations == pytest.approx(3_090_432 + outside)
    # checkpointed: each block's fp32 input, 2 * 4*64 * 384 = 196,608, and one block recomputed, 1,545,216
    assert ddp.activations_checkpointed == pytest.approx(196_608 + 1_545_216 + outside)
    assert ddp.total == pytest.approx(698_816 * 5 + 3_090_432 + outside)  # weights, gradients, EMA, 2 moments


MODEL_VARIANTS = {
    "tiny": {},
    "gqa": {"n_heads": 8, "n_kv_heads": 2},
    "q / k / v biases (Qwen2), gqa": {"qkv_bias": True, "qk_norm": False, "n_heads": 8, "n_kv_heads": 2},
    "tied": {"tie_embeddings": True},
    "head hidden, learned positions": {"image_head_hidden": 96, "image_pos_embed": "learned"},
    "sandwich, no qk norm, head_dim 32": {"sandwich_norm": True, "qk_norm": False, "attn_head_dim": 32},
    "default SwiGLU width": {"hidden_dim": None, "dim": 96, "multiple_of": 32},
    "class tokens": {"num_classes": 12},
    "codes": {"image_codebook_size": 64, "shuffle": 2},
    "bits, autoregressive window": {
        "image_codebook_size": 256,
        "code_bits": 8,
        "shuffle": 2,
        "window_head": "autoregressive",
    },
    "bits, softmax head, code_dim": {"image_codebook_size": 16, "code_bits": 4, "bitwise_head": False, "code_dim": 8},
}


@pytest.mark.parametrize("changes", MODEL_VARIANTS.values(), ids=MODEL_VARIANTS.keys())
def test_parameter_count_is_the_models(changes):
    m = ModelConfig.from_name("tiny", **changes)
    assert planning.parameter_count(m) == MMFusionModel(m).num_parameters()


@pytest.mark.parametrize("name", ["small", "L", "XL"])
def test_parameter_count_of_the_presets(name):
    m = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only: L and XL without their gigabytes
        model = MMFusionModel(m)
    assert planning.parameter_count(m) == model.num_parameters()


def test_the_longest_layout_is_the_objectives_caption_order_sample():
    """All samples in caption order with a caption of max_text_len tokens: the batch's rows are exactly the
    plan's longest sample, with K = 2 noisy copies too."""
    cfg = load_config(None, [*TINY, "diffusion.k_times=2", "objective.t2i_fraction=0.0"])
    m = cfg.model
    obj = JointObjective(m, cfg.diffusion, cfg.objective, 1, 2, 3, 4)
    images = torch.randn(3, m.num_image_tokens, m.image_token_dim)
    batch = obj.build(images, [[7] * cfg.data.max_text_len] * 3, None, torch.Generator().manual_seed(0))
    layout = planning.sample_layout(cfg)
    assert (layout.length, layout.image, layout.noisy) == (12 + 4 + 3 * 16, 48, 32)
    assert batch.kind.shape[1] == layout.length and bool(batch.valid().all())
    assert int(batch.is_image().sum()) == 3 * layout.image and int((batch.weights > 0).sum()) == 3 * layout.noisy


def test_plan_flops_are_what_torch_counts():
    """With every sample at the longest layout (caption order, a full caption, K = 2, an image head with a
    hidden layer), the plan's FLOPs per step are the products torch counts in the forward and backward,
    within the timestep MLP, norms and softmax that the formula leaves out."""
    from torch.utils.flop_counter import FlopCounterMode

    overrides = [*TINY, "diffusion.k_times=2", "objective.t2i_fraction=0.0", "data.global_batch_size=4"]
    overrides += ["model.image_head_hidden=96", "model.attention=math"]
    cfg = load_config(None, overrides)
    obj = JointObjective(cfg.model, cfg.diffusion, cfg.objective, 1, 2, 3, 4)
    images = torch.randn(4, cfg.model.num_image_tokens, cfg.model.image_token_dim)
    batch = obj.build(images, [[7] * cfg.data.max_text_len] * 4, None, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        obj.loss(MMFusionModel(cfg.model), batch)["loss"].backward()
    assert planning.plan(cfg, gpus=1).flops_per_step == pytest.approx(counter.get_total_flops(), rel=0.03)


def _saved_bytes(m: ModelConfig, b: int, s: int, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves in one block's forward."""
    block = Block(m)
    x = torch.randn(b, s, m.dim, requires_grad=True)
    rope = RotaryEmbedding(m.head_dim)(torch.arange(s)[None].expand(b, s), torch.float32)
    mask = torch.ones(b, s, s, dtype=torch.bool).tril()
    seen = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            block(x, rope, mask)
    return sum(seen.values())


BLOCKS = {
    "gqa, qk norm": {"n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96},
    "mha, no qk norm": {"qk_norm": False},
    "sandwich norms": {"sandwich_norm": True},
}


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("changes", BLOCKS.values(), ids=BLOCKS.keys())
def test_activation_estimate_is_what_autograd_saves(changes, precision):
    """One block on CPU with the explicit attention (which also keeps the scores a fused kernel does not):
    the saved bytes are the estimate per token, plus what the estimate leaves out or counts elsewhere:
    the scores and probabilities, the rotary tables and mask (shared by all blocks), and the weights."""
    m = ModelConfig.from_name("tiny", attention="math", **changes)
    b, s, mixed = 2, 24, precision == "bf16-mixed"
    q = m.n_heads * m.head_dim
    block_matmul = 2 * m.dim * q + 2 * m.dim * m.kv_heads * m.head_dim + 3 * m.dim * m.ffn_dim
    norms = (4 if m.sandwich_norm else 2) * m.dim + (2 * m.head_dim if m.qk_norm else 0)
    weights = 2 * block_matmul + 4 * norms if mixed else 4 * block_matmul + 4 * norms
    scores = b * m.n_heads * s * s * (6 if mixed else 4)  # softmax output (and its 16-bit copy)
    no_logsumexp = 4 * m.n_heads * b * s
    tables = 2 * 4 * m.head_dim * b * s + b * s * s
    expected = planning.layer_activation_bytes(m, precision) * b * s + scores - no_logsumexp + tables + weights
    assert _saved_bytes(m, b, s, mixed) == expected


def test_bad_arguments_are_config_errors():
    cfg = load_config(None, TINY)
    for kwargs, message in [
        ({"gpus": 0}, "gpus: must be at least 1, got 0"),
        ({"mfu": 1.5}, "mfu: must be in (0, 1]"),
        ({"gpu_tflops": 0}, "gpu_tflops: must be positive"),
        ({"gpus": 3}, "data.global_batch_size: 32 does not split into 3"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
            planning.plan(cfg, **kwargs)


def test_the_command_prints_the_table(capsys):
    assert main(["plan", "--config", str(ROOT / "mmfusion/configs/L.yaml"), "--gpus", "32"]) == 0
    out = capsys.readouterr().out
    assert "parameters   566,451,216" in out and "2,048 samples per step = 32 GPUs x 64 per GPU" in out
    assert "checkpointed: activations" in out and "  FSDP / 32 " in out and "fits in 80 GB" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0"], "error: gpus: must be at least 1, got 0"),
        (["--mfu", "1.5"], "error: mfu: must be in (0, 1] (model FLOPs utilisation, e.g. 0.4), got 1.5"),
        (["model.dim=wide"], "error: model.dim: must be of type int, got 'wide'"),
    ],
)
def test_bad_options_are_one_line_errors(args, message, capsys):
    assert main(["plan", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message and captured.out == ""


def test_the_readme_shows_the_commands_output(capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("```text\n$ mmfusion plan ", 1)[1].split("```")[0]
    monkeypatch.chdir(ROOT)
    assert main(["plan", *shown.splitlines()[0].split()]) == 0
    assert shown.split("\n", 1)[1].rstrip() == capsys.readouterr().out.rstrip()
