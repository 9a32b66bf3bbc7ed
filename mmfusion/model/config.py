"""Typed configuration of the mmfusion transformer, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmfusion.errors import ConfigError, check

ROPE_TYPES = ("default", "linear", "llama3")
BACKENDS = ("auto", "sdpa", "math", "flex")  # model.attention: see model/attention_backends.py


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder-only transformer and of its text / image heads.

    The backbone fields follow LLaMA's names so that Hugging Face checkpoints map onto them; the
    image fields describe how continuous image tokens enter and leave the sequence.
    """

    dim: int = 256  # model width (hidden size)
    n_layers: int = 6  # transformer blocks
    n_heads: int = 4  # attention heads
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
    attn_head_dim: int | None = None  # None means dim // n_heads (Qwen3 sets it explicitly)
    hidden_dim: int | None = None  # SwiGLU width; None means 8/3 * dim rounded up to multiple_of
    multiple_of: int = 64  # the SwiGLU width is rounded up to a multiple of this
    vocab_size: int = 512  # text vocabulary (set from the tokenizer when a run builds the model)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base frequency
    # rotary frequency scaling of long-context checkpoints (Hugging Face's rope types): "default" (none),
    # "linear" (every frequency / rope_factor) or "llama3" (Llama 3.1+: low frequencies / rope_factor,
    # high ones kept, a smooth blend between, set by the two band factors and the original context)
    rope_type: str = "default"
    rope_factor: float = 1.0  # rope_type's scaling factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths over original_context / this get / rope_factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: wavelengths below original_context / this are kept
    rope_original_context: int = 8192  # llama3 scaling: the context the checkpoint was first trained at
    qk_norm: bool = True  # per-head RMSNorm on q and k (CausalFusion, Switti, Qwen3)
    qkv_bias: bool = False  # biases on the q / k / v projections (Qwen2); the output projection has none
    sandwich_norm: bool = False  # Switti: RMSNorm after attention and after the MLP, before the add
    fp32_head: bool = True  # Switti: output heads in float32 under bf16 autocast
    tie_embeddings: bool = False  # the text head shares the token embedding's weights
    init_std: float = 0.02  # standard deviation of the initial weights
    # auto (SDPA; the explicit form for short bf16 training on CPU, where it is faster) | sdpa | math |
    # flex (block-sparse, no-grad on CPU); see model/attention_backends.py
    attention: str = "auto"
    # image tokens
    image_token_dim: int = 48  # C: channels of one continuous image token (p * p * channels)
    image_grid: tuple[int, int] = (8, 8)  # tokens per image side (h, w)
    image_pos_embed: str = "sincos"  # "sincos" (fixed 2-D) or "learned"
    # width of a SiLU hidden layer before the image output (0: one linear map). A linear head can only
    # produce image tokens in a dim-wide subspace, a real limit where a token is wider than the model
    # (8 x 8 RGB pixel patches are 192 values, the demo model 128 wide)
    image_head_hidden: int = 0
    # 2-D rotary for image tokens (multimodal RoPE): rotary frequencies are shared out, interleaved,
    # between the sequence position, the image row and the image column; text is unaffected
    image_rope: bool = False
    # attention among the tokens of a condition prefix (`<bos> caption <boi>`, class tokens): "causal" as
    # in a language model (the paper), or "bidirectional" (a prefix LM): every word of the prompt sees
    # the whole prompt, so "a red circle" knows from the words after it on which side it belongs
    prompt_attention: str = "causal"
    # class-conditional mode: learned class tokens, repeated (CausalFusion appendix B)
    num_classes: int = 0
    class_tokens: int = 4  # distinct learned tokens per class
    class_repeat: int = 16  # times the class tokens are repeated in the prefix
    # discrete image path (Token-Shuffle): set from the VQ tokenizer; 0 means continuous tokens
    image_codebook_size: int = 0  # K codes (2^bits for a binary quantiser)
    code_bits: int = 0  # d > 0: codes are d-bit binary codes (lookup-free quantiser)
    bitwise_head: bool = True  # with bits: d binary classifiers (Infinity) instead of a 2^d-way softmax
    shuffle: int = 1  # s: each transformer token fuses an s x s window of codes
    # width of one code's embedding in the fuse / unfuse MLPs (default: dim, whatever s is). The
    # paper's dim // s^2 keeps the concatenation at dim wide; at s = 2 on shapes (dim 128) that 32-wide
    # bottleneck cost one-object accuracy (docs/experiments.md, Token-Shuffle)
    code_dim: int | None = None
    # how the s^2 codes of one fused token are predicted: "independent" (Token-Shuffle: one head per
    # slot, drawn independently) or "autoregressive" (slot j also sees the codes of slots < j of its
    # window: teacher-forced in training, drawn one after another in sampling)
    window_head: str = "independent"

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_grid", tuple(self.image_grid))

        def one_of(key: str, allowed: tuple[Any, ...]) -> tuple[bool, str, str]:
            value = getattr(self, key)
            return value in allowed, key, f"must be one of {', '.join(map(str, allowed))}, got {value!r}"

        check(
            [
                (
                    self.attn_head_dim is not None or self.dim % self.n_heads == 0,
                    "dim",
                    f"must be divisible by n_heads ({self.n_heads}), got {self.dim}",
                ),
                (
                    self.n_heads % self.kv_heads == 0,
                    "n_kv_heads",
                    f"must divide n_heads ({self.n_heads}), got {self.kv_heads}",
                ),
                one_of("image_pos_embed", ("sincos", "learned")),
                one_of("attention", BACKENDS),
                one_of("shuffle", (1, 2, 4)),
                one_of("window_head", ("independent", "autoregressive")),
                one_of("prompt_attention", ("causal", "bidirectional")),
                one_of("rope_type", ROPE_TYPES),
                (
                    self.rope_type != "llama3" or self.rope_low_freq_factor < self.rope_high_freq_factor,
                    "rope_low_freq_factor",
                    f"must be below rope_high_freq_factor ({self.rope_high_freq_factor}), "
                    f"got {self.rope_low_freq_factor}",
                ),
            ]
        )

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * -(-hidden // self.multiple_of)

    @property
    def bidirectional_prompt(self) -> bool:
        return self.prompt_attention == "bidirectional"

    @property
    def discrete(self) -> bool:
        return self.image_codebook_size > 0

    @property
    def code_width(self) -> int:
        """Codes per fused token: s^2 (0 for continuous tokens)."""
        return self.shuffle * self.shuffle if self.discrete else 0

    @property
    def code_embed_dim(self) -> int:
        return self.code_dim or self.dim

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def image_span(self) -> int:
        """Rotary positions an image occupies in the sequence (text after it continues past them)."""
        return max(self.image_grid) if self.image_rope else 1

    @property
    def num_condition_tokens(self) -> int:
        """Length of the class-token prefix in class-conditional mode."""
        return self.class_tokens * self.class_repeat if self.num_classes else 0

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_grid"] = list(self.image_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (`tiny`, `small`, `L`, `XL`) with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError("preset", f"must be one of {', '.join(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # unit tests: seconds on a CPU
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=512),
    # the CPU demo: the size that learned fastest per CPU-minute on shapes (docs/experiments.md)
    "small": ModelConfig(dim=128, n_layers=4, n_heads=2, vocab_size=512),
    # CausalFusion-L / XL (paper appendix C): 256 px, SD-VAE f8 c4, patch 2 -> 16 x 16 tokens of 16 dims.
    # SwiGLU width 2/3 * 4 * dim keeps the parameter count of the paper's 4x GELU MLP.
    "L": ModelConfig(
        dim=1024,
        n_layers=24,
        n_heads=16,
        hidden_dim=2736,
        vocab_size=128_256,
        image_token_dim=16,
        image_grid=(16, 16),
    ),
    "XL": ModelConfig(
        dim=1280,
        n_layers=32,
        n_heads=20,
        hidden_dim=3416,
        vocab_size=128_256,
        image_token_dim=16,
        image_grid=(16, 16),
    ),
}
