"""A GPU run on paper: parameters, FLOPs per step, memory per GPU and time to train, from a RunConfig.

Plain arithmetic, no torch: `plan(cfg, gpus=32)` answers "how long, and does it fit" before any GPU is
rented. Every formula is stated where it is computed and in docs/how-it-works.md ("Planning a run");
the tests check the parameter count against the real model, the FLOPs against torch's FLOP counter
(directly and through the benchmark) and the activation estimate against the tensors autograd saves.

Assumptions, all stated again in the docstrings below:

* every sample is counted at the longest layout the config makes (rows are padded to the longest sample
  of the batch, and a caption-order sample, the longest, is in almost every batch of 64);
* mixed precision (`bf16-mixed`, `16-mixed`, and `auto`, which picks bf16-mixed on GPUs with fast bf16)
  keeps fp32 weights, fp32 gradients and AdamW's two fp32 moments: 16 bytes per parameter, plus 4 for the
  EMA copy when `train.ema_decay > 0`;
* attention runs in a fused kernel that keeps no sequence x sequence scores (the GPU's SDPA kernels);
* FSDP / ZeRO-3 divides weights, gradients, optimizer state and EMA by the GPUs; activations are not
  divided; the gathered blocks of the moment, communication buffers, the CUDA context and the
  allocator's fragmentation are not counted (leave some 10-20% of the GPU for them).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmfusion.config import RunConfig
from mmfusion.errors import ConfigError, check
from mmfusion.model.config import ModelConfig

# H100 SXM dense bf16 peak: 989.4 TFLOP/s (NVIDIA H100 Tensor Core GPU datasheet; 1,979 with sparsity)
H100_BF16_TFLOPS = 989.0
TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features (model/multimodal.py TimestepEmbedder)
GB = 1e9  # memory is in decimal gigabytes, as GPU makers state it


# --- parameters ---------------------------------------------------------------------------------
def block_parameters(m: ModelConfig) -> int:
    """One transformer block: q / k / v / o projections (grouped-query k and v, q / k / v biases with
    qkv_bias), SwiGLU (gate, up, down), two RMSNorms, per-head q / k norms and the optional sandwich norms."""
    q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    attention = 2 * m.dim * q + 2 * m.dim * kv + (2 * m.head_dim if m.qk_norm else 0) + (q + 2 * kv) * m.qkv_bias
    return attention + 3 * m.dim * m.ffn_dim + (4 if m.sandwich_norm else 2) * m.dim


def _token_shuffle_parameters(m: ModelConfig) -> int:
    """The fuse / unfuse MLPs of the discrete (Token-Shuffle) path, 0 for continuous tokens."""
    if not m.discrete:
        return 0
    d, e, w = m.dim, m.code_embed_dim, m.code_width
    code_embed = (m.code_bits * e + e) if m.code_bits else m.image_codebook_size * e
    fuse = w * e * d + d + d * d + d
    outputs = m.code_bits if m.code_bits and m.bitwise_head else m.image_codebook_size
    unfuse = d * d + d + d * w * e + w * e + e * outputs + outputs
    context = code_embed + w * e * e + e + e * e + e if m.window_head == "autoregressive" and w > 1 else 0
    return code_embed + fuse + unfuse + context


def parameter_parts(m: ModelConfig) -> dict[str, int]:
    """Parameters of `MMFusionModel(m)` by part (their sum is `num_parameters()`, tested)."""
    d, c = m.dim, m.image_token_dim
    head_in = m.image_head_hidden or d
    image_in = c * d + d + (m.num_image_tokens * d if m.image_pos_embed == "learned" else 0)
    image_out = (d * head_in + head_in if m.image_head_hidden else 0) + head_in * c + c
    classes = (m.num_classes + 1) * m.class_tokens * d if m.num_classes else 0
    return {
        "blocks": m.n_layers * block_parameters(m) + d,  # and the final norm
        "text embedding": m.vocab_size * d + classes,
        "text head": 0 if m.tie_embeddings else m.vocab_size * d,
        "image": image_in + image_out + _token_shuffle_parameters(m),
        "timestep": TIMESTEP_FREQ_DIM * d + d + d * d + d,
    }


def parameter_count(m: ModelConfig) -> int:
    return sum(parameter_parts(m).values())


# --- FLOPs -------------------------------------------------------------------------------------
def step_flops(
    m: ModelConfig, *, tokens: float, seq_len: int, image_tokens: float, noisy_tokens: float, text_targets: float
) -> float:
    """Training FLOPs (forward + backward) of `tokens` tokens in rows of `seq_len` (H = dim, Q = n_heads x
    head_dim, C = image token channels, V = vocabulary):

      6 x n_layers x P_block x tokens        the blocks' products (P_block = 2 H Q + 2 H kv + 3 H ffn_dim)
    + 12 x n_layers x Q x seq_len x tokens   attention scores and values over the whole row
    + 4 x C x H x image_tokens               the image input projection (its input needs no gradient)
    + 6 x P_head x noisy_tokens              the image head (C H, or H h + h C with a hidden layer of h)
    + 6 x H x V x text_targets               the text head, on the tokens with a text target

    Norms, rotary, softmax and the timestep MLP (once per distinct timestep) are left out; tests check
    the sum against torch's FLOP counter within 3% (tests/training/test_plan.py, tests/test_bench.py)."""
    q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    block_matmul = 2 * m.dim * q + 2 * m.dim * kv + 3 * m.dim * m.ffn_dim
    blocks = (6 * m.n_layers * block_matmul + 12 * m.n_layers * q * seq_len) * tokens
    head_in = m.image_head_hidden or m.dim
    image_head = 6 * (head_in * m.image_token_dim + (m.dim * m.image_head_hidden)) * noisy_tokens
    heads = 4 * m.image_token_dim * m.dim * image_tokens + image_head + 6 * m.dim * m.vocab_size * text_targets
    return float(blocks + heads)


@dataclass(frozen=True)
class SampleLayout:
    """Tokens of one training sample, at the longest layout of the config."""

    condition: int  # text: max_text_len + 4 (<bos> <boi> ... <eoi> caption <eos>); class: its tokens
    image: int  # clean + noisy copies: (1 + diffusion.k_times) x the image's tokens
    noisy: int  # image tokens with a diffusion target: k_times x the image's tokens
    text_targets: float  # expected tokens with a text target: caption-order share x (max_text_len + 1)

    @property
    def length(self) -> int:
        return self.condition + self.image


def sample_layout(cfg: RunConfig) -> SampleLayout:
    """The longest sample: a caption-order sample `<bos> <boi> [N clean] [K x N noisy] <eoi> caption <eos>`
    with a full-length caption (T2I samples are shorter: no clean copy of their last AR group, on average
    N / S tokens, and no <eoi> <eos>); class-conditional samples are the class tokens and the image.
    Packing (`objective.pack_length`) is not modelled."""
    m, n, k = cfg.model, cfg.model.num_image_tokens, cfg.diffusion.k_times
    if m.discrete:
        raise ConfigError(
            "model.image_codebook_size",
            "the plan covers continuous image tokens (CausalFusion); Token-Shuffle models are not modelled",
        )
    if cfg.objective.condition == "class":
        return SampleLayout(m.num_condition_tokens, (1 + k) * n, k * n, 0.0)
    caption_share = 1.0 - cfg.objective.t2i_fraction
    return SampleLayout(cfg.data.max_text_len + 4, (1 + k) * n, k * n, caption_share * (cfg.data.max_text_len + 1))


# --- memory ------------------------------------------------------------------------------------
MIXED = ("auto", "bf16-mixed", "16-mixed", "bf16", "16")
PARAM_BYTES = {"64-true": 8, "64": 8, "32-true": 4, "32": 4, "bf16-true": 2, "16-true": 2}


def state_bytes(precision: str) -> tuple[int, int, int]:
    """(weight, gradient, AdamW state) bytes per parameter: mixed precision keeps fp32 weights and
    gradients and two fp32 moments (4, 4, 8); a `-true` precision keeps all three in its own dtype."""
    size = 4 if precision in MIXED else PARAM_BYTES[precision]
    return size, size, 2 * size


def layer_activation_bytes(m: ModelConfig, precision: str) -> int:
    """Bytes one block keeps per token for its backward (H = dim, Q = n_heads x head_dim, K = kv_heads x
    head_dim, F = ffn_dim): the tensors autograd saves, read off and measured on CPU
    (tests/training/test_plan.py); fused GPU kernels (RMSNorm) may keep less.

    Mixed precision (autocast; the residual stream stays fp32): 26 H + 8 F + 14 Q + 6 K. Per RMSNorm
    its fp32 input and normalised output (8 H, twice), the bf16 copies of the normed input that q, k, v,
    gate and up each cast (2 H x 5); q and k norms: fp32 upcast and bf16 output (6 Q + 6 K); attention:
    bf16 q, k and v (k and v repeated to all heads: 6 Q) and its output (2 Q); SwiGLU: gate, up, silu and
    product in bf16 (8 F). Without q / k norms 8 Q replaces 14 Q + 6 K; sandwich norms add 12 H.

    One dtype (`-true` precisions, e bytes an element): e x (6 H + 4 F + 6 Q + 2 K): per norm its input,
    normalised and output tensors; the q / k norms' inputs and normalised tensors; attention's q, k, v
    and output; SwiGLU's four. Without q / k norms 4 Q replaces 6 Q + 2 K; sandwich norms add 4 H. In
    bf16-true the norms' fp32 upcasts are left out, so it is low there.

    Both add fp32 per-token scalars: each norm's rsqrt (4 bytes; per head for q / k) and attention's
    logsumexp (4 per head)."""
    h, q, k, f = m.dim, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_dim
    norms = 4 if m.sandwich_norm else 2
    scalars = 4 * (norms + m.n_heads) + (4 * (m.n_heads + m.kv_heads) if m.qk_norm else 0)
    if precision in MIXED:
        attention = 14 * q + 6 * k if m.qk_norm else 8 * q
        return 26 * h + 8 * f + attention + (12 * h if m.sandwich_norm else 0) + scalars
    attention = 6 * q + 2 * k if m.qk_norm else 4 * q
    return PARAM_BYTES[precision] * (6 * h + 4 * f + attention + (4 * h if m.sandwich_norm else 0)) + scalars


def activation_bytes(
    cfg: RunConfig, micro_batch: int, checkpointing: bool, layout: SampleLayout | None = None
) -> float:
    """Activations of one GPU's forward over `micro_batch` samples of the longest layout.

    Without checkpointing every block keeps `layer_activation_bytes` per token. With it (one checkpoint
    per block, as `train.activation_checkpointing` sets) each block keeps only its input (the fp32
    residual stream: 4 H bytes a token; e H in a `-true` precision) and one block at a time is recomputed
    in full during the backward. Outside the blocks: rotary tables and the embeddings / final norm
    (8 head_dim + 8 H a token), the boolean attention mask (b x L^2 bytes) and the fp32 text logits with
    their log-softmax (8 x vocab a text target)."""
    m, precision = cfg.model, cfg.train.precision
    layout = layout or sample_layout(cfg)
    tokens = micro_batch * layout.length
    per_layer = layer_activation_bytes(m, precision) * tokens
    residual = (4 if precision in MIXED else PARAM_BYTES[precision]) * m.dim * tokens
    blocks = m.n_layers * residual + per_layer if checkpointing else m.n_layers * per_layer
    outside = tokens * (8 * m.head_dim + 8 * m.dim) + micro_batch * layout.length**2
    return float(blocks + outside + 8 * m.vocab_size * micro_batch * layout.text_targets)


# --- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one way of sharding."""

    weights: float
    gradients: float
    optimizer: float
    ema: float
    activations: float
    activations_checkpointed: float

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema

    @property
    def total(self) -> float:
        return self.states + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.states + self.activations_checkpointed


@dataclass(frozen=True)
class Plan:
    """A training run on paper: what `mmfusion plan` prints."""

    parameters: dict[str, int]  # by part (parameter_parts)
    layout: SampleLayout
    gpus: int
    micro_batch: int  # samples per GPU per forward
    accumulate: int  # forwards per optimizer step
    steps: int
    flops_per_step: float
    ddp: Memory
    fsdp: Memory
    gpu_memory_gb: float
    gpu_tflops: float
    mfu: float
    precision: str

    @property
    def parameter_count(self) -> int:
        return sum(self.parameters.values())

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.gpus * self.accumulate

    @property
    def total_flops(self) -> float:
        return self.flops_per_step * self.steps

    @property
    def seconds(self) -> float:
        """Wall time of the schedule: its FLOPs over what the GPUs deliver at the stated MFU."""
        return self.total_flops / (self.gpus * self.gpu_tflops * 1e12 * self.mfu)

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps


def _check_arguments(gpus: int, gpu_memory_gb: float, gpu_tflops: float, mfu: float, steps: int | None) -> None:
    check(
        [
            (gpus >= 1, "gpus", f"must be at least 1, got {gpus}"),
            (gpu_memory_gb > 0, "gpu_memory", f"must be positive (GB per GPU), got {gpu_memory_gb}"),
            (gpu_tflops > 0, "gpu_tflops", f"must be positive (dense TFLOP/s per GPU), got {gpu_tflops}"),
            (0 < mfu <= 1, "mfu", f"must be in (0, 1] (model FLOPs utilisation, e.g. 0.4), got {mfu}"),
            (steps is None or steps >= 1, "steps", f"must be at least 1, got {steps}"),
        ]
    )


def memory(cfg: RunConfig, n_params: int, micro_batch: int, shards: int) -> Memory:
    """Memory per GPU with weights, gradients, optimizer state and EMA divided over `shards` GPUs
    (1: DDP, every GPU a full copy; the number of GPUs: FSDP / ZeRO-3)."""
    weight, grad, optim = state_bytes(cfg.train.precision)
    ema = weight if cfg.train.ema_decay > 0 else 0
    per = n_params / shards
    layout = sample_layout(cfg)
    return Memory(
        weights=weight * per,
        gradients=grad * per,
        optimizer=optim * per,
        ema=ema * per,
        activations=activation_bytes(cfg, micro_batch, False, layout),
        activations_checkpointed=activation_bytes(cfg, micro_batch, True, layout),
    )


def plan(
    cfg: RunConfig,
    gpus: int = 32,
    gpu_memory_gb: float = 80.0,
    gpu_tflops: float = H100_BF16_TFLOPS,
    mfu: float = 0.4,
    steps: int | None = None,
) -> Plan:
    """The run `cfg` describes on `gpus` GPUs of `gpu_memory_gb` and `gpu_tflops` (dense, in the training
    precision), at model-FLOPs utilisation `mfu`, for `steps` optimizer steps (default: train.max_steps).

    Each GPU takes `data.process_batch(gpus)` samples per forward (global_batch_size / gpus when it is
    set, else data.batch_size, Lightning's convention) and `train.accumulate_grad_batches` forwards make
    one optimizer step. FLOPs per step: `step_flops` over every sample of the step at the longest layout
    (padding is computed too, so the time is that of the work the GPUs do)."""
    _check_arguments(gpus, gpu_memory_gb, gpu_tflops, mfu, steps)
    layout = sample_layout(cfg)
    micro = cfg.data.process_batch(gpus)
    accumulate = cfg.train.accumulate_grad_batches
    samples = micro * gpus * accumulate
    flops = step_flops(
        cfg.model,
        tokens=samples * layout.length,
        seq_len=layout.length,
        image_tokens=samples * layout.image,
        noisy_tokens=samples * layout.noisy,
        text_targets=samples * layout.text_targets,
    )
    parts = parameter_parts(cfg.model)
    n = sum(parts.values())
    return Plan(
        parameters=parts,
        layout=layout,
        gpus=gpus,
        micro_batch=micro,
        accumulate=accumulate,
        steps=steps or cfg.train.max_steps,
        flops_per_step=flops,
        ddp=memory(cfg, n, micro, 1),
        fsdp=memory(cfg, n, micro, gpus),
        gpu_memory_gb=gpu_memory_gb,
        gpu_tflops=gpu_tflops,
        mfu=mfu,
        precision=cfg.train.precision,
    )


# --- the table ---------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes" if seconds >= 120 else f"{seconds:.1f} s"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


def summary_lines(p: Plan) -> list[str]:
    """The parameters, the sample, the batch, the FLOPs and the time of plan `p`."""
    parts = ", ".join(f"{name} {_millions(count)}" for name, count in p.parameters.items() if count)
    lay = p.layout
    gpu_hours = p.seconds * p.gpus / 3600
    return [
        f"parameters   {p.parameter_count:,} ({parts})",
        f"sample       {lay.length} tokens: {lay.condition} condition + {lay.image - lay.noisy} clean + "
        f"{lay.noisy} noisy image tokens (the longest; rows are padded to it)",
        f"batch        {p.global_batch:,} samples per step = {p.gpus} GPUs x {p.micro_batch} per GPU "
        f"x {p.accumulate} accumulated",
        f"FLOPs        {p.flops_per_step:.3g} per step, {p.total_flops:.3g} in {p.steps:,} steps",
        f"time         {_duration(p.seconds)} ({p.step_seconds:.2f} s per step, {gpu_hours:,.0f} GPU-hours) "
        f"at {p.gpu_tflops:g} TFLOP/s x {p.mfu:.0%} MFU",
    ]


MEMORY_COLUMNS = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("AdamW", "optimizer"),
    ("EMA", "ema"),
    ("activations", "activations"),
    ("total", "total"),
    ("checkpointed: activations", "activations_checkpointed"),
    ("total", "total_checkpointed"),
)


def _fits(mem: Memory, gpu_gb: float) -> str:
    if mem.total <= gpu_gb * GB:
        return "yes"
    return "checkpointed" if mem.total_checkpointed <= gpu_gb * GB else "no"


def memory_lines(p: Plan) -> list[str]:
    """The memory table of plan `p`: GB per GPU under DDP and under FSDP, without and with activation
    checkpointing, and whether the run fits in the GPU (without checkpointing, only with it, or not)."""
    kind = {8: "fp64", 4: "fp32", 2: "16-bit"}[state_bytes(p.precision)[0]]
    columns = [name for name, _ in MEMORY_COLUMNS] + [f"fits in {p.gpu_memory_gb:g} GB"]
    lines = [
        f"memory       GB per GPU, {p.precision} ({kind} weights, gradients, AdamW moments and EMA)",
        " " * 13 + "  ".join(columns),
    ]
    for label, mem in (("DDP", p.ddp), (f"FSDP / {p.gpus}", p.fsdp)):
        cells = [f"{getattr(mem, attr) / GB:>{len(name)}.1f}" for name, attr in MEMORY_COLUMNS]
        lines.append(f"  {label:<11}" + "  ".join([*cells, _fits(mem, p.gpu_memory_gb)]))
    return lines


def table(p: Plan) -> str:
    """What `mmfusion plan` prints."""
    return "\n".join([*summary_lines(p), *memory_lines(p)])
