"""The LightningModule: joint objective, AdamW with warmup, EMA weights for sampling."""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from torch import nn

from mmfusion.config import RunConfig, check_lr_schedule
from mmfusion.data.datamodule import pick_captions
from mmfusion.errors import UserError
from mmfusion.model.config import ModelConfig
from mmfusion.model.multimodal import MMFusionModel
from mmfusion.model.sequence import TokenBatch
from mmfusion.model.transformer import can_compile, compile_stack
from mmfusion.tokenizers.build import build_image_tokenizer
from mmfusion.tokenizers.text import TextTokenizer
from mmfusion.training.objective import JointObjective
from mmfusion.training.sharded import UsedWeights, init_optimizer_state, is_sharded, shard_model

VALIDATION_SEED = 987_654_321  # validation rows draw from generators of their own, apart from training's
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's gradient bucket (its default bucket_cap_mb=25)


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row."""


def resolve_model_config(cfg: RunConfig, image_tokenizer: Any, vocab_size: int) -> ModelConfig:
    """The model config with the dimensions that follow from the tokenizers filled in."""
    if getattr(image_tokenizer, "codebook_size", 0):  # discrete codes: Token-Shuffle path
        (h, w), s = image_tokenizer.grid, cfg.model.shuffle
        if h % s or w % s:
            raise UserError(f"the {h}x{w} code grid is not divisible by model.shuffle={s}: choose one that divides it")
        return cfg.model.replace(
            vocab_size=vocab_size,
            image_codebook_size=image_tokenizer.codebook_size,
            code_bits=image_tokenizer.bits,
            image_grid=(h // s, w // s),
            image_token_dim=1,
        )
    return cfg.model.replace(
        vocab_size=vocab_size, image_token_dim=image_tokenizer.token_dim, image_grid=image_tokenizer.grid
    )


def find_callback(trainer: L.Trainer, kind: type) -> Any:
    """The trainer's callback of this type, or None."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def max_over_processes(flag: torch.Tensor) -> torch.Tensor:
    """`flag`'s maximum over all processes, in place: one all-reduce, which every process makes at the same
    point of every step. (Lightning's `strategy.reduce` puts a barrier before it: a second collective a
    step, waited for on every process.)"""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


class MMFusionModule(L.LightningModule):
    """Trains `model` (built from `cfg.model` unless given, e.g. a pretrained one wrapped with LoRA).

    EMA weights are kept for sampling when `train.ema_decay > 0`; with 0 the live weights are used.
    """

    def __init__(
        self, cfg: RunConfig, text_tokenizer: TextTokenizer, model: nn.Module | None = None, image_tokenizer: Any = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_tokenizer = text_tokenizer
        # the image tokenizer (a frozen VAE, say) is not part of the trained state
        self.aux = {"image_tokenizer": image_tokenizer or build_image_tokenizer(cfg.image)}
        if model is None:
            model = MMFusionModel(resolve_model_config(cfg, self.image_tokenizer, len(text_tokenizer)))
        model_cfg = model.cfg
        self.model = model
        self.model.backbone.gradient_checkpointing = cfg.train.activation_checkpointing
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.train.ema_decay > 0 else None
        t = text_tokenizer
        self.objective = JointObjective(model_cfg, cfg.diffusion, cfg.objective, t.bos_id, t.eos_id, t.boi_id, t.eoi_id)
        self.skipped: dict[str, set[int]] = defaultdict(set)  # reason -> rows skipped for it
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.seen = torch.zeros(2, dtype=torch.float64)  # samples and tokens trained on by this process
        self.pending_seen = torch.zeros(2, dtype=torch.float64)  # ... since the last optimizer step
        self.loss_not_finite = False  # ... whose loss was not finite (this process)
        self.settled_step = -1  # the last step `settle_step` decided
        self.last_logged: dict[str, torch.Tensor] = {}  # each loss term's last value (the bar shows it)
        self.class_names: list[str] = []
        self.used_weights = UsedWeights()  # under FSDP: the weights a step's backward reached
        self.graph_scope: Any = contextlib.nullcontext  # entered around the compiled calls (`graph_scope`)

    @property
    def image_tokenizer(self) -> Any:
        return self.aux["image_tokenizer"]

    def configure_model(self) -> None:
        """Under `train.strategy=fsdp`, shard the model and its EMA over the processes (Lightning calls
        this once the process group is up, before the optimizer is made; a no-op otherwise)."""
        if self._trainer is None or not is_sharded(self.trainer.strategy):
            return
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.model, mesh)
        if self.ema is not None:  # sharded alike: each process averages its own shard of the weights
            shard_model(self.ema, mesh)

    def on_fit_start(self) -> None:
        self.image_tokenizer.to(self.device)
        fsdp, step = self._under_fsdp(), self.cfg.train.compile_step
        if self.cfg.train.compile and compile_training(self.model, self.objective, per_block=fsdp, step=step):
            self.graph_scope = graph_scope(self.model)
            if self.trainer.is_global_zero:  # the first steps wait for it: say why the bar stands still
                what = "the training step" if self.objective.compiled else "the transformer"
                print(f"train.compile: compiling {what} at the first steps (10-60 s; inductor caches it)")

    def sample_generators(self, indices: list[int] | torch.Tensor) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, step, row): the randomness of a sample does not
        depend on the batch or the process it lands in, nor on whether the run was resumed."""
        base = (self.cfg.train.seed * 1_000_003 + self.global_step) * 10_000_019
        rows = indices.tolist() if isinstance(indices, torch.Tensor) else indices
        return [torch.Generator().manual_seed(base + int(i)) for i in rows]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        for row, reason in batch["skipped"]:
            self.skipped[reason].add(int(row))
        if batch["size"] == 0:
            return None
        built = self.token_batch(batch)
        seen = torch.tensor([batch["size"], int(built.valid().sum())], dtype=torch.float64)  # on the CPU: no sync
        built = built.to(self.device)
        with self.graph_scope():
            self.objective.warm_up(self.model, built)  # a compiled step's first: under its precision, as it trains
            losses = self.objective.loss(self.model, built)
        if self._under_fsdp():
            self.used_weights.watch(self.model)
        if not torch.isfinite(losses["loss"].detach()):
            # skipped on every process before the weights move (`settle_step`); its backward still runs,
            # so that all processes make the same collectives
            self.loss_not_finite = True
            return losses["loss"]
        self.pending_seen += seen
        # a term this batch had no data for is NaN, a gap in the logs (Lightning would repeat its last value)
        terms = (
            ("image_loss", "text_loss", "loss") if self.cfg.objective.condition == "text" else ("image_loss", "loss")
        )
        measured = {f"train/{k}": losses[k].detach() for k in terms if k in losses}
        self.last_logged.update(measured)
        self.log_dict({f"train/{k}": math.nan for k in terms} | measured, prog_bar=True, batch_size=batch["size"])
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The joint loss of a validation batch, with the same draws (caption, AR steps, order, t, noise)
        at every check: each row's generator is seeded by (seed, row) alone. The live weights, as training
        logs its loss."""
        if batch["size"] == 0:
            return
        gens = [
            torch.Generator().manual_seed(VALIDATION_SEED + self.cfg.train.seed * 1_000_003 + int(i))
            for i in batch["index"]
        ]
        with self.graph_scope():
            losses = self.objective.loss(self.model, self.token_batch(batch, gens).to(self.device))
        terms = [k for k in ("image_loss", "text_loss", "loss") if k in losses and torch.isfinite(losses[k])]
        self.log_dict({f"val/{k}": losses[k].detach() for k in terms}, batch_size=batch["size"], sync_dist=True)

    def token_batch(self, batch: dict[str, Any], generators: list[torch.Generator] | None = None) -> TokenBatch:
        """The objective's training batch of a loader batch: flipped images (with `data.hflip`), image
        tokens, one caption per row, all drawn from generators of (seed, step, row) unless `generators`
        (validation: no flips) are given."""
        gens = generators or self.sample_generators(batch["index"])
        tokens = batch.get("tokens")
        if tokens is None:
            images = batch["images"]
            if self.cfg.data.hflip and generators is None:
                flip = torch.tensor([bool(torch.rand(1, generator=g) < 0.5) for g in gens], device=images.device)
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            tokens = self.image_tokenizer.encode(images)
        return self.objective.build(tokens.cpu(), pick_captions(batch, gens), batch["labels"].tolist(), gens)

    def on_train_start(self) -> None:
        if self._under_fsdp():  # every weight in the sharded checkpoints' optimizer state
            init_optimizer_state(self.trainer.optimizers[0])
        # a resumed run's LambdaLR brings back the checkpoint's schedule settings with its state: the
        # config's win (a longer max_steps, another schedule); only the time spent is kept
        schedule = getattr(self, "lr_schedule", None)
        if schedule is not None:
            schedule.configure(*self._schedule_settings())

    def settle_step(self, optimizer: torch.optim.Optimizer, not_finite: bool, spent: float | None = None) -> None:
        """Before the weights move, what the processes agreed on in the step's vote (`StepVote`, one
        all-reduce): whether any had a non-finite loss since the last optimizer step, and the share of
        the time budget spent, the LR schedule's time progress (the same on every process, so that all
        replicas step with the same rate). A step with a non-finite loss leaves the weights as they
        were: its gradients are dropped, so the optimizer passes over every weight. It is counted, and
        `train.max_nonfinite` of them in a row stop the run."""
        self.settled_step = self.global_step
        seen, self.pending_seen = self.pending_seen, torch.zeros_like(self.pending_seen)
        self.loss_not_finite = False
        schedule = getattr(self, "lr_schedule", None)
        if spent is not None and schedule is not None:
            schedule.time_progress = spent
        if not not_finite:
            self.seen += seen
            self.nonfinite_run = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total))
        limit = self.cfg.train.max_nonfinite
        if self.nonfinite_run >= limit:
            raise TrainingDiverged(
                f"the loss was not finite for {limit} steps in a row (step {self.global_step}); stopped. The last "
                "checkpoint before it is intact: lower train.lr or raise train.grad_clip and resume with --resume"
            )

    def skipped_summary(self) -> str:
        """One line: how many distinct rows were skipped, and why."""
        rows = set().union(*self.skipped.values()) if self.skipped else set()
        reasons = ", ".join(f"{reason}: {len(r)}" for reason, r in sorted(self.skipped.items()))
        return f"skipped {len(rows)} unusable rows ({reasons})" if rows else "no rows skipped"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._gather_skipped()
        skipped = {reason: sorted(rows) for reason, rows in self.skipped.items()}
        checkpoint["mmfusion"] = {
            "skipped": skipped,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
        }

    def _gather_skipped(self) -> None:
        """Each process skips rows of its own share of the data; every process saves a checkpoint
        together, so this is where they pool them (row numbers index the whole data set: a union)."""
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, {k: sorted(v) for k, v in self.skipped.items()})
        for theirs in everyone:
            for reason, rows in theirs.items():
                self.skipped[reason].update(rows)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("mmfusion", {})
        self.skipped = defaultdict(set, {k: set(v) for k, v in extra.get("skipped", {}).items()})
        self.nonfinite_total = extra.get("nonfinite_total", 0)
        self.nonfinite_run = extra.get("nonfinite_run", 0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.settled_step != self.global_step:  # a trainer without `StepVote`: agree on the loss alone
            flag = torch.tensor(float(self.loss_not_finite), device=self.device)
            self.settle_step(optimizer, not_finite=bool(max_over_processes(flag)))
        if self._under_fsdp():
            self.used_weights.drop_unused_grads(self.model)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA moves right after the weights, before any callback (checkpointing) sees the step
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.update_ema()

    @property
    def sampling_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def update_ema(self) -> None:
        # warm-up of the decay so that short runs still get a useful average
        step = self.global_step
        decay = min(self.cfg.train.ema_decay, (1 + step) / (10 + step))
        ema = [p for p in self.ema.parameters()]
        live = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - decay)

    def _under_fsdp(self) -> bool:
        return self._trainer is not None and is_sharded(self._trainer.strategy)

    def _fused_optimizer(self, params: list[nn.Parameter]) -> bool:
        """Whether to use AdamW's fused kernel: one pass over all parameters instead of a series of foreach
        ops, which on a small model cost a visible share of a step. Not under FSDP (sharded DTensor
        parameters) nor with fp16's grad scaler, and only on the devices the kernel exists for."""
        trainer = self._trainer
        if trainer is None or str(trainer.precision) == "16-mixed" or self._under_fsdp():
            return False
        return all(p.device.type in ("cpu", "cuda") for p in params)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Any = None,
    ) -> None:
        """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it may unscale fp16
        gradients itself). Fused AdamW is only chosen where there is no grad scaler (fp32, bf16), so the
        gradients are final here and are clipped directly."""
        if not (gradient_clip_val and any(g.get("fused") for g in optimizer.param_groups)):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def _schedule_settings(self) -> tuple[int, int, str, float, float]:
        t = self.cfg.train
        return t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio, t.lr_decay_fraction

    def configure_optimizers(self) -> dict[str, Any]:
        t = self.cfg.train
        decay, no_decay, lora_b = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_B." in name and t.loraplus_lr_ratio != 1.0:
                lora_b.append(p)
            else:
                (no_decay if p.ndim < 2 or "embed" in name or "trainable_tokens" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if lora_b:  # LoRA+: B, which starts at zero, learns at a higher rate than A
            groups.append({"params": lora_b, "weight_decay": t.weight_decay, "lr": t.lr * t.loraplus_lr_ratio})
        opt = torch.optim.AdamW(
            groups,
            lr=t.lr,
            betas=t.betas,
            fused=self._fused_optimizer(decay + no_decay + lora_b),
        )
        self.lr_schedule = LRSchedule(*self._schedule_settings())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def compile_blocks(model: nn.Module, per_block: bool = False) -> bool:
    """torch.compile the transformer in place (state-dict keys unchanged; the EMA copy, used only for
    sampling, stays eager): the whole stack of blocks as one graph, or, with `per_block` (FSDP, which
    wraps each block), every block on its own. One graph has one guard check and call per step instead
    of one per block, and fuses the elementwise work across block boundaries (docs/BENCHMARKS.md).
    Shapes are dynamic: the sequence
    length changes from batch to batch. Returns False, with a message, where inductor has no C++
    compiler to use on CPU."""
    if not can_compile():
        print("train.compile: no C++ compiler found (install g++), training uncompiled")
        return False
    compile_stack(model, per_block)
    return True


def compile_training(model: nn.Module, objective: JointObjective, per_block: bool = False, step: bool = False) -> bool:
    """`train.compile`: the transformer (`compile_blocks`; under FSDP, which wraps each block, the blocks
    one by one), or with `step` (`train.compile_step`) the training step's forward and losses as one
    graph, the transformer inside it (`JointObjective.compile`). Returns False, with a message, where
    inductor has no C++ compiler on CPU."""
    if per_block or not step or not can_compile():
        return compile_blocks(model, per_block=per_block)  # says why where it cannot
    objective.compile()
    return True


def graph_scope(model: nn.Module) -> Any:
    """What the compiled training calls run under. Inside a DistributedDataParallel forward, dynamo cuts
    a compiled graph at DDP's gradient buckets (its DDPOptimizer), so that a bucket's all-reduce can start
    while the backward of the layers before it runs. A model whose gradients fit in one bucket has
    nothing to overlap but DDP's small first bucket (1 MB), and the cuts cost it: fusion across a cut is
    lost, and the pieces compile apart, outside inductor's cache, while a run's first steps wait
    (docs/BENCHMARKS.md). For such a model the graphs stay whole (`optimize_ddp=False`: the all-reduce
    follows the backward); a larger one keeps dynamo's default. Outside DDP neither changes anything."""
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if grads > DDP_BUCKET_BYTES:
        return contextlib.nullcontext
    import torch._dynamo

    return lambda: torch._dynamo.config.patch(optimize_ddp=False)


class LRSchedule:
    """Learning-rate factor: linear warmup, then constant, cosine down to `floor` x the base rate, or
    "wsd" (warmup-stable-decay: constant, then linear down to `floor` over the last `decay_fraction`).

    Progress through the run is the larger of the steps done over `total` steps and, when the run has a
    time budget, the time spent over that budget (`time_progress`, set by the module during training):
    a run that stops on wall time still ends its cosine or its decay. A callable object, so LambdaLR
    keeps `time_progress` in its state dict and a resumed run continues where it stopped.
    """

    def __init__(self, warmup: int, total: int, schedule: str, floor: float, decay_fraction: float = 0.2) -> None:
        self.configure(warmup, total, schedule, floor, decay_fraction)
        self.time_progress = 0.0

    def configure(self, warmup: int, total: int, schedule: str, floor: float, decay_fraction: float = 0.2) -> None:
        """Set (or, after a resume, reset) the settings; the time spent stays."""
        check_lr_schedule(schedule, decay_fraction)
        self.warmup, self.total, self.schedule = warmup, total, schedule
        self.floor, self.decay_fraction = floor, decay_fraction

    def progress(self, step: int) -> float:
        """Fraction of the post-warmup run done at `step`, in [0, 1]."""
        steps = (step - self.warmup) / max(1, self.total - self.warmup)
        return min(1.0, max(steps, self.time_progress))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = self.progress(step)
        if self.schedule == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        left = (1 - progress) / self.decay_fraction  # wsd: 1 until the decay starts, then down to 0
        return self.floor + (1 - self.floor) * min(1.0, left)
